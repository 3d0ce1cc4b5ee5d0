"""Exact evaluation search by FAISS over document chunks equals the dense (Q, N) score-matrix ranking.

The references below are the dense implementations the chunked search replaced: the one the
project shipped (argpartition, then a stable sort of the k picked) and a full stable sort (what
"ties rank the earlier document first" means).
"""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.eval.retrieval import RunningTopK, evaluate_encoder, exact_rankings


def dense_reference(query_vectors, doc_vectors, k):
    """The former ``exact_rankings``: (Q, N) scores, argpartition, stable sort of the top k."""
    scores = query_vectors @ doc_vectors.T  # (Q, N)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.arange(scores.shape[0])[:, None]
    order = np.argsort(-scores[rows, top], axis=1, kind="stable")
    return top[rows, order]


def stable_reference(query_vectors, doc_vectors, k):
    """Full stable sort of each score row: equal scores keep the lower document position first."""
    return np.argsort(-(query_vectors @ doc_vectors.T), axis=1, kind="stable")[:, :k]


def unit_rows(rng, count, dim):
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def as_rankings(query_ids, doc_ids, positions):
    return {qid: [doc_ids[j] for j in positions[i]] for i, qid in enumerate(query_ids)}


@pytest.mark.parametrize("chunk_rows", [1000, 97, 1])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_chunked_search_equals_the_dense_implementation_on_random_vectors(chunk_rows, k):
    rng = np.random.default_rng(7)
    queries, docs = unit_rows(rng, 37, 24), unit_rows(rng, 1000, 24)
    query_ids, doc_ids = [f"q{i}" for i in range(37)], [f"d{j}" for j in range(1000)]
    got = exact_rankings(query_ids, queries, doc_ids, docs, k=k, chunk_rows=chunk_rows)
    assert got == as_rankings(query_ids, doc_ids, dense_reference(queries, docs, k))
    assert all(len(ranked) == k for ranked in got.values())


@pytest.mark.parametrize("chunk_rows", [1000, 97])
def test_k_beyond_the_corpus_ranks_every_document(chunk_rows):
    # The whole order of 1000 documents: FAISS and numpy sum in different orders, so two scores
    # one float32 ulp apart may swap; any other difference is a bug.
    rng = np.random.default_rng(7)
    queries, docs = unit_rows(rng, 37, 24), unit_rows(rng, 1000, 24)
    top = RunningTopK(queries, 5000)
    for start in range(0, 1000, chunk_rows):
        top.add([f"d{j}" for j in range(start, min(start + chunk_rows, 1000))], docs[start:start + chunk_rows])
    reference = dense_reference(queries, docs, 5000)
    assert top.positions.shape == (37, 1000) and top.seen == 1000
    scores = queries @ docs.T
    rows = np.arange(37)[:, None]
    np.testing.assert_allclose(scores[rows, top.positions], scores[rows, reference], atol=1e-6)
    assert (top.positions != reference).mean() < 0.001


@pytest.mark.parametrize("chunk_rows", [500, 64, 7])
@pytest.mark.parametrize("k", [1, 5, 100])
def test_ties_rank_the_earlier_document_first(chunk_rows, k):
    # Coordinates in {-1, 0, 1}: every score is a small integer, computed exactly by any summation
    # order, and each query ties with dozens of documents at every score, the k-th place included.
    rng = np.random.default_rng(3)
    queries = rng.integers(-1, 2, (20, 6)).astype(np.float32)
    docs = rng.integers(-1, 2, (500, 6)).astype(np.float32)
    query_ids, doc_ids = [f"q{i}" for i in range(20)], [f"d{j}" for j in range(500)]
    expected = as_rankings(query_ids, doc_ids, stable_reference(queries, docs, k))
    assert exact_rankings(query_ids, queries, doc_ids, docs, k=k, chunk_rows=chunk_rows) == expected
    # the same corpus as a stream of uneven chunks (as read back from storage)
    bounds = [0, 3, 3, 150, 151, 420, 500]
    stream = ((doc_ids[a:b], docs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert exact_rankings(query_ids, queries, stream, k=k) == expected


def test_running_top_k_keeps_scores_and_stream_positions():
    top = RunningTopK(np.array([[1.0, 0.0]], dtype=np.float32), k=2)
    top.add(["a", "b"], np.array([[0.5, 0.0], [0.9, 0.0]], dtype=np.float32))
    top.add(["c"], np.array([[0.9, 1.0]], dtype=np.float32))  # ties b at 0.9, comes later
    assert top.rankings(["q"]) == {"q": ["b", "c"]}
    np.testing.assert_allclose(top.scores, [[0.9, 0.9]])
    assert top.positions.tolist() == [[1, 2]] and top.seen == 3
    with pytest.raises(ValueError, match=r"expected shape \(n, 2\)"):
        top.add(["x"], np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="2 ids for 1 vectors"):
        top.add(["x", "y"], np.zeros((1, 2), dtype=np.float32))


def test_empty_corpus_gives_empty_rankings():
    queries = np.eye(2, dtype=np.float32)
    assert exact_rankings(["a", "b"], queries, iter(())) == {"a": [], "b": []}


class _TableEncoder:
    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size, max_length):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def test_evaluate_encoder_reads_a_stream_once_for_every_matryoshka_width():
    rng = np.random.default_rng(11)
    docs = unit_rows(rng, 300, 16)
    doc_ids = [f"d{j}" for j in range(300)]
    texts = {f"q{i}": f"text {i}" for i in range(12)}
    encoder = _TableEncoder({f"text {i}": v for i, v in enumerate(unit_rows(rng, 12, 16))})
    qrels = {f"q{i}": {f"d{(7 * i) % 300}": 1, f"d{(11 * i + 5) % 300}": 2} for i in range(12)}
    from_arrays = evaluate_encoder(encoder, texts, qrels, doc_ids, docs, 32, dims=(8, 4), per_query=True)
    chunks = ((doc_ids[s:s + 40], docs[s:s + 40]) for s in range(0, 300, 40))  # a generator: one pass only
    from_stream = evaluate_encoder(encoder, texts, qrels, chunks, None, 32, dims=(8, 4), per_query=True)
    assert from_stream == from_arrays
    assert {"ndcg@10_dim8", "recall@100_dim4", "mrr@10_dim4"} <= set(from_arrays)
    assert from_arrays["recall@100"] > 0  # 100 of 300 documents: some relevant ones are found
