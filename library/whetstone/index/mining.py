"""Turn index search results into hard negatives: rank window, false-negative margin, random mix.

The rules, applied per query in this order:
1. labelled positives never come back (the search excludes them by id);
2. keep the candidates ranked in ``[rank_start, rank_end)`` (rank 0 is the nearest): the very top
   ranks carry the most unlabelled positives ("Hard Negatives or False Negatives",
   arXiv 2209.05072), so skipping a few is the usual guard;
3. drop candidates scoring within a margin of the positive (when the positive's score is
   known): relative ``score > positive * (1 - relative_margin)``, absolute
   ``score > positive - absolute_margin``;
4. draw ``num_negatives`` from what is left, the top ones (``sampling="top"``) or uniformly
   (``sampling="random"``); top up with random corpus documents when too few are left
   (STAR's mix of hard and random negatives, arXiv 2104.08051), and count those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from whetstone.config.base import StrictModel


class MiningConfig(StrictModel):
    num_negatives: int = Field(1, ge=0, le=64, description="hard negatives per query")
    rank_start: int = Field(3, ge=0, description="first rank kept (0 = nearest)")
    rank_end: int = Field(30, ge=1, description="one past the last rank kept")
    sampling: Literal["top", "random"] = Field(
        "random", description="how the hard negatives are taken from the candidates left in the rank window: "
        "top (the nearest) or random (uniform, no repeats)")
    relative_margin: float | None = Field(
        None, ge=0, lt=1, description="false-negative guard: drop candidates scoring above the positive's "
        "score x (1 - this); needs that score (index.kind flat or hnsw)")
    absolute_margin: float | None = Field(
        None, ge=0, description="false-negative guard: drop candidates scoring above the positive's score "
        "minus this (cosine units); needs that score (index.kind flat or hnsw)")
    random_fraction: float = Field(0.0, ge=0, le=1, description="share of negatives drawn at random")

    @model_validator(mode="after")
    def _window(self) -> MiningConfig:
        if self.rank_end <= self.rank_start:
            raise ValueError(f"rank_end ({self.rank_end}) must exceed rank_start ({self.rank_start})")
        return self


@dataclass
class MinedNegatives:
    ids: list[list[str]]  # per query, exactly num_negatives ids
    from_index: int = 0  # negatives that came from the index
    random_fill: int = 0  # negatives drawn from the corpus at random
    dropped_by_margin: int = 0  # candidates dropped as likely false negatives
    candidates: int = 0  # candidates inside the rank window
    extra: dict = field(default_factory=dict)


def mine_negatives(
    candidate_ids: Sequence[Sequence[str]],
    candidate_scores: np.ndarray,
    config: MiningConfig,
    rng: np.random.Generator,
    random_pool: Sequence[str],
    positive_scores: Sequence[float] | None = None,
    exclude: Sequence[set[str]] | None = None,
) -> MinedNegatives:
    """Pick ``config.num_negatives`` negatives per query.

    Args:
        candidate_ids: per query, ids in rank order (positives already excluded).
        candidate_scores: (Q, K) scores aligned with candidate_ids.
        rng: the worker's generator (seeded, so runs repeat).
        random_pool: ids to draw random negatives from (the corpus).
        positive_scores: (Q,) score of each query's positive, for the margin rule.
        exclude: per query, ids that must never be chosen (labelled positives).
    """
    out = MinedNegatives(ids=[])
    n = config.num_negatives
    for row, ids in enumerate(candidate_ids):
        banned = exclude[row] if exclude is not None else set()
        window = [
            (doc_id, float(candidate_scores[row][rank]))
            for rank, doc_id in enumerate(ids[config.rank_start : config.rank_end], start=config.rank_start)
            if doc_id and doc_id not in banned
        ]
        out.candidates += len(window)
        if (positive_scores is not None and (config.relative_margin or config.absolute_margin)
                and np.isfinite(positive_scores[row])):
            limit = _margin_limit(float(positive_scores[row]), config)
            kept = [(d, s) for d, s in window if s <= limit]
            out.dropped_by_margin += len(window) - len(kept)
            window = kept
        n_random = int(round(n * config.random_fraction))
        n_hard = min(n - n_random, len(window))
        if config.sampling == "top":
            chosen = [d for d, _ in window[:n_hard]]
        else:
            picks = rng.choice(len(window), size=n_hard, replace=False) if n_hard else []
            chosen = [window[i][0] for i in sorted(picks)]
        out.from_index += len(chosen)
        fill = _random_ids(random_pool, n - len(chosen), rng, banned | set(chosen))
        out.random_fill += len(fill)
        out.ids.append(chosen + fill)
    return out


def _margin_limit(positive_score: float, config: MiningConfig) -> float:
    limits = []
    if config.relative_margin is not None:
        limits.append(positive_score * (1 - config.relative_margin))
    if config.absolute_margin is not None:
        limits.append(positive_score - config.absolute_margin)
    return min(limits)


def _random_ids(pool: Sequence[str], n: int, rng: np.random.Generator, banned: set[str]) -> list[str]:
    """``n`` distinct ids from ``pool`` outside ``banned``: rejection sampling, then an exact pass."""
    if n <= 0:
        return []
    if hasattr(pool, "ids_at"):  # a DocLookup: indexing is a call to a partition actor; draw in one batch
        return pool.sample_ids(n, rng, banned)
    chosen: list[str] = []
    taken = set(banned)
    for _ in range(20 * n):
        doc_id = pool[int(rng.integers(len(pool)))]
        if doc_id not in taken:
            taken.add(doc_id)
            chosen.append(doc_id)
            if len(chosen) == n:
                return chosen
    rest = [doc_id for doc_id in pool if doc_id not in taken]
    if len(rest) < n - len(chosen):
        raise ValueError(f"corpus of {len(pool)} documents is too small to draw {n} random negatives")
    picks = rng.choice(len(rest), size=n - len(chosen), replace=False)
    return chosen + [rest[i] for i in picks]
