"""Leakage guard: eval prompts whose nearest train prompt is a near-duplicate.

Held-out preference pairs only measure generalisation if their prompts are not (near-)copies of
training prompts; hh-rlhf, for one, repeats many opening questions. The guard embeds every
prompt, indexes the train prompts and asks for each eval prompt's nearest train prompt; an eval
pair whose best cosine reaches ``threshold`` is flagged (and the job may drop it).

The search goes through anything with the index's ``search(vectors, k)``: an in-process
:class:`whetstone.index.ann.AnnIndex` (what the preference job uses: the guard is a one-shot
lookup before training, so deploying the Serve index for it would add start-up and a second copy
of the vectors for nothing) or an :class:`whetstone.index.client.IndexClient` talking to the
index service, for a train set already served there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LeakMatch:
    """An eval pair and its nearest train pair, by prompt cosine."""

    eval_id: str
    train_id: str
    cosine: float


@dataclass
class LeakageReport:
    """What the guard found.

    Attributes:
        threshold: cosine at or above which an eval prompt counts as leaked.
        train_count: train prompts indexed.
        eval_count: eval prompts checked.
        matches: flagged eval pairs with their nearest train pair, highest cosine first.
        nearest_cosine_quantiles: p50/p90/p99 of every eval prompt's best cosine (for choosing a threshold).
    """

    threshold: float
    train_count: int
    eval_count: int
    matches: list[LeakMatch] = field(default_factory=list)
    nearest_cosine_quantiles: dict[str, float] = field(default_factory=dict)

    @property
    def flagged_eval_ids(self) -> list[str]:
        return [m.eval_id for m in self.matches]

    def to_dict(self, max_examples: int = 20) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "train_prompts": self.train_count, "eval_prompts": self.eval_count,
            "flagged": len(self.matches), "nearest_cosine_quantiles": self.nearest_cosine_quantiles,
            "examples": [m.__dict__ for m in self.matches[:max_examples]],
        }


def _nearest(searcher: Any, vectors: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Adapt AnnIndex (tuple result) and IndexClient (SearchResult) to (ids, scores (Q, k))."""
    result = searcher.search(vectors, k)
    if isinstance(result, tuple):
        return result[0], np.asarray(result[1], dtype=np.float32)
    return result.ids, np.asarray(result.scores, dtype=np.float32)


def find_leaks(
    eval_ids: Sequence[str],
    eval_vectors: np.ndarray,
    searcher: Any,
    threshold: float,
    batch_size: int = 1024,
) -> tuple[list[LeakMatch], np.ndarray]:
    """Flag eval items whose nearest indexed train item has cosine >= threshold.

    Args:
        eval_ids: N eval ids, in the order of ``eval_vectors``.
        eval_vectors: (N, D) float32 embeddings (the searcher normalises, or they are unit-norm).
        searcher: an AnnIndex over the train items (ids = train ids) or an IndexClient.
        threshold: cosine in (0, 1].
        batch_size: queries per search call.

    Returns:
        (matches sorted by cosine, highest first; best cosine per eval item (N,) float32).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if len(eval_ids) != len(eval_vectors):
        raise ValueError(f"eval_ids has {len(eval_ids)} entries but eval_vectors {len(eval_vectors)} rows")
    best = np.full(len(eval_ids), -np.inf, dtype=np.float32)
    matches: list[LeakMatch] = []
    for start in range(0, len(eval_ids), batch_size):
        ids, scores = _nearest(searcher, np.ascontiguousarray(eval_vectors[start : start + batch_size]), 1)
        for row, (neighbours, score) in enumerate(zip(ids, scores[:, 0], strict=True)):
            best[start + row] = score
            # A tiny tolerance: identical texts embed to cosine 1 up to float rounding.
            if neighbours[0] and score >= threshold - 1e-6:
                matches.append(LeakMatch(eval_ids[start + row], neighbours[0], round(float(score), 6)))
    matches.sort(key=lambda m: -m.cosine)
    return matches, best


def _embed_unique(texts: Sequence[str], embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Embed each distinct text once (preference sets repeat prompts), then spread back: (N, D)."""
    unique = list(dict.fromkeys(texts))
    position = {text: i for i, text in enumerate(unique)}
    vectors = np.asarray(embed(unique), dtype=np.float32)
    return vectors[[position[t] for t in texts]]


def guard_prompts(
    train_prompts: Mapping[str, str],
    eval_prompts: Mapping[str, str],
    encoder: str | Callable[[list[str]], np.ndarray],
    threshold: float = 0.95,
    max_length: int = 128,
    batch_size: int = 64,
    searcher: Any = None,
) -> LeakageReport:
    """Embed prompts, index the train prompts (unless ``searcher`` is given) and flag eval leaks.

    Args:
        train_prompts: train pair id -> prompt text.
        eval_prompts: eval pair id -> prompt text.
        encoder: an encoder path / alias (loaded with :class:`whetstone.models.encoder.Encoder`), or
            a function texts -> (N, D) embeddings.
        threshold: cosine at or above which an eval prompt is flagged.
        max_length: prompt tokens embedded (the opening of the prompt).
        batch_size: texts per embedding batch.
        searcher: an existing index over the train prompts (AnnIndex or IndexClient); default: a
            flat in-process AnnIndex built here.

    Returns:
        A :class:`LeakageReport`.
    """
    from whetstone.index.ann import AnnConfig, AnnIndex

    if isinstance(encoder, str):
        from whetstone.models.encoder import Encoder

        model = Encoder.load(encoder, device="cpu")
        embed = lambda texts: model.encode(texts, batch_size=batch_size, max_length=max_length)  # noqa: E731
    else:
        embed = encoder
    eval_ids = list(eval_prompts)
    report = LeakageReport(threshold, len(train_prompts), len(eval_ids))
    if not eval_ids or not train_prompts:
        return report
    if searcher is None:
        train_ids = list(train_prompts)
        train_vectors = _embed_unique([train_prompts[i] for i in train_ids], embed)
        searcher = AnnIndex.build(train_vectors, train_ids, AnnConfig(kind="flat", use_gpu=False))
    eval_vectors = _embed_unique([eval_prompts[i] for i in eval_ids], embed)
    report.matches, best = find_leaks(eval_ids, eval_vectors, searcher, threshold)
    report.nearest_cosine_quantiles = {f"p{q}": round(float(np.quantile(best, q / 100)), 4) for q in (50, 90, 99)}
    return report
