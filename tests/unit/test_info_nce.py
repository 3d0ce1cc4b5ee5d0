"""InfoNCE: a hand-checkable example, masking rules, and gathered (2 gloo processes) == single."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from whetstone.losses.info_nce import InfoNCELoss, false_negative_mask


def test_two_queries_by_hand():
    """q0 = d0 = e1, q1 = d1 = e2 (orthogonal), temperature 1:
    row 0 logits [1, 0] -> loss = log(1 + e^-1) = 0.3133; same for row 1."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = InfoNCELoss(temperature=1.0)(q, q.clone(), torch.tensor([0, 1]))
    expected = math.log(1 + math.exp(-1))
    assert torch.allclose(out.losses, torch.full((2,), expected), atol=1e-6)
    assert torch.allclose(out.positive_scores, torch.ones(2))
    assert torch.allclose(out.hardest_negative_scores, torch.zeros(2))


def test_matches_reference_cross_entropy():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1)
    d = F.normalize(torch.randn(10, 8), dim=-1)
    target = torch.tensor([0, 1, 2, 3])
    out = InfoNCELoss(temperature=0.05)(q, d, target)
    reference = []
    for i in range(4):
        logits = [float(q[i] @ d[j]) / 0.05 for j in range(10)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        reference.append(log_z - logits[int(target[i])])
    assert torch.allclose(out.losses, torch.tensor(reference), atol=1e-4)


def test_mask_excludes_labelled_positives_and_duplicates():
    # columns: [a (q0's positive), b (q1's positive), a (a hard negative for q1, duplicate of a), c]
    doc_ids = ["a", "b", "a", "c"]
    mask = false_negative_mask(doc_ids, torch.tensor([0, 1]), [["a"], ["b", "c"]])
    assert mask.tolist() == [
        [False, False, True, False],  # q0: the duplicate of its positive a is masked
        [False, False, False, True],  # q1: c is also labelled positive for q1 -> masked
    ]


def test_masked_cells_do_not_change_the_loss():
    """Masking a column equals deleting it."""
    torch.manual_seed(1)
    q = F.normalize(torch.randn(2, 4), dim=-1)
    d = F.normalize(torch.randn(3, 4), dim=-1)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    masked = InfoNCELoss(0.1)(q, d, torch.tensor([0, 1]), mask).losses
    deleted = InfoNCELoss(0.1)(q[:1], d[:2], torch.tensor([0])).losses
    assert torch.allclose(masked[0], deleted[0], atol=1e-6)


def test_symmetric_term_is_the_mean_of_both_directions():
    torch.manual_seed(2)
    q = F.normalize(torch.randn(3, 4), dim=-1)
    d = F.normalize(torch.randn(3, 4), dim=-1)
    target = torch.arange(3)
    one_way = InfoNCELoss(0.5)(q, d, target).losses
    backward = F.cross_entropy((d @ q.T) / 0.5, target, reduction="none")
    both = InfoNCELoss(0.5, symmetric=True)(q, d, target).losses
    assert torch.allclose(both, 0.5 * (one_way + backward), atol=1e-6)


def test_bad_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)


# --- gathered across 2 gloo processes == one process on the global batch -------------------

GLOBAL_QUERIES, DOCS_PER_QUERY, DIM = 6, 2, 8


def _global_inputs():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(DIM, DIM, generator=gen)
    queries = torch.randn(GLOBAL_QUERIES, DIM, generator=gen)
    docs = torch.randn(GLOBAL_QUERIES * DOCS_PER_QUERY, DIM, generator=gen)
    ids = [f"d{i % 9}" for i in range(GLOBAL_QUERIES * DOCS_PER_QUERY)]  # duplicates on purpose
    return weight, queries, docs, ids


def _embed(weight, x):
    return F.normalize(x @ weight, dim=-1)


def _single_process():
    weight, queries, docs, ids = _global_inputs()
    weight.requires_grad_(True)
    # layout as the gathered one: worker 0's docs then worker 1's docs
    half = GLOBAL_QUERIES // 2
    per_worker_docs = half * DOCS_PER_QUERY
    positive_column = torch.tensor([w * per_worker_docs + i for w in range(2) for i in range(half)])
    positives = [[ids[int(c)]] for c in positive_column]
    mask = false_negative_mask(ids, positive_column, positives)
    out = InfoNCELoss(0.05)(_embed(weight, queries), _embed(weight, docs), positive_column, mask)
    loss = out.losses.mean()
    loss.backward()
    return loss.detach(), weight.grad.detach()


def _worker(rank: int, port: int, results):
    import torch.distributed as dist
    from whetstone.losses.gather import gather_documents

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    weight, queries, docs, ids = _global_inputs()
    weight.requires_grad_(True)
    half = GLOBAL_QUERIES // 2
    per_worker_docs = half * DOCS_PER_QUERY
    my_queries = queries[rank * half:(rank + 1) * half]
    my_docs = docs[rank * per_worker_docs:(rank + 1) * per_worker_docs]
    my_ids = ids[rank * per_worker_docs:(rank + 1) * per_worker_docs]
    all_docs, all_ids, offset = gather_documents(_embed(weight, my_docs), my_ids)
    positive_column = torch.arange(half) + offset
    positives = [[all_ids[int(c)]] for c in positive_column]
    mask = false_negative_mask(all_ids, positive_column, positives)
    out = InfoNCELoss(0.05)(_embed(weight, my_queries), all_docs, positive_column, mask)
    local_loss = out.losses.mean()
    local_loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: average parameter gradients over workers
    grad /= 2
    loss = local_loss.detach().clone()
    dist.all_reduce(loss)
    results[rank] = (loss / 2, grad)
    dist.destroy_process_group()


def test_gathered_equals_single_process():
    from tests.conftest import free_port

    expected_loss, expected_grad = _single_process()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        loss, grad = results[rank]
        assert torch.allclose(loss, expected_loss, atol=1e-5)
        assert torch.allclose(grad, expected_grad, atol=1e-5)
