"""Merge per-shard top-k results into one top-k, best first.

Each shard returns its own top-k for every query (``AnnIndex.search``: ids padded with ``""``,
scores with ``-inf``). The global top-k is among their union, so for the ``flat`` kind the
merge equals the unsharded index's result exactly. Ties keep the lower shard first (a stable
sort over shards in order), so the merge is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_topk(
    results: Sequence[tuple[Sequence[Sequence[str]], np.ndarray]], k: int | None = None
) -> tuple[list[list[str]], np.ndarray]:
    """Merge ``[(ids, scores) per shard, in shard order]`` into ``(ids, scores)`` of the best ``k``.

    Args:
        results: one ``(Q lists of ids, (Q, k_s) float32 scores)`` per shard.
        k: results per query (default: the widest shard answer).

    Returns:
        Q lists of k ids and a (Q, k) float32 array; ``""`` / ``-inf`` pad rows with fewer hits.
    """
    if not results:
        raise ValueError("merge_topk: no shard results to merge")
    queries = len(results[0][0])
    for shard, (ids, scores) in enumerate(results):
        scores = np.asarray(scores)
        if len(ids) != queries or scores.shape[0] != queries or scores.ndim != 2:
            raise ValueError(f"merge_topk: shard {shard} answered {len(ids)} id rows and scores of shape "
                             f"{scores.shape} for {queries} queries")
    k = k or max(np.asarray(scores).shape[1] for _, scores in results)
    scores = np.concatenate([np.asarray(s, dtype=np.float32) for _, s in results], axis=1)  # (Q, S*k_s)
    if not queries:
        return [], np.zeros((0, k), np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: lower shard first on ties
    out_scores = np.full((queries, k), -np.inf, dtype=np.float32)
    width = order.shape[1]
    out_scores[:, :width] = np.take_along_axis(scores, order, axis=1)
    out_ids: list[list[str]] = []
    for row in range(queries):
        flat = [doc_id for ids, _ in results for doc_id in ids[row]]
        picked = [flat[column] if out_scores[row, position] > -np.inf else ""
                  for position, column in enumerate(order[row].tolist())]
        out_ids.append(picked + [""] * (k - width))
    return out_ids, out_scores
