"""The ingress's logic apart from Serve: which shard holds which id (and so excludes, scores or
returns it), and the served version's metadata (with its encoder, for text queries). Per-shard
top-k lists merge with ``whetstone.index.merge.merge_topk``.

No Ray imports: the id routing is testable on its own.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from whetstone.config.base import StorageConfig
from whetstone.index.ann import AnnInputError, check_vectors
from whetstone.index.coarse import CoarseAssigner
from whetstone.index.snapshot import SnapshotManifest, shard_of, slot_version

# Kinds whose FAISS index keeps each document's full vector (so it can score or return it).
FULL_VECTOR_KINDS = ("flat", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")


@dataclass(eq=False)
class ServedVersion:
    """The manifest of the version the ingress pins searches to, and (lazily) its encoder and,
    for IVF kinds over several shards, its coarse quantizer (``whetstone.index.coarse``). A flip
    builds a new one, so a request that pinned this one finishes on it."""

    manifest: SnapshotManifest
    encoder_loader: Callable[[str], Any]
    _encoder: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    slot: int | None = 0  # the replica set holding it (blue/green); None: no set holds it yet
    assigner: CoarseAssigner | None = None
    assigner_due: float = 0.0  # monotonic time to ask the shards for it (again); inf: asked, or none

    @property
    def shares_cells(self) -> bool:
        """IVF over several shards: the ingress can find each query's cells once for all shards."""
        return self.kind in IVF_KINDS and self.manifest.num_shards > 1

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def embedded_step(self) -> int | None:
        """The training step whose checkpoint embedded this version (its manifest's ``extra.step``);
        None when the publisher did not record one."""
        step = self.manifest.extra.get("step")
        return int(step) if step is not None else None

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def check_vectors(self, rows, name: str) -> np.ndarray:
        """``rows`` as a (Q, D) float32 matrix of this index's dimension, finite, and (a cosine
        index: ``normalize``) no row all zeros: a zero vector has no direction to compare."""
        array = check_vectors(rows, self.dim, name)
        if self.manifest.config.get("normalize", True):
            zero = np.flatnonzero(~array.any(axis=1))
            if zero.size:
                raise AnnInputError(f"{name}[{int(zero[0])}] is all zeros ({zero.size} such rows): index "
                                    f"v{self.version} compares by cosine, and a zero vector has no direction")
        return array

    def require_full_vectors(self, what: str) -> None:
        """Refuse ``what`` (e.g. ``score_excluded``) on kinds that keep no full vectors."""
        if self.kind not in FULL_VECTOR_KINDS:
            raise AnnInputError(f"{what}: index v{self.version} is kind {self.kind!r}, which keeps no full "
                                f"vectors (only {' and '.join(FULL_VECTOR_KINDS)} do); it cannot score or return "
                                f"stored documents")

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (Q strings) with this version's encoder: (Q, D) float32 unit rows."""
        checkpoint = self.manifest.checkpoint
        if not checkpoint:
            raise AnnInputError(f"texts: index v{self.version} names no encoder checkpoint; send vectors")
        with self._lock:
            if self._encoder is None:
                try:
                    self._encoder = self.encoder_loader(checkpoint)
                except Exception as err:  # noqa: BLE001 - any load failure means "no text queries"
                    raise AnnInputError(f"texts: cannot load the encoder {checkpoint!r} of index "
                                        f"v{self.version} ({type(err).__name__}: {err}); send vectors") from None
            encoder = self._encoder
        vectors = encoder.encode(texts)
        if vectors.shape[1] != self.dim:
            raise AnnInputError(f"texts: encoder {checkpoint!r} gives dimension {vectors.shape[1]}, "
                                f"the index has {self.dim}")
        return vectors

    def describe(self) -> dict:
        m = self.manifest
        return {"version": m.version, "checkpoint": m.checkpoint, "size": m.count, "dim": m.dim,
                "kind": m.kind, "built_at": m.built_at, "cells_assigned_at_ingress": self.assigner is not None}


