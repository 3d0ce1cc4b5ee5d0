"""Leakage guard: exact and near-duplicate eval prompts are flagged, distinct ones are not."""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.leakage import find_leaks, guard_prompts

TRAIN = {
    "t1": "How do I bake sourdough bread at home?",
    "t2": "What is the capital city of Australia?",
    "t3": "Can you recommend a good book about the history of Rome?",
    "t4": "How can I stop my dog from barking at night?",
}
EVAL = {
    "e-exact": "What is the capital city of Australia?",
    "e-near": "how do i bake sourdough bread at home",  # case and punctuation only
    "e-reworded": "Could you recommend a good book on the history of Rome?",
    "e-distinct1": "Explain how photosynthesis works in plants.",
    "e-distinct2": "What are the rules of ice hockey?",
}


@pytest.fixture(scope="module")
def minilm_report(minilm_dir):
    return guard_prompts(TRAIN, EVAL, str(minilm_dir), threshold=0.9)


def test_duplicates_and_near_duplicates_are_flagged(minilm_report):
    flagged = {m.eval_id: m for m in minilm_report.matches}
    assert set(flagged) == {"e-exact", "e-near", "e-reworded"}
    assert flagged["e-exact"].train_id == "t2" and flagged["e-exact"].cosine == pytest.approx(1.0, abs=1e-4)
    assert flagged["e-near"].train_id == "t1"
    assert flagged["e-reworded"].train_id == "t3"
    # highest cosine first
    assert [m.cosine for m in minilm_report.matches] == sorted((m.cosine for m in minilm_report.matches), reverse=True)


def test_report_counts(minilm_report):
    out = minilm_report.to_dict(max_examples=1)
    assert (out["train_prompts"], out["eval_prompts"], out["flagged"]) == (4, 5, 3)
    assert len(out["examples"]) == 1 and out["examples"][0]["eval_id"] == "e-exact"
    assert out["nearest_cosine_quantiles"]["p50"] <= out["nearest_cosine_quantiles"]["p99"] <= 1.0 + 1e-6


def test_threshold_one_keeps_only_exact_copies(minilm_dir):
    report = guard_prompts(TRAIN, EVAL, str(minilm_dir), threshold=1.0)
    assert report.flagged_eval_ids == ["e-exact"]


def test_custom_embedding_and_existing_index():
    """Any embedder and any searcher with AnnIndex's search() work; vectors are checked by hand."""
    basis = np.eye(4, dtype=np.float32)
    index = AnnIndex.build(basis, ["a", "b", "c", "d"], AnnConfig(kind="flat", use_gpu=False))
    queries = np.array([[1, 0.05, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0, -1]], dtype=np.float32)
    matches, best = find_leaks(["q-near-a", "q-between", "q-opposite"], queries, index, threshold=0.95)
    assert [(m.eval_id, m.train_id) for m in matches] == [("q-near-a", "a")]
    assert best[1] == pytest.approx(0.8, abs=1e-6)  # nearest is b at cosine 0.8: below the threshold


def test_repeated_prompts_are_embedded_once():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    guard_prompts({"a": "x", "b": "x", "c": "yy"}, {"e": "x", "f": "yy"}, embed, threshold=0.99)
    assert calls == [["x", "yy"], ["x", "yy"]]


def test_bad_arguments():
    index = AnnIndex.build(np.eye(2, dtype=np.float32), ["a", "b"], AnnConfig(kind="flat", use_gpu=False))
    with pytest.raises(ValueError, match="threshold"):
        find_leaks(["q"], np.ones((1, 2), np.float32), index, threshold=1.5)
    with pytest.raises(ValueError, match="eval_ids has 2 entries"):
        find_leaks(["q", "r"], np.ones((1, 2), np.float32), index, threshold=0.9)
