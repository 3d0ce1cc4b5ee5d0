"""A shard replica's versions, apart from Serve: which versions of its shard it holds, how it follows
LATEST and STAGED in storage, and how it applies a mutation to its shard.

Everything here runs in worker threads (``asyncio.to_thread``) of one shard replica; no Ray
imports, so the holding rules are testable on their own.

What a replica holds (``ShardHolder.held``, a dict replaced whole, never mutated in place, so a
search reading it never sees a half-made change):

- the version LATEST names (what searches are pinned to),
- the version STAGED names (phase 1 of a swap: loaded beside LATEST before any router flips),
- for ``grace_s`` (two poll intervals) after LATEST moved on, the previous LATEST, so that a
  router still pinned to it finishes its searches,
- a version it was just asked to stage or that it just wrote (a mutation), for ``keep_s``, until
  the swap publishes STAGED or LATEST for it.

Anything else is dropped on the next tick: memory holds the shard once, twice during a swap.
Loading a version whose shard entry has the same ``fingerprint`` as a held one reuses the object
in memory (a mutation that touched other shards costs this one nothing).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from whetstone.config.base import StorageConfig
from whetstone.index.ann import AnnIndex
from whetstone.index.shard_io import load_shard, save_shard
from whetstone.index.snapshot import (
    ShardEntry,
    SnapshotError,
    SnapshotManifest,
    latest_version,
    read_manifest,
    slot_version,
    staged_version,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ShardVersion:
    """One version of this replica's shard. Never mutated: a mutation builds a new one, so a search
    that pinned this one finishes on it. ``index`` may be shared by several versions (same
    ``fingerprint``); the version a search reports is ``version``, not ``index.version``."""

    version: int
    index: AnnIndex
    fingerprint: str
    count: int
    keep_until: float = math.inf  # when it may be dropped unless LATEST or STAGED names it


class ShardHolder:
    """The versions one replica of shard ``shard`` (of ``num_shards``) holds; see module docs.

    ``use_gpu`` places loaded shards on the GPU (True) or keeps them on CPU (False) whatever the
    snapshot's config says: the deployment, not the snapshot, decides whether the replica asked
    Ray for a GPU.

    Loads and mutations are serialised by a lock; searches never take it (they read ``held``).
    """

    def __init__(self, index_uri: str, storage: StorageConfig | None, shard: int, num_shards: int,
                 grace_s: float = 4.0, keep_s: float = 120.0, use_gpu: bool = False, slot: int | None = None) -> None:
        self.index_uri = index_uri
        self.storage = storage
        self.shard = shard
        self.num_shards = num_shards
        self.grace_s = grace_s
        self.keep_s = keep_s
        self.use_gpu = use_gpu
        self.slot = slot  # blue/green: the replica set this replica belongs to (None: one set)
        self.held: dict[int, ShardVersion] = {}
        self.latest: int | None = None  # LATEST as this replica last read it (and holds)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- reads (any thread)
    def get(self, version: int) -> ShardVersion | None:
        return self.held.get(version)

    def versions(self) -> list[int]:
        return sorted(self.held)

    @property
    def size(self) -> int:
        current = self.held.get(self.latest) if self.latest is not None else None
        return 0 if current is None else current.count

    # ---------------------------------------------------------------- loads
    def _manifest(self, version: int) -> SnapshotManifest:
        manifest = read_manifest(self.index_uri, version, self.storage)
        if manifest.num_shards != self.num_shards:
            raise SnapshotError(f"{self.index_uri}/v{version}: the snapshot has {manifest.num_shards} shards, "
                                f"the service was deployed with num_shards={self.num_shards}; redeploy with "
                                f"num_shards={manifest.num_shards} or rebuild the index")
        return manifest

    def _load(self, version: int, keep_until: float) -> ShardVersion:
        """Hold ``version`` (lock held): reuse a held object with the same fingerprint, else load."""
        held = self.held.get(version)
        if held is not None:
            if keep_until > held.keep_until:
                held.keep_until = keep_until
            return held
        manifest = self._manifest(version)
        entry = manifest.shards[self.shard]
        same = next((h for h in self.held.values() if h.fingerprint == entry.fingerprint), None)
        if same is not None:
            index = same.index
            logger.info("shard %d v%d: unchanged since v%d, reused in memory", self.shard, version, same.version)
        else:
            self._make_room()
            started = time.perf_counter()
            index = load_shard(self.index_uri, manifest, self.shard, self.storage, use_gpu=self.use_gpu)
            logger.info("shard %d v%d loaded (%d docs) in %.1fs", self.shard, version, index.size,
                        time.perf_counter() - started)
        loaded = ShardVersion(version, index, entry.fingerprint, int(index.size), keep_until)
        self.held = {**self.held, version: loaded}
        return loaded

    def _make_room(self) -> None:
        """Blue/green, before a load (lock held): drop every held version but LATEST. A set that
        takes a swap soon after it was released may still hold its old version (two swaps old now)
        in its grace; loading beside it would hold two versions in one process. A search still
        pinned to it gets ``version_unavailable`` and the ingress retries it on LATEST."""
        if self.slot is None:
            return
        latest = latest_version(self.index_uri, self.storage)
        keep = {v: h for v, h in self.held.items() if v == latest}
        if len(keep) != len(self.held):
            logger.info("shard %d (set %d): dropped v%s to load the next version", self.shard, self.slot,
                        sorted(set(self.held) - set(keep)))
            self.held = keep

    def stage(self, version: int) -> ShardVersion:
        """Load ``version`` beside what is held (phase 1 of a swap); kept ``keep_s`` at least."""
        with self._lock:
            return self._load(version, time.monotonic() + self.keep_s)

    def _wanted(self) -> tuple[int | None, int | None]:
        """``(the version to serve, one to hold beside it)`` as storage names them: LATEST and
        STAGED; in a blue/green replica set, its ``SLOT-{slot}`` (set 0 serves LATEST until the
        first swap names either set), and LATEST while it holds it."""
        root, storage = self.index_uri, self.storage
        if self.slot is None:
            return latest_version(root, storage), staged_version(root, storage)
        mine, latest = slot_version(root, self.slot, storage), latest_version(root, storage)
        if mine is None and self.slot == 0 and slot_version(root, 1, storage) is None:
            mine = latest
        # a mutation moves the serving set to v+1 before the flip: keep serving LATEST till then
        return mine, latest if latest != mine and latest in self.held else None

    def follow(self) -> list[int]:
        """One tick: hold LATEST and STAGED (a blue/green set: its slot's version) as storage names
        them, drop what nothing needs any more.

        Returns:
            The versions held afterwards.
        """
        with self._lock:
            latest, staged = self._wanted()
            now = time.monotonic()
            if latest is not None:
                self._load(latest, math.inf)
            if latest is not None or self.slot is not None:
                self.latest = latest
            if staged is not None and staged != latest:
                try:
                    self._load(staged, math.inf)
                except SnapshotError as err:  # a broken staged version must not stop LATEST
                    logger.warning("shard %d: cannot stage v%d: %s", self.shard, staged, err)
            needed = {latest, staged}
            for held in self.held.values():
                if held.version not in needed and held.keep_until == math.inf:
                    held.keep_until = now + self.grace_s  # was LATEST or STAGED, is not any more
            keep = {v: h for v, h in self.held.items() if v in needed or h.keep_until > now}
            if len(keep) != len(self.held):
                logger.info("shard %d: dropped v%s", self.shard, sorted(set(self.held) - set(keep)))
                self.held = keep
            return sorted(self.held)

    # ---------------------------------------------------------------- mutation
    def mutate(self, base_version: int, new_version: int, op: str, ids: list[str],
               vectors: np.ndarray | None) -> dict:
        """Apply an upsert or delete of ``ids`` (all of this shard) to ``base_version``, write the
        shard's files under ``v{new_version}`` and hold the result (kept ``keep_s``).

        Returns:
            ``{"entry": ShardEntry, "changed": n, "count": docs}``; when nothing changed (deleting
            ids this shard does not hold) ``entry`` is the base version's, and nothing is written.
        """
        with self._lock:
            base = self._load(base_version, time.monotonic() + self.keep_s)
            updated = base.index.copy()
            if op == "upsert":
                updated.add(vectors, ids)
                changed = len(ids)
            elif op == "delete":
                changed = updated.remove(ids)
            else:
                raise ValueError(f"op: {op!r} is not upsert or delete")
            if changed == 0:
                entry = self._manifest(base_version).shards[self.shard]
                return {"entry": entry, "changed": 0, "count": base.count}
            entry: ShardEntry = save_shard(updated, self.index_uri, new_version, self.shard, self.storage)
            result = ShardVersion(new_version, updated, entry.fingerprint, int(updated.size),
                                  time.monotonic() + self.keep_s)
            self.held = {**self.held, new_version: result}
            return {"entry": entry, "changed": changed, "count": result.count}