class EncoderCache:
    """Query encoders shared across versions built from the same checkpoint (the last ``keep``)."""

    def __init__(self, storage: StorageConfig | None, device: str | None, keep: int = 2) -> None:
        self.storage = storage
        self.device = device
        self.keep = keep
        self._encoders: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, checkpoint: str):
        with self._lock:
            if checkpoint in self._encoders:
                self._encoders.move_to_end(checkpoint)
                return self._encoders[checkpoint]
        from whetstone.models.encoder import Encoder

        # Texts sent to search are queries: an asymmetric model's query tower embeds them.
        encoder = Encoder.load_query(checkpoint, device=self.device, storage=self.storage)
        with self._lock:
            self._encoders[checkpoint] = encoder
            while len(self._encoders) > self.keep:
                self._encoders.popitem(last=False)
        return encoder


# ---------------------------------------------------------------- ids -> shards
def group_by_shard(ids: Sequence[str], num_shards: int) -> dict[int, np.ndarray]:
    """``{shard: positions in ids}`` for the shards that hold any of ``ids`` (ascending shard)."""
    if not len(ids):
        return {}
    shards = shard_of(list(ids), num_shards)
    order = np.argsort(shards, kind="stable")
    bounds = np.flatnonzero(np.diff(shards[order])) + 1
    return {int(shards[group[0]]): group for group in np.split(order, bounds)}


@dataclass
class SplitExcludes:
    """Each query's excluded ids split by the shard that holds them.

    ``per_shard[s]`` is Q lists (None when no query excludes anything there); ``where[q][j]`` is
    ``(shard, position in per_shard[shard][q])`` of query q's j-th excluded id.
    """

    per_shard: list[list[list[str]] | None]
    where: list[list[tuple[int, int]]]


def split_excludes(exclude_ids: Sequence[Sequence[str]] | None, count: int, num_shards: int) -> SplitExcludes:
    """Split ``exclude_ids`` (Q lists, or None) so each shard gets only the ids it holds: an id is
    excluded, and scored, where it lives."""
    if not exclude_ids or not any(exclude_ids):
        return SplitExcludes([None] * num_shards, [[] for _ in range(count)])
    flat = [doc for row in exclude_ids for doc in row]
    shards = shard_of(flat, num_shards).tolist()
    per_shard: list[list[list[str]]] = [[[] for _ in range(count)] for _ in range(num_shards)]
    where: list[list[tuple[int, int]]] = []
    position = 0
    for q, row in enumerate(exclude_ids):
        places = []
        for doc in row:
            shard = shards[position]
            position += 1
            places.append((shard, len(per_shard[shard][q])))
            per_shard[shard][q].append(doc)
        where.append(places)
    return SplitExcludes([rows if any(rows) else None for rows in per_shard], where)


def join_excluded_scores(split: SplitExcludes, answers: list[list[list[float | None]] | None]) -> list[list]:
    """Each query's excluded ids' scores in the caller's order, from the shards' answers."""
    return [[answers[shard][q][j] if answers[shard] is not None else None for shard, j in places]
            for q, places in enumerate(split.where)]


def gather_vectors(groups: dict[int, np.ndarray], answers: dict[int, np.ndarray], count: int,
                   dim: int) -> np.ndarray:
    """Put each shard's vectors back in the caller's order: (count, dim) float32."""
    out = np.empty((count, dim), np.float32)
    for shard, positions in groups.items():
        out[positions] = answers[shard]
    return out


def slot_holding(args: Any, version: int, num_sets: int) -> int | None:
    """The replica set holding ``version``: 0 with one set; blue/green: the set whose ``SLOT-n``
    names it, set 0 before any swap named either (it serves LATEST); None when neither does."""
    if num_sets == 1:
        return 0
    marks = [slot_version(args.index_uri, slot, args.storage) for slot in range(num_sets)]
    if version in marks:
        return marks.index(version)
    return 0 if all(mark is None for mark in marks) else None
