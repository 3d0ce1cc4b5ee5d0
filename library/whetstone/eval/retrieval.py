"""Retrieval metrics (trec_eval conventions) and exact-search evaluation of an embedding model.

Metrics take plain Python/numpy inputs and return floats:
- nDCG@k with linear gain (gain = graded relevance, as trec_eval and BEIR report it) and
  log2(rank + 1) discount; the ideal ranking is the qrels sorted by relevance.
- Recall@k: relevant documents (relevance > 0) found in the top k over all relevant documents.
Queries without any relevant document are skipped (as BEIR does).

Exact search never builds the dense queries x documents score matrix (4 GB per 100 queries at 10M
documents): :class:`RunningTopK` searches one document chunk at a time with FAISS (``faiss.knn``,
blocked inner products plus a heap) and merges each chunk's top k into a running top k, so memory
beyond one chunk is O(queries x k). The corpus can be arrays or a stream of ``(ids, vectors)``
chunks (e.g. ``whetstone.index.vector_chunks.iter_vector_chunks`` reading them from storage).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import faiss
import numpy as np

# Rows per chunk when the corpus is given as arrays: the chunk's ids become a (rows,) object array
# for the id lookup, so a chunk, not the corpus, bounds that copy.
DEFAULT_CHUNK_ROWS = 65536
# (ids, vectors) pieces of a corpus: ids (n,) strings, vectors (n, D) float32
DocChunks = Iterable[tuple[Sequence[str], np.ndarray]]


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


def doc_chunks(doc_ids: Sequence[str] | DocChunks, doc_vectors: np.ndarray | None = None,
               rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[Sequence[str], np.ndarray]]:
    """The corpus as ``(ids, vectors)`` chunks, whichever way it was given.

    Args:
        doc_ids, doc_vectors: (N,) ids and (N, D) vectors (cut into views of ``rows`` rows, no copy), or
            ``doc_vectors=None`` and ``doc_ids`` an iterable of ``(ids, vectors)`` chunks (passed on as is).
    """
    if doc_vectors is None:
        yield from doc_ids  # type: ignore[misc]
        return
    if len(doc_ids) != len(doc_vectors):
        raise ValueError(f"doc_ids: {len(doc_ids)} ids for {len(doc_vectors)} document vectors")
    for start in range(0, len(doc_ids), rows):
        yield doc_ids[start:start + rows], doc_vectors[start:start + rows]


class RunningTopK:
    """Exact top-k by inner product of fixed queries over documents that arrive in chunks.

    Equal scores rank the earlier document first (its position in the stream), exactly as a stable
    sort of the dense score row would. FAISS's heap may keep any of several documents tied at the
    k-th place, so each chunk is searched for k + 1: when the (k + 1)-th ties the k-th, that query's
    chunk is re-ranked by a stable sort (rare outside synthetic data). Memory: O(Q x k) plus FAISS's
    blocks over one chunk.

    Args:
        query_vectors: (Q, D) float32 (unit rows for cosine).
        k: results per query (fewer when the corpus is smaller).
    """

    def __init__(self, query_vectors: np.ndarray, k: int) -> None:
        if k < 1:
            raise ValueError(f"k: must be >= 1, got {k}")
        self.queries = np.ascontiguousarray(query_vectors, dtype=np.float32)  # (Q, D)
        if self.queries.ndim != 2:
            raise ValueError(f"query_vectors: expected shape (Q, D), got {self.queries.shape}")
        self.k = k
        count = self.queries.shape[0]
        self.scores = np.zeros((count, 0), dtype=np.float32)  # (Q, <=k) best first
        self.positions = np.zeros((count, 0), dtype=np.int64)  # (Q, <=k) position in the stream
        self.ids = np.zeros((count, 0), dtype=object)  # (Q, <=k) document ids
        self.seen = 0  # documents added so far

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Merge one chunk: ``ids`` (n,) and ``vectors`` (n, D), the next n documents of the stream."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, D)
        if vectors.ndim != 2 or vectors.shape[1] != self.queries.shape[1]:
            raise ValueError(f"document vectors: expected shape (n, {self.queries.shape[1]}) like the queries, "
                             f"got {vectors.shape} (documents {self.seen}..)")
        if len(ids) != len(vectors):
            raise ValueError(f"document chunk at {self.seen}: {len(ids)} ids for {len(vectors)} vectors")
        count, k = len(vectors), self.k
        if count == 0 or self.queries.shape[0] == 0:
            self.seen += count
            return
        fetch = min(k + 1, count)
        scores, labels = faiss.knn(self.queries, vectors, fetch, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, fetch)
        if fetch > k:
            tied = np.flatnonzero(scores[:, k] == scores[:, k - 1])
            scores, labels = scores[:, :k], labels[:, :k]
            if tied.size:
                scores[tied], labels[tied] = _stable_top(self.queries[tied], vectors, k)
        chunk_ids = np.asarray(list(ids), dtype=object)
        merged_scores = np.concatenate([self.scores, scores], axis=1)  # (Q, <=2k)
        merged_positions = np.concatenate([self.positions, labels + self.seen], axis=1)
        merged_ids = np.concatenate([self.ids, chunk_ids[labels]], axis=1)
        order = np.lexsort((merged_positions, -merged_scores), axis=-1)[:, :k]  # score desc, position asc
        self.scores = np.take_along_axis(merged_scores, order, axis=1)
        self.positions = np.take_along_axis(merged_positions, order, axis=1)
        self.ids = np.take_along_axis(merged_ids, order, axis=1)
        self.seen += count

    def rankings(self, query_ids: Sequence[str]) -> dict[str, list[str]]:
        """Query id -> its ranked document ids (best first)."""
        if len(query_ids) != self.queries.shape[0]:
            raise ValueError(f"query_ids: {len(query_ids)} ids for {self.queries.shape[0]} query vectors")
        return {qid: [str(doc_id) for doc_id in self.ids[row]] for row, qid in enumerate(query_ids)}


def _stable_top(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of a few queries over one chunk by a stable sort: ties keep the lower position."""
    scores = queries @ vectors.T  # (q, n), only the few tied queries
    labels = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (q, k)
    return np.take_along_axis(scores, labels, axis=1), labels.astype(np.int64)


