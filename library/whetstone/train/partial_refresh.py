"""Partial refresh (``refresh.fraction`` = f < 1): which documents each refresh re-embeds, and how
old the index's vectors are.

Policy, per refresh:

1. **A rotating slice**: the corpus is cut into R = ceil(1/f) slices by a hash of the id
   (``crc32(id, seed 0x5EED) % R``: independent of the shard hash, so every shard gets an even
   share of each slice); refresh r re-embeds slice ``r mod R``. Every document is re-embedded
   within R refreshes, whatever else happens.
2. **Plus the documents most recently served as hard negatives** (the training workers report the
   ids they mined), outside this refresh's slice, at most ``served_share * f * N`` of them: the
   negatives the model is learning from now get fresh vectors first (ANCE's own motivation: stale
   vectors make the hardest negatives wrong).

So one refresh embeds about f * N to (1 + served_share) * f * N documents. The new version's vector
chunks are the new vectors written after the chunks of the previous versions it still needs (a
builder keeps the last vector of an id); chunks written R or more refreshes ago are left out, as
every document in them has been re-embedded since.

Every chunk records the step whose checkpoint embedded it, and :class:`IndexAge` keeps, per slice,
the step it was last re-embedded at (plus the newer step of each served document since): the
share of vectors per checkpoint step and the oldest step are exact.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

SLICE_SEED = 0x5EED


def slice_of(ids: Sequence[str], slices: int) -> np.ndarray:
    """Each id's refresh slice: ``crc32(utf-8, SLICE_SEED) % slices`` (int64)."""
    crc = zlib.crc32
    return np.fromiter((crc(i.encode("utf-8"), SLICE_SEED) % slices for i in ids), dtype=np.int64, count=len(ids))


