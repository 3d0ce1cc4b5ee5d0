"""Asymmetric dual encoder (encoder.query_tower=frozen): a frozen query tower beside a trained
document tower; how it is saved, loaded, merged and validated."""

from __future__ import annotations

import pytest
import torch
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.models.encoder import QUERY_TOWER, Encoder
from whetstone.models.merge import merge_with_base
from whetstone.train.contrastive import DualEncoder


def _batch(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=generator)
    ids = torch.randint(1000, 2000, (rows, width), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@torch.no_grad()
def _perturb(encoder: Encoder) -> None:
    """Make two towers differ: seeded noise on every weight (a constant shift would vanish in LayerNorm)."""
    generator = torch.Generator().manual_seed(0)
    for param in encoder.transformer.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_frozen_query_tower_embeds_queries_and_only_the_document_tower_learns(tiny_encoder_dir):
    docs_tower, query_tower = Encoder.load(str(tiny_encoder_dir)), Encoder.load(str(tiny_encoder_dir))
    query_before = {n: p.detach().clone() for n, p in query_tower.named_parameters()}
    dual = DualEncoder(docs_tower, 4, query_encoder=query_tower).train()
    assert docs_tower.training and not any(m.training for m in query_tower.modules())  # no dropout on queries
    queries, docs = _batch(6, 10, seed=1), _batch(9, 30, seed=2)

    q, d = dual(*queries, *docs)
    assert not q.requires_grad and d.requires_grad
    with torch.no_grad():  # queries come from the query tower, chunked like the documents
        assert torch.allclose(q, query_tower(*queries), atol=1e-5)
    optimiser = torch.optim.SGD([p for p in dual.parameters() if p.requires_grad], lr=1.0)
    assert len(optimiser.param_groups[0]["params"]) == sum(1 for p in docs_tower.parameters() if p.requires_grad)
    (q @ d.T).logsumexp(dim=1).mean().backward()
    assert all(p.grad is None for p in query_tower.parameters())
    optimiser.step()
    assert all(torch.equal(p, query_before[n]) for n, p in query_tower.named_parameters())
    with torch.no_grad():
        assert not torch.allclose(dual(*queries, *docs)[1], d.detach())  # the document tower moved


def test_save_with_query_tower_loads_each_tower_and_falls_back_without_one(tiny_encoder_dir, tmp_path):
    docs_tower, query_tower = Encoder.load(str(tiny_encoder_dir)), Encoder.load(str(tiny_encoder_dir))
    _perturb(docs_tower)
    docs_tower.save(tmp_path / "asym", query_tower=query_tower)
    docs_tower.save(tmp_path / "sym")
    texts = ["a claim about proteins", "another one"]
    assert (tmp_path / "asym" / QUERY_TOWER / "config.json").is_file()
    assert not (tmp_path / "sym" / QUERY_TOWER).exists()
    asym_docs, asym_queries = Encoder.load(tmp_path / "asym"), Encoder.load_query(tmp_path / "asym")
    assert torch.allclose(torch.from_numpy(asym_docs.encode(texts)), torch.from_numpy(docs_tower.encode(texts)),
                          atol=1e-5)
    assert torch.allclose(torch.from_numpy(asym_queries.encode(texts)),
                          torch.from_numpy(query_tower.encode(texts)), atol=1e-5)
    assert not torch.allclose(torch.from_numpy(asym_docs.encode(texts)), torch.from_numpy(asym_queries.encode(texts)),
                              atol=1e-3)
    # A symmetric model is its own query tower.
    sym_queries = Encoder.load_query(tmp_path / "sym")
    assert torch.allclose(torch.from_numpy(sym_queries.encode(texts)), torch.from_numpy(docs_tower.encode(texts)),
                          atol=1e-5)
    # Both towers load in sentence-transformers as they are.
    from sentence_transformers import SentenceTransformer

    st_queries = SentenceTransformer(str(tmp_path / "asym" / QUERY_TOWER), device="cpu").encode(texts)
    assert torch.allclose(torch.from_numpy(st_queries), torch.from_numpy(query_tower.encode(texts)), atol=1e-4)


def test_merge_keeps_the_frozen_query_tower(tiny_encoder_dir, tmp_path):
    docs_tower, query_tower = Encoder.load(str(tiny_encoder_dir)), Encoder.load(str(tiny_encoder_dir))
    _perturb(docs_tower)
    docs_tower.save(tmp_path / "tuned", query_tower=query_tower)
    merged = merge_with_base(str(tmp_path / "tuned"), str(tiny_encoder_dir), 0.5, str(tmp_path / "merged"))
    texts = ["a query"]
    assert torch.allclose(torch.from_numpy(Encoder.load_query(merged).encode(texts)),
                          torch.from_numpy(query_tower.encode(texts)), atol=1e-5)
    assert not torch.allclose(torch.from_numpy(Encoder.load(merged).encode(texts)),
                              torch.from_numpy(query_tower.encode(texts)), atol=1e-3)  # the merged document tower


def test_frozen_query_tower_refuses_multitask():
    with pytest.raises(ValueError, match="query_tower=frozen does not combine with multitask"):
        ContrastiveJobConfig.model_validate({
            "encoder": {"query_tower": "frozen"},
            "multitask": {"tasks": [{"name": "sts", "kind": "sts", "data": "x.jsonl", "share": 1.0}]},
        })
