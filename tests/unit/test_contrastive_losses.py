"""GIST masking, Matryoshka, decoupled softmax, CoSENT, label contrast and the Piccolo2 mix.

Every loss is checked against a reference written here with plain Python loops (or by hand),
never against itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from whetstone.losses.cosent import CoSENTLoss, cosent_loss_from_scores
from whetstone.losses.gist import GISTLoss, guide_scores_from_embeddings, guided_exclude_mask
from whetstone.losses.info_nce import InfoNCELoss, false_negative_mask
from whetstone.losses.label_contrast import LabelContrastLoss, sample_negative_labels
from whetstone.losses.matryoshka import MatryoshkaLoss, per_dimension_views, truncate_embeddings
from whetstone.losses.multi_positive import DecoupledSoftmaxLoss, decoupled_softmax_losses, positives_matrix
from whetstone.losses.multitask import MultiTaskLoss, TaskLossConfig, TaskScheduler, scheduled_task


def unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def reference_info_nce(q, d, positive_column, temperature, exclude=None) -> list[float]:
    """-log softmax at the positive over the kept cells, one Python loop per query."""
    losses = []
    for i in range(q.shape[0]):
        kept = [j for j in range(d.shape[0]) if exclude is None or not bool(exclude[i, j])]
        logits = {j: float(q[i] @ d[j]) / temperature for j in kept}
        log_z = math.log(sum(math.exp(value) for value in logits.values()))
        losses.append(log_z - logits[int(positive_column[i])])
    return losses


# --- GIST -------------------------------------------------------------------------------------


def test_gist_mask_by_hand_both_strategies():
    """Row 0: positive column 0 with guide score p = 0.9; candidates 0.7, 0.85, 0.5.
    absolute 0.1 -> threshold 0.8: 0.85 dropped.
    relative 0.1 -> threshold 0.9 - 0.09 = 0.81: 0.85 dropped.
    relative 0.05 -> threshold 0.855: nothing dropped; relative 0.5 -> 0.45: 0.7, 0.85, 0.5 dropped.
    Row 1: positive column 2, p = -0.2 (negative, so |p| matters); candidates -0.25, -0.1, -0.5.
    absolute 0.1 -> threshold -0.3: -0.25 and -0.1 dropped.
    relative 0.5 -> threshold -0.2 - 0.1 = -0.3: same; relative 0.1 -> -0.22 and relative 0.05
    -> -0.21: only -0.1 dropped.
    The positive itself (> its own threshold) is never dropped."""
    guide = torch.tensor([[0.9, 0.7, 0.85, 0.5], [-0.25, -0.1, -0.2, -0.5]])
    positive_column = torch.tensor([0, 2])
    positive = guide[torch.arange(2), positive_column]

    def mask(margin, strategy):
        return guided_exclude_mask(guide, positive, positive_column, margin, strategy).tolist()

    assert mask(0.1, "absolute") == [[False, False, True, False], [True, True, False, False]]
    assert mask(0.1, "relative") == [[False, False, True, False], [False, True, False, False]]
    assert mask(0.5, "relative") == [[False, True, True, True], [True, True, False, False]]
    assert mask(0.05, "relative") == [[False, False, False, False], [False, True, False, False]]


def test_gist_zero_margin_drops_only_strictly_higher():
    """p = 0.6 at column 1: 0.6 (a tie) stays, 0.61 is dropped, the positive stays."""
    guide = torch.tensor([[0.6, 0.6, 0.61, 0.2]])
    positive_column = torch.tensor([1])
    for strategy in ("absolute", "relative"):
        got = guided_exclude_mask(guide, guide[0, 1:2], positive_column, 0.0, strategy)
        assert got.tolist() == [[False, False, True, False]]


def test_gist_mask_matches_loop_reference():
    guide = unit(5, 7, seed=3) @ unit(5, 7, seed=4).T  # (5, 5) arbitrary scores in [-1, 1]
    positive_column = torch.tensor([4, 0, 3, 1, 2])
    positive = guide[torch.arange(5), positive_column]
    for strategy, margin in (("absolute", 0.15), ("relative", 0.3)):
        got = guided_exclude_mask(guide, positive, positive_column, margin, strategy)
        for i in range(5):
            p = float(positive[i])
            threshold = p - margin if strategy == "absolute" else p - abs(p) * margin
            for j in range(5):
                expected = j != int(positive_column[i]) and float(guide[i, j]) > threshold
                assert bool(got[i, j]) == expected, (strategy, i, j)


def test_gist_loss_is_info_nce_without_guide_dropped_and_excluded_cells():
    q, d = unit(3, 6, seed=5), unit(7, 6, seed=6)
    guide_q, guide_d = unit(3, 4, seed=7), unit(7, 4, seed=8)
    positive_column = torch.tensor([0, 1, 2])
    guide_scores, guide_positive = guide_scores_from_embeddings(guide_q, guide_d, positive_column)
    caller_mask = torch.zeros(3, 7, dtype=torch.bool)
    caller_mask[0, 5] = True
    loss = GISTLoss(guide_margin=0.05, margin_strategy="absolute", temperature=0.05)
    out = loss(q, d, positive_column, guide_scores, guide_positive, exclude_mask=caller_mask)
    guided = guided_exclude_mask(guide_scores, guide_positive, positive_column, 0.05, "absolute")
    assert guided.any(), "the example should drop something, or the test checks nothing"
    expected = reference_info_nce(q, d, positive_column, 0.05, guided | caller_mask)
    assert torch.allclose(out.losses, torch.tensor(expected), atol=1e-4)
    assert out.guide_masked_fraction == pytest.approx(float(guided.float().mean()))
    assert out.masked_fraction == pytest.approx(float((guided | caller_mask).float().mean()))
    # positive scores default from guide_scores when not passed
    again = loss(q, d, positive_column, guide_scores, exclude_mask=caller_mask)
    assert torch.allclose(again.losses, out.losses)


@pytest.mark.parametrize(("strategy", "margin"), [("absolute", 0.05), ("relative", 0.1)])
def test_gist_loss_matches_sentence_transformers_gist_embed(strategy, margin):
    """sentence-transformers' GISTEmbedLoss on (anchor, positive, negative) triplets with
    contrast_anchors = contrast_positives = False is InfoNCE over [positives, negatives] with the
    guide mask: the same as GISTLoss on doc_embeddings = cat(positives, negatives). Its model and
    guide are stand-in modules returning fixed embeddings (its forward only reads
    ``["sentence_embedding"]``); it is built without __init__, which demands real tokenizers."""
    from sentence_transformers.sentence_transformer.losses.gist_embed import GISTEmbedLoss
    from torch import nn

    class FixedEmbeddings(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, features):
            return {"sentence_embedding": self.table[features["row_ids"]]}

    batch = 4
    anchors = unit(batch, 6, seed=60)
    positives = F.normalize(anchors + 0.5 * unit(batch, 6, seed=62), dim=-1)
    model_table = torch.cat([anchors, positives, unit(batch, 6, seed=63)])  # anchors, positives, negatives
    # a guide that mostly agrees with the model, so the mask is partial
    guide_table = F.normalize(model_table[:, :5] + 0.3 * unit(3 * batch, 5, seed=61), dim=-1)
    reference = GISTEmbedLoss.__new__(GISTEmbedLoss)
    nn.Module.__init__(reference)
    reference.model, reference.guide = FixedEmbeddings(model_table), FixedEmbeddings(guide_table)
    reference.temperature, reference.margin_strategy, reference.margin = 0.05, strategy, margin
    reference.similarity_fct = nn.CosineSimilarity(dim=-1)
    reference.contrast_anchors = reference.contrast_positives = reference.gather_across_devices = False
    reference.cross_entropy_loss = nn.CrossEntropyLoss()
    reference.must_retokenize = False
    features = [{"row_ids": torch.arange(k * batch, (k + 1) * batch)} for k in range(3)]
    expected = reference(features, None)

    positive_column = torch.arange(batch)
    guide_scores, guide_positive = guide_scores_from_embeddings(
        guide_table[:batch], guide_table[batch:], positive_column
    )
    out = GISTLoss(margin, strategy, temperature=0.05)(
        model_table[:batch], model_table[batch:], positive_column, guide_scores, guide_positive
    )
    assert 0 < out.guide_masked_fraction < 0.75
    assert out.losses.mean().item() == pytest.approx(expected.item(), rel=1e-5)


def test_gist_bad_arguments():
    with pytest.raises(ValueError, match="margin_strategy"):
        GISTLoss(margin_strategy="percent")
    with pytest.raises(ValueError, match="guide_margin"):
        GISTLoss(guide_margin=-0.1)
    with pytest.raises(ValueError, match="guide_scores"):
        GISTLoss()(unit(2, 3, seed=0), unit(4, 3, seed=1), torch.tensor([0, 1]), torch.zeros(2, 3))


# --- Matryoshka -------------------------------------------------------------------------------


def test_matryoshka_one_full_dim_equals_base_loss():
    q, d = unit(4, 8, seed=10), unit(6, 8, seed=11)
    positive_column = torch.tensor([0, 1, 2, 3])
    base = InfoNCELoss(0.05)
    wrapped = MatryoshkaLoss(base, dims=[8], weights=[1.0])(q, d, positive_column)
    assert torch.allclose(wrapped.losses, base(q, d, positive_column).losses, atol=1e-6)
    assert torch.allclose(wrapped.positive_scores, base(q, d, positive_column).positive_scores, atol=1e-6)


def test_matryoshka_is_weighted_sum_over_truncated_renormalised_prefixes():
    q, d = unit(3, 8, seed=12), unit(5, 8, seed=13)
    positive_column = torch.tensor([2, 0, 1])
    exclude = torch.zeros(3, 5, dtype=torch.bool)
    exclude[1, 4] = True
    out = MatryoshkaLoss(InfoNCELoss(0.1), dims=[8, 4, 2], weights=[1.0, 0.5, 0.25])(
        q, d, positive_column, exclude
    )
    expected = [0.0, 0.0, 0.0]
    for dim, weight in ((8, 1.0), (4, 0.5), (2, 0.25)):
        # truncate and renormalise by hand
        qt = torch.stack([row[:dim] / math.sqrt(sum(float(x) ** 2 for x in row[:dim])) for row in q])
        dt = torch.stack([row[:dim] / math.sqrt(sum(float(x) ** 2 for x in row[:dim])) for row in d])
        per_dim = reference_info_nce(qt, dt, positive_column, 0.1, exclude)
        assert out.per_dim_mean_loss[dim] == pytest.approx(sum(per_dim) / 3, abs=1e-4)
        expected = [total + weight * value for total, value in zip(expected, per_dim, strict=True)]
    assert torch.allclose(out.losses, torch.tensor(expected), atol=1e-4)
    assert sorted(out.per_dim) == [2, 4, 8]


def test_matryoshka_gradient_reaches_all_coordinates_only_through_used_dims():
    """With dims [2] only the first 2 coordinates get gradient."""
    q = unit(2, 6, seed=14).requires_grad_(True)
    d = unit(2, 6, seed=15)
    MatryoshkaLoss(InfoNCELoss(0.1), dims=[2])(q, d, torch.tensor([0, 1])).losses.sum().backward()
    assert q.grad[:, :2].abs().sum() > 0
    assert torch.all(q.grad[:, 2:] == 0)


def test_truncate_embeddings_numpy_and_torch_agree():
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    view = truncate_embeddings(vectors, 2)
    assert np.allclose(view, [[0.6, 0.8], [0.0, 1.0]])  # (3, 4)/5 and (0, 2)/2
    torch_view = truncate_embeddings(torch.from_numpy(vectors), 2)
    assert np.allclose(torch_view.numpy(), view)
    views = per_dimension_views(vectors, [1, 3])
    assert np.allclose(views[1], [[1.0], [0.0]])  # zero prefix stays zero, no NaN
    assert np.allclose(np.linalg.norm(views[3], axis=1), 1.0)


def test_matryoshka_bad_arguments():
    with pytest.raises(ValueError, match="outside"):
        truncate_embeddings(np.ones((2, 4)), 5)
    with pytest.raises(ValueError, match="distinct"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4, 4])
    with pytest.raises(ValueError, match="weights"):
        MatryoshkaLoss(InfoNCELoss(), dims=[4, 2], weights=[1.0])
    with pytest.raises(ValueError, match=r"\[16\] exceed the embedding width 8"):
        MatryoshkaLoss(InfoNCELoss(), dims=[16, 4])(unit(2, 8, seed=0), unit(2, 8, seed=1), torch.tensor([0, 1]))


# --- decoupled softmax ------------------------------------------------------------------------


def test_decoupled_softmax_by_hand():
    """Temperature 1, one query, logits [1, 0.5, 0], positives {0, 1}, negative {2}:
    term 0 = -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.31326
    term 1 = -log(e^0.5 / (e^0.5 + e^0)) = log(1 + e^-0.5) = 0.47408
    loss = mean = 0.39367 (a joint softmax over all three would be higher: positives compete there)."""
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.0, 1.0]])  # cosines 1, 0.5, 0
    out = DecoupledSoftmaxLoss(temperature=1.0)(q, d, torch.tensor([[True, True, False]]))
    expected = 0.5 * (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-0.5)))
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert out.positive_scores.item() == pytest.approx(0.75)
    assert out.hardest_negative_scores.item() == pytest.approx(0.0, abs=1e-7)


def test_decoupled_softmax_equals_info_nce_with_one_positive():
    q, d = unit(4, 8, seed=20), unit(9, 8, seed=21)
    positive_column = torch.tensor([3, 0, 8, 5])
    positives = F.one_hot(positive_column, 9).bool()
    exclude = torch.zeros(4, 9, dtype=torch.bool)
    exclude[0, 1] = exclude[2, 7] = True
    ours = DecoupledSoftmaxLoss(0.05)(q, d, positives, exclude)
    info_nce = InfoNCELoss(0.05)(q, d, positive_column, exclude)
    assert torch.allclose(ours.losses, info_nce.losses, atol=1e-5)
    assert torch.allclose(ours.hardest_negative_scores, info_nce.hardest_negative_scores)


def test_decoupled_softmax_matches_loop_reference_with_excludes():
    q, d = unit(3, 5, seed=22), unit(8, 5, seed=23)
    positives = torch.zeros(3, 8, dtype=torch.bool)
    positives[0, [0, 3]] = True
    positives[1, [1]] = True
    positives[2, [2, 5, 6]] = True
    exclude = torch.zeros(3, 8, dtype=torch.bool)
    exclude[0, [4, 3]] = True  # 3 is a positive: stays a positive term
    exclude[2, 7] = True
    out = DecoupledSoftmaxLoss(0.1).from_scores(q @ d.T, positives, exclude)
    for i in range(3):
        logits = [float(q[i] @ d[j]) / 0.1 for j in range(8)]
        negatives = [j for j in range(8) if not positives[i, j] and not exclude[i, j]]
        negative_mass = sum(math.exp(logits[j]) for j in negatives)
        terms = [
            -math.log(math.exp(logits[p]) / (math.exp(logits[p]) + negative_mass))
            for p in range(8)
            if positives[i, p]
        ]
        assert out.losses[i].item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)


def test_decoupled_softmax_row_without_negatives_is_zero_with_finite_gradient():
    logits = torch.tensor([[2.0, 1.0], [0.5, -0.5]], requires_grad=True)
    positives = torch.tensor([[True, True], [True, False]])
    losses = decoupled_softmax_losses(logits, positives)
    assert losses[0].item() == 0.0
    assert losses[1].item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_decoupled_softmax_row_without_positive_is_named():
    with pytest.raises(ValueError, match=r"rows \[1\] have no positive"):
        decoupled_softmax_losses(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))


def test_positives_matrix_marks_duplicates():
    got = positives_matrix(["a", "b", "c", "a"], [["a", "c"], ["b"], ["zz"]])
    assert got.tolist() == [
        [True, False, True, True],
        [False, True, False, False],
        [False, False, False, False],
    ]
    # agrees with InfoNCE's false-negative mask on which extra cells are positives of a query
    mask = false_negative_mask(["a", "b", "c", "a"], torch.tensor([0, 1]), [["a", "c"], ["b"]])
    assert (mask | F.one_hot(torch.tensor([0, 1]), 4).bool()).tolist() == got[:2].tolist()


# --- CoSENT -----------------------------------------------------------------------------------


def test_cosent_by_hand():
    """cos [0.5, 0.2], labels [1, 0], temperature 1: the only ordered pair is (0, 1):
    L = log(1 + e^{0.2 - 0.5}) = log(1 + e^-0.3) = log(1.740818) = 0.554355."""
    out = CoSENTLoss(temperature=1.0).from_scores(torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.0]))
    assert out.losses.item() == pytest.approx(0.554355, abs=1e-5)
    assert out.ordered_pairs == 1 and out.concordance == 1.0
    flipped = CoSENTLoss(temperature=1.0).from_scores(torch.tensor([0.2, 0.5]), torch.tensor([1.0, 0.0]))
    assert flipped.losses.item() == pytest.approx(math.log(1 + math.exp(0.3)), abs=1e-5)
    assert flipped.concordance == 0.0


def test_cosent_matches_loop_reference_with_ties():
    scores = torch.tensor([0.9, 0.1, 0.4, 0.4, -0.3, 0.7])
    labels = torch.tensor([5.0, 1.0, 3.0, 3.0, 0.0, 3.0])  # ties in label must add nothing
    total = 1.0
    for i in range(6):
        for j in range(6):
            if labels[i] > labels[j]:
                total += math.exp(20.0 * (float(scores[j]) - float(scores[i])))
    got = cosent_loss_from_scores(scores, labels, scale=20.0)
    assert got.item() == pytest.approx(math.log(total), rel=1e-5)


def test_cosent_matches_sentence_transformers():
    from sentence_transformers.sentence_transformer.losses.cosent import CoSENTLoss as STCoSENT

    generator = torch.Generator().manual_seed(30)
    scores = torch.rand(12, generator=generator) * 2 - 1  # cosines in [-1, 1]
    labels = torch.randint(0, 4, (12,), generator=generator).float()  # graded, with ties
    # feed ST the cosines themselves: its similarity_fct returns the first column as is
    reference = STCoSENT(model=None, scale=20.0, similarity_fct=lambda first, _second: first)
    expected = reference.compute_loss_from_embeddings([scores, scores], labels)
    ours = CoSENTLoss(temperature=0.05).from_scores(scores, labels)
    assert ours.losses.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cosent_forward_uses_pair_cosines_and_trains_the_order():
    a = unit(4, 6, seed=31).requires_grad_(True)
    b = unit(4, 6, seed=32)
    labels = torch.tensor([3.0, 2.0, 1.0, 0.0])
    out = CoSENTLoss(0.05)(a, b, labels)
    expected = cosent_loss_from_scores((a * b).sum(dim=1), labels, 20.0)
    assert torch.allclose(out.losses, expected, atol=1e-5)
    out.losses.sum().backward()
    # the highest-labelled pair is pulled together: its gradient raises cos(a_0, b_0)
    assert float(a.grad[0] @ b[0]) < 0


# --- label contrast ---------------------------------------------------------------------------


def test_label_contrast_by_hand():
    """Text = e1, labels e1 (own), e2, temperature 1: loss = log(1 + e^{0 - 1}) = 0.31326."""
    labels_table = torch.eye(3)
    out = LabelContrastLoss(temperature=1.0)(
        torch.tensor([[1.0, 0.0, 0.0]]), labels_table, torch.tensor([0]), torch.tensor([[1, -1]])
    )
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert out.masked_fraction == pytest.approx(1 / 3)  # one padded cell of three


def test_label_contrast_matches_loop_reference_and_ignores_other_rows():
    texts, table = unit(3, 5, seed=40), unit(6, 5, seed=41)
    labels = torch.tensor([0, 4, 0])  # rows 0 and 2 share a label: no in-batch negatives, no issue
    negatives = torch.tensor([[1, 2, 3], [0, 5, -1], [5, -1, -1]])
    out = LabelContrastLoss(temperature=0.05)(texts, table, labels, negatives)
    for i in range(3):
        candidates = [int(labels[i])] + [int(n) for n in negatives[i] if n >= 0]
        logits = [float(texts[i] @ table[c]) / 0.05 for c in candidates]
        expected = math.log(sum(math.exp(x) for x in logits)) - logits[0]
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-4)


def test_sample_negative_labels_excludes_own_and_is_reproducible():
    labels = torch.tensor([0, 3, 7, 11, 11])
    first = sample_negative_labels(labels, 12, 10, torch.Generator().manual_seed(1))
    again = sample_negative_labels(labels, 12, 10, torch.Generator().manual_seed(1))
    assert first.shape == (5, 10) and torch.equal(first, again)
    for row, label in zip(first.tolist(), labels.tolist(), strict=True):
        assert label not in row and len(set(row)) == 10 and all(0 <= x < 12 for x in row)
    assert sample_negative_labels(torch.tensor([1]), 3, 10).shape == (1, 2)  # only 2 other labels


def test_label_contrast_refuses_own_label_as_negative():
    with pytest.raises(ValueError, match=r"rows \[1\] contain the row's own label"):
        LabelContrastLoss()(unit(2, 4, seed=0), unit(3, 4, seed=1), torch.tensor([0, 1]), torch.tensor([[1], [1]]))


# --- Piccolo2 multi-task ----------------------------------------------------------------------


def test_multitask_dispatches_with_piccolo2_defaults():
    loss = MultiTaskLoss.from_config(
        {
            "msmarco": {"kind": "retrieval"},
            "stsb": TaskLossConfig(kind="sts"),
            "tnews": {"kind": "classification"},
        }
    )
    assert loss.weights == {"msmarco": 1.0, "stsb": 0.04, "tnews": 0.2}
    q, d = unit(3, 6, seed=50), unit(5, 6, seed=51)
    positive_column = torch.tensor([0, 1, 2])
    retrieval = loss("msmarco", q, d, positive_column)
    assert retrieval.task == "msmarco"
    assert torch.allclose(retrieval.losses, torch.tensor(reference_info_nce(q, d, positive_column, 0.01)), atol=1e-3)
    labels = torch.tensor([1.0, 0.0, 2.0])
    sts = loss("stsb", q, d[:3], labels)
    assert torch.allclose(sts.losses, 0.04 * CoSENTLoss(0.05)(q, d[:3], labels).losses)
    negatives = torch.tensor([[1, 2], [0, 2], [0, 1]])
    cls = loss("tnews", q, d[:3], torch.tensor([0, 1, 2]), negatives)
    plain = LabelContrastLoss(0.05)(q, d[:3], torch.tensor([0, 1, 2]), negatives)
    assert torch.allclose(cls.losses, 0.2 * plain.losses)


def test_multitask_errors_name_the_task_or_field():
    loss = MultiTaskLoss({"a": InfoNCELoss()})
    with pytest.raises(ValueError, match="unknown task 'b'"):
        loss("b", unit(1, 2, seed=0), unit(1, 2, seed=0), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"without a loss: \['c'\]"):
        MultiTaskLoss({"a": InfoNCELoss()}, {"c": 1.0})
    with pytest.raises(ValidationError, match="temprature"):
        TaskLossConfig.model_validate({"kind": "sts", "temprature": 0.05})


def test_task_scheduler_is_a_pure_function_of_seed_and_step():
    one = TaskScheduler({"retrieval": 3, "sts": 1, "cls": 1}, seed=7)
    other_order = TaskScheduler({"cls": 1, "sts": 1, "retrieval": 3}, seed=7)  # another worker
    forward = one.schedule(0, 200)
    assert forward == other_order.schedule(0, 200)
    backward = [one.task_for_step(step) for step in reversed(range(200))][::-1]
    assert forward == backward  # no hidden state
    assert forward != TaskScheduler(one.weights, seed=8).schedule(0, 200)
    assert scheduled_task(5, 7, one.weights) == forward[5]


def test_task_scheduler_follows_dataset_sizes():
    scheduler = TaskScheduler.from_sizes({"big": 6000, "small": 2000}, seed=1)
    tasks = scheduler.schedule(0, 4000)
    share = tasks.count("big") / len(tasks)
    # binomial sd = sqrt(0.75 * 0.25 / 4000) = 0.0068: 0.03 is over 4 sd
    assert abs(share - 0.75) < 0.03
    flattened = TaskScheduler.from_sizes({"big": 9, "small": 1}, exponent=0.5)
    assert flattened.shares() == pytest.approx({"big": 0.75, "small": 0.25})
    with pytest.raises(ValueError, match=r"\['empty'\] have no examples"):
        TaskScheduler.from_sizes({"empty": 0, "x": 3})


def test_exploded_rows_with_the_jobs_mask_are_the_decoupled_softmax():
    """`loss.positives: all`: one row per (query, positive), each row's other labelled positives
    masked by false_negative_mask, InfoNCE per row. Summed per query this is exactly the decoupled
    softmax's sum over that query's positives (DecoupledSoftmaxLoss returns the mean)."""
    # Query A has positives a1, a2, a3; query B has b1. Columns: the rows' positives plus a negative.
    labelled = {"A": ["a1", "a2", "a3"], "B": ["b1"]}
    rows = [("A", "a1"), ("B", "b1"), ("A", "a2"), ("A", "a3")]
    doc_ids = [p for _, p in rows] + ["n1"]
    d = unit(len(doc_ids), 6, seed=31)
    query_vectors = {"A": unit(1, 6, seed=32)[0], "B": unit(1, 6, seed=33)[0]}
    q = torch.stack([query_vectors[qid] for qid, _ in rows])  # the same query, encoded per row
    positive_column = torch.arange(len(rows))
    mask = false_negative_mask(doc_ids, positive_column, [labelled[qid] for qid, _ in rows])
    per_row = InfoNCELoss(0.05)(q, d, positive_column, mask).losses  # (4,)

    positives = torch.tensor([[doc in labelled[qid] for doc in doc_ids] for qid in ("A", "B")])
    reference = DecoupledSoftmaxLoss(0.05)(torch.stack([query_vectors["A"], query_vectors["B"]]), d, positives)
    a_rows = [i for i, (qid, _) in enumerate(rows) if qid == "A"]
    assert per_row[a_rows].sum().item() == pytest.approx(3 * reference.losses[0].item(), abs=1e-5)
    assert per_row[1].item() == pytest.approx(reference.losses[1].item(), abs=1e-5)