def slices_for(fraction: float) -> int:
    """R = ceil(1 / f): refresh slices, so every document is re-embedded within R refreshes."""
    if not 0 < fraction <= 1:
        raise ValueError(f"refresh.fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(1 / fraction - 1e-9))


class ServedNegatives:
    """The ids most recently mined as hard negatives (newest last), at most ``capacity`` kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._ids: OrderedDict[str, None] = OrderedDict()
        self.reported = 0

    def note(self, ids: Iterable[str]) -> None:
        for doc_id in ids:
            self.reported += 1
            self._ids.pop(doc_id, None)
            self._ids[doc_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def take(self, limit: int) -> list[str]:
        """The newest ``limit`` ids, removed (they are being re-embedded now)."""
        out = []
        while self._ids and len(out) < limit:
            out.append(self._ids.popitem(last=True)[0])
        return out

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class RefreshPlan:
    """What one refresh re-embeds: slice ``slice`` of ``slices``, plus ``served`` ids of other slices."""

    number: int  # 1 for the first refresh after the base embedding
    slice: int
    slices: int
    served: list[str]
    full: bool = False  # every document (fraction 1, or the first refresh of a resumed run)

    def selects(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids),) bool: which of ``ids`` this refresh re-embeds."""
        if self.full:
            return np.ones(len(ids), dtype=bool)
        chosen = slice_of(ids, self.slices) == self.slice
        if self.served:
            served = set(self.served)
            chosen |= np.fromiter((i in served for i in ids), dtype=bool, count=len(ids))
        return chosen


@dataclass
class IndexAge:
    """How old the served vectors are: per slice, the step it was last re-embedded at; served
    documents re-embedded since then at their own (newer) step."""

    slices: int
    slice_step: list[int]
    slice_docs: list[int]  # documents per slice (counted by the base embedding)
    served_step: dict[str, int] = field(default_factory=dict)  # id -> step, newer than its slice's

    @classmethod
    def base(cls, slices: int, slice_docs: list[int], step: int = 0) -> IndexAge:
        return cls(slices, [step] * slices, list(slice_docs))

    def refreshed(self, plan: RefreshPlan, step: int) -> None:
        if plan.full:
            self.slice_step = [step] * self.slices
            self.served_step.clear()
            return
        self.slice_step[plan.slice] = step
        for doc_id in [i for i in self.served_step if slice_of([i], self.slices)[0] == plan.slice]:
            del self.served_step[doc_id]
        served = slice_of(plan.served, self.slices) if plan.served else []
        for doc_id, part in zip(plan.served, served, strict=True):
            if part != plan.slice:
                self.served_step[doc_id] = step

    def shares(self) -> dict[int, float]:
        """Share of the corpus' vectors per embedding step (exact)."""
        total = max(sum(self.slice_docs), 1)
        counts: dict[int, int] = {}
        served_slices = slice_of(list(self.served_step), self.slices) if self.served_step else np.zeros(0, np.int64)
        served_per_slice = np.bincount(served_slices, minlength=self.slices)
        for part, step in enumerate(self.slice_step):
            counts[step] = counts.get(step, 0) + max(self.slice_docs[part] - int(served_per_slice[part]), 0)
        for step in self.served_step.values():
            counts[step] = counts.get(step, 0) + 1
        return {step: count / total for step, count in sorted(counts.items()) if count}

    def summary(self) -> dict:
        shares = self.shares()
        return {"oldest_step": min(shares) if shares else None, "newest_step": max(shares) if shares else None,
                "share_by_step": {str(step): round(share, 6) for step, share in shares.items()}}


class PartialRefreshPolicy:
    """Hands out each refresh's :class:`RefreshPlan` and keeps the index's age.

    Args:
        fraction: f; R = ceil(1/f) slices.
        corpus_size: N, for the served budget ``served_share * f * N``.
        slice_docs: documents per slice (from the base embedding), for exact age shares.
        resumed: the run resumed: its first refresh re-embeds everything (the ages are unknown).
    """

    def __init__(self, fraction: float, served_share: float, corpus_size: int, slice_docs: list[int],
                 resumed: bool = False) -> None:
        self.fraction = fraction
        self.slices = slices_for(fraction)
        self.served_budget = int(served_share * fraction * corpus_size) if self.slices > 1 else 0
        self.served = ServedNegatives(capacity=max(self.served_budget * 4, 1024))
        self.age = IndexAge.base(self.slices, slice_docs)
        self.refreshes = 0
        self.resumed = resumed

    def next_plan(self, full: bool = False) -> RefreshPlan:
        """The next refresh's plan; ``full``: re-embed everything (e.g. the previous version has no
        vector chunks to layer on)."""
        self.refreshes += 1
        full = full or self.slices == 1 or (self.resumed and self.refreshes == 1)
        part = (self.refreshes - 1) % self.slices
        served = [] if full else [i for i in self.served.take(self.served_budget)]
        return RefreshPlan(self.refreshes, part, self.slices, served, full)

    def done(self, plan: RefreshPlan, step: int) -> None:
        self.age.refreshed(plan, step)

    def expected_documents(self, plan: RefreshPlan) -> int:
        """About how many documents ``plan`` re-embeds (its slice plus the served ids; a served id in
        the slice counts twice), for the refresh's progress line and ETA."""
        if plan.full:
            return sum(self.age.slice_docs)
        return self.age.slice_docs[plan.slice] + len(plan.served)

    def abandon(self, plan: RefreshPlan) -> None:
        """A refresh that failed: its slice comes next again, its served ids go back in the queue."""
        if plan.number == self.refreshes:
            self.refreshes -= 1
        self.served.note(reversed(plan.served))
        self.served.reported -= len(plan.served)  # not reported again, only put back

    def keep_chunks_from(self) -> int:
        """Chunks written by refresh number w are still needed while w > refreshes - R (the base
        embedding is refresh 0)."""
        return self.refreshes - self.slices + 1


def count_slices(store_uri: str, storage, fraction: float) -> list[int]:
    """Documents per refresh slice, counted from the corpus' ids shard by shard (ids only, streamed)."""
    import pyarrow.parquet as pq

    from whetstone import storage as store
    from whetstone.data.store import read_manifest

    slices = slices_for(fraction)
    counts = np.zeros(slices, dtype=np.int64)
    for shard in read_manifest(store_uri, storage).dataset("corpus", store_uri).shards:
        where = store.resolve(store.join(store_uri, shard.path), storage)
        ids = pq.read_table(where.path, filesystem=where.filesystem, columns=["doc_id"]).column("doc_id").to_pylist()
        counts += np.bincount(slice_of(ids, slices), minlength=slices)
    return counts.tolist()


def layer_on_previous(policy: PartialRefreshPolicy, plan: RefreshPlan, step: int, embedded, vectors_at: str,
                      previous_at: str, storage) -> dict:
    """After a partial refresh wrote its new vectors at ``vectors_at``: layer them on the previous
    version's chunks that are still current (:func:`whetstone.index.vector_chunks.layered`), advance
    the index's age, and return what the version's manifest records (``extra``)."""
    from whetstone.index.vector_chunks import VectorChunkWriter, layered, read_vector_chunks

    new = embedded.manifest
    if plan.full:  # nothing to layer on: the new chunks are the whole corpus
        return {"partial": {"refresh": plan.number, "slice": plan.slice, "slices": plan.slices, "full": True,
                            "served_reembedded": 0, "served_reported": policy.served.reported,
                            "documents": embedded.rows},
                "age": IndexAge.base(policy.slices, policy.age.slice_docs, step).summary()}
    previous = read_vector_chunks(previous_at, storage)
    if new is None:  # nothing selected (a corpus smaller than the slices): an empty layer
        new = VectorChunkWriter(vectors_at, previous.dim, storage, num_shards=previous.num_shards, step=step,
                                refresh=plan.number).close()
    keep_from = max(0, policy.keep_chunks_from())
    if not plan.full:
        layered(new, vectors_at, previous, previous_at, keep_from, storage)
    age = copy.deepcopy(policy.age)  # the policy's own moves on once the version is served (policy.done)
    age.refreshed(plan, step)
    return {"partial": {"refresh": plan.number, "slice": plan.slice, "slices": plan.slices, "full": plan.full,
                        "served_reembedded": len(plan.served), "served_reported": policy.served.reported,
                        "documents": embedded.rows},
            "age": age.summary()}