def exact_rankings(
    query_ids: Sequence[str],
    query_vectors: np.ndarray,
    doc_ids: Sequence[str] | DocChunks,
    doc_vectors: np.ndarray | None = None,
    k: int = 100,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, list[str]]:
    """Top-k documents per query by inner product (cosine for unit vectors), exact.

    Ties rank the earlier document first. No dense (Q, N) matrix: see :class:`RunningTopK`.

    Args:
        query_vectors: (Q, D) float32.
        doc_ids, doc_vectors: the corpus, (N,) ids and (N, D) float32; or ``doc_vectors=None`` and
            ``doc_ids`` an iterable of ``(ids, vectors)`` chunks (consumed once).
        chunk_rows: rows per FAISS call when the corpus is given as arrays.
    """
    top = RunningTopK(query_vectors, k)
    for ids, vectors in doc_chunks(doc_ids, doc_vectors, chunk_rows):
        top.add(ids, vectors)
    return top.rankings(query_ids)


def evaluate_encoder(
    encoder,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    doc_ids: Sequence[str] | DocChunks,
    doc_vectors: np.ndarray | None,
    query_max_length: int,
    dims: Sequence[int] = (),
    batch_size: int = 64,
    per_query: bool = False,
) -> dict[str, Any]:
    """Encode ``queries`` with ``encoder`` and rank an already embedded corpus exactly.

    One path for every evaluation (the final report, each refresh, the benchmarks): only the
    queries are encoded here; the corpus vectors come from whoever embedded it. The corpus is read
    once, chunk by chunk, for every width together, so a stream from storage works.

    Args:
        encoder: a :class:`whetstone.models.encoder.Encoder` (anything with ``encode(texts,
            batch_size=, max_length=)`` returning unit-norm (Q, D) float32).
        queries: query id -> text.
        qrels: query id -> {doc id: graded relevance}.
        doc_ids, doc_vectors: the corpus, (N,) ids and (N, D) float32 unit rows; or ``doc_vectors=None``
            and ``doc_ids`` an iterable of ``(ids, vectors)`` chunks.
        dims: Matryoshka widths to report too (``<metric>_dim<d>``: both sides truncated to the
            first d coordinates and re-normalised); the full width is always reported.
        per_query: also return ``per_query_ndcg@10`` (query id -> nDCG@10, full width).

    Returns:
        ``ndcg@10``, ``recall@100``, ``mrr@10``, ``queries``, plus the per-width metrics (and
        ``per_query_ndcg@10`` when asked).
    """
    from whetstone.losses.matryoshka import truncate_embeddings

    query_ids = list(queries)
    vectors = encoder.encode([queries[q] for q in query_ids], batch_size=batch_size, max_length=query_max_length)
    full = vectors.shape[1]
    widths = sorted(set(dims) - {full}, reverse=True)
    tops = {full: RunningTopK(vectors, 100)}
    tops.update({dim: RunningTopK(truncate_embeddings(vectors, dim), 100) for dim in widths})
    for ids, chunk in doc_chunks(doc_ids, doc_vectors):
        for dim, top in tops.items():
            top.add(ids, chunk if dim == full else truncate_embeddings(chunk, dim))
    rankings = tops[full].rankings(query_ids)
    metrics: dict[str, Any] = evaluate_rankings(rankings, qrels)
    if per_query:
        metrics["per_query_ndcg@10"] = per_query_ndcg(rankings, qrels)
    for dim in widths:
        per_dim = evaluate_rankings(tops[dim].rankings(query_ids), qrels)
        metrics.update({f"{name}_dim{dim}": value for name, value in per_dim.items() if name != "queries"})
    return metrics
