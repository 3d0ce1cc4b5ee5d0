"""Retrieval metrics (trec_eval conventions) and exact-search evaluation of an embedding model.

Metrics take plain Python/numpy inputs and return floats:
- nDCG@k with linear gain (gain = graded relevance, as trec_eval and BEIR report it) and
  log2(rank + 1) discount; the ideal ranking is the qrels sorted by relevance.
- Recall@k: relevant documents (relevance > 0) found in the top k over all relevant documents.
Queries without any relevant document are skipped (as BEIR does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def ndcg_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k of one ranking.

    Example: qrels {a: 1}, ranking [b, a]: DCG = 1/log2(3) = 0.631, IDCG = 1, nDCG = 0.631.
    """
    dcg = sum(
        qrels.get(doc_id, 0) / math.log2(rank + 2) for rank, doc_id in enumerate(ranked_ids[:k])
    )
    ideal = sorted((rel for rel in qrels.values() if rel > 0), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 2) for rank, rel in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 100) -> float:
    relevant = {doc_id for doc_id, rel in qrels.items() if rel > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked_ids[:k])) / len(relevant)


def mrr_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    for rank, doc_id in enumerate(ranked_ids[:k]):
        if qrels.get(doc_id, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def _judged(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Queries with a relevant document, each checked to have a ranking."""
    judged = [qid for qid, rels in qrels.items() if any(r > 0 for r in rels.values())]
    if not judged:
        raise ValueError("no query has a relevant document in qrels")
    missing = [qid for qid in judged if qid not in rankings]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no ranking, e.g. {missing[:3]}")
    return judged


def per_query_ndcg(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                   k: int = 10) -> dict[str, float]:
    """nDCG@k of every judged query (the ones :func:`evaluate_rankings` averages)."""
    return {q: ndcg_at_k(rankings[q], qrels[q], k) for q in _judged(rankings, qrels)}


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the queries that have relevant documents."""
    judged = _judged(rankings, qrels)
    return {
        "ndcg@10": float(np.mean([ndcg_at_k(rankings[q], qrels[q], 10) for q in judged])),
        "recall@100": float(np.mean([recall_at_k(rankings[q], qrels[q], 100) for q in judged])),
        "mrr@10": float(np.mean([mrr_at_k(rankings[q], qrels[q], 10) for q in judged])),
        "queries": float(len(judged)),
    }


def exact_rankings(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    doc_ids: Sequence[str],
    doc_vectors: np.ndarray,
    k: int = 100,
) -> dict[str, list[str]]:
    """Top-k documents per query by inner product (cosine for unit vectors), exact.

    Args:
        query_vectors: (Q, D) float32.
        doc_vectors: (N, D) float32.
    """
    scores = query_vectors @ doc_vectors.T  # (Q, N)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k) unordered
    rows = np.arange(scores.shape[0])[:, None]
    order = np.argsort(-scores[rows, top], axis=1, kind="stable")
    ranked = top[rows, order]  # (Q, k)
    return {qid: [doc_ids[j] for j in ranked[i]] for i, qid in enumerate(query_ids)}


def evaluate_encoder(
    encoder,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    doc_ids: Sequence[str],
    doc_vectors: np.ndarray,
    query_max_length: int,
    dims: Sequence[int] = (),
    batch_size: int = 64,
    per_query: bool = False,
) -> dict[str, Any]:
    """Encode ``queries`` with ``encoder`` and rank an already embedded corpus exactly.

    One path for every evaluation (the final report, each refresh, the benchmarks): only the
    queries are encoded here; the corpus vectors come from whoever embedded it.

    Args:
        encoder: a :class:`whetstone.models.encoder.Encoder` (anything with ``encode(texts,
            batch_size=, max_length=)`` returning unit-norm (Q, D) float32).
        queries: query id -> text.
        qrels: query id -> {doc id: graded relevance}.
        doc_ids, doc_vectors: the corpus, (N, D) float32, unit norm.
        dims: Matryoshka widths to report too (``<metric>_dim<d>``: both sides truncated to the
            first d coordinates and re-normalised); the full width is always reported.
        per_query: also return ``per_query_ndcg@10`` (query id -> nDCG@10, full width).

    Returns:
        ``ndcg@10``, ``recall@100``, ``mrr@10``, ``queries``, plus the per-width metrics (and
        ``per_query_ndcg@10`` when asked).
    """
    query_ids = list(queries)
    vectors = encoder.encode([queries[q] for q in query_ids], batch_size=batch_size, max_length=query_max_length)
    rankings = exact_rankings(query_ids, vectors, doc_ids, doc_vectors, k=100)
    metrics: dict[str, Any] = evaluate_rankings(rankings, qrels)
    if per_query:
        metrics["per_query_ndcg@10"] = per_query_ndcg(rankings, qrels)
    for dim in sorted(set(dims) - {vectors.shape[1]}, reverse=True):
        from whetstone.losses.matryoshka import truncate_embeddings

        per_dim = evaluate_rankings(exact_rankings(query_ids, truncate_embeddings(vectors, dim), doc_ids,
                                                   truncate_embeddings(doc_vectors, dim), k=100), qrels)
        metrics.update({f"{name}_dim{dim}": value for name, value in per_dim.items() if name != "queries"})
    return metrics
