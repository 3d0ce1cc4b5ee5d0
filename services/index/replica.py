"""A replica's state, apart from Serve: the current snapshot, how it changes, and its counters.

Everything here runs in worker threads (``asyncio.to_thread``) of one replica; no Ray imports, so
the swap and mutation rules are testable on their own.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from whetstone.config.base import StorageConfig
from whetstone.index.ann import (
    AnnIndex,
    AnnInputError,
    check_vectors,
    latest_version,
    list_versions,
    set_latest_version,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Snapshot:
    """One loaded index version and (lazily) the encoder its checkpoint names. Never mutated:
    a change builds a new Snapshot, so a search that pinned this one finishes on it."""

    index: AnnIndex
    encoder_loader: Callable[[str], Any]
    _encoder: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> int:
        return self.index.version

    def check_vectors(self, rows, name: str) -> np.ndarray:
        """``rows`` as a (Q, D) float32 matrix of this index's dimension, finite."""
        return check_vectors(rows, self.index.dim, name)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` (Q strings) with this version's encoder: (Q, D) float32 unit rows."""
        checkpoint = self.index.checkpoint
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
        if vectors.shape[1] != self.index.dim:
            raise AnnInputError(f"texts: encoder {checkpoint!r} gives dimension {vectors.shape[1]}, "
                                f"the index has {self.index.dim}")
        return vectors


class SnapshotHolder:
    """Holds the current :class:`Snapshot` and replaces it atomically (one attribute write).

    Loads, swaps and mutations are serialised by a lock; searches never take it.
    """

    def __init__(self, index_uri: str, storage: StorageConfig, encoder_device: str | None = None) -> None:
        self.index_uri = index_uri
        self.storage = storage
        self.encoder_device = encoder_device
        self.current: Snapshot | None = None
        self._lock = threading.Lock()
        self._encoders: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._encoders_lock = threading.Lock()

    @property
    def version(self) -> int | None:
        snapshot = self.current
        return None if snapshot is None else snapshot.version

    @property
    def size(self) -> int:
        snapshot = self.current
        return 0 if snapshot is None else snapshot.index.size

    def _load_encoder(self, checkpoint: str):
        """Encoders are shared across versions built from the same checkpoint (keep the last 2)."""
        with self._encoders_lock:
            if checkpoint in self._encoders:
                self._encoders.move_to_end(checkpoint)
                return self._encoders[checkpoint]
        from whetstone.models.encoder import Encoder

        encoder = Encoder.load(checkpoint, device=self.encoder_device, storage=self.storage)
        with self._encoders_lock:
            self._encoders[checkpoint] = encoder
            while len(self._encoders) > 2:
                self._encoders.popitem(last=False)
        return encoder

    def _install(self, index: AnnIndex) -> None:
        # The double-buffer swap: `index` is complete before this single reference assignment.
        previous = self.version
        self.current = Snapshot(index, self._load_encoder)
        logger.info("index swapped v%s -> v%s (%d docs)", previous, index.version, index.size)

    def load_latest_if_newer(self) -> int | None:
        """Follow LATEST: load and install it when it names another version. Returns the version."""
        with self._lock:
            latest = latest_version(self.index_uri, self.storage)
            if latest is not None and latest != self.version:
                self._install(AnnIndex.load(self.index_uri, latest, self.storage))
            return self.version

    def swap_to(self, version: int) -> None:
        """Load ``version`` (checksums verified), install it, then publish it as LATEST."""
        with self._lock:
            if version != self.version:
                self._install(AnnIndex.load(self.index_uri, version, self.storage))
            set_latest_version(self.index_uri, version, self.storage)

    def mutate(self, op: str, ids: list[str], vectors: np.ndarray | None) -> dict:
        """Apply an upsert or delete to a copy, publish it as version ``max + 1``, install it.

        Returns:
            ``{"version", "previous_version", "changed", "size"}``.

        Raises:
            SnapshotError: another writer published the same version first (retry).
        """
        with self._lock:
            # Start from what is published, not from a stale local copy (lost updates).
            latest = latest_version(self.index_uri, self.storage)
            if latest is not None and latest != self.version:
                self._install(AnnIndex.load(self.index_uri, latest, self.storage))
            current = self.current
            previous = current.version
            updated = current.index.copy()
            if op == "upsert":
                updated.add(vectors, ids)
                changed = len(ids)
            else:
                changed = updated.remove(ids)
            if changed == 0:
                return {"version": previous, "previous_version": previous, "changed": 0, "size": updated.size}
            version = max(list_versions(self.index_uri, self.storage) + [previous]) + 1
            updated.built_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            extra = {**current.index.extra, "parent_version": previous, "mutation": op}
            updated.save(self.index_uri, version, current.index.checkpoint or "", self.storage, extra)
            self._install(updated)
            return {"version": version, "previous_version": previous, "changed": changed, "size": updated.size}

    def describe(self) -> dict:
        snapshot = self.current
        if snapshot is None:
            return {"version": None, "checkpoint": None, "size": 0, "dim": None, "kind": None, "built_at": None}
        index = snapshot.index
        return {"version": index.version, "checkpoint": index.checkpoint, "size": index.size,
                "dim": index.dim, "kind": index.kind, "built_at": index.built_at}


def search_grouped(items: list[tuple]) -> list[tuple]:
    """Run batched requests, one FAISS search per pinned snapshot.

    Args:
        items: ``(snapshot, vectors (q_i, D), k_i, exclude_ids_i | None[, score_excluded_i])`` per
            request.

    Returns:
        ``(version, ids (q_i lists of k_i), scores (q_i, k_i), excluded scores or None)`` per
        request, in order.
    """
    results: list[tuple | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        groups.setdefault(id(item[0]), []).append(position)
    for positions in groups.values():
        snapshot = items[positions[0]][0]
        vectors = np.concatenate([items[p][1] for p in positions])  # (sum q_i, D)
        k_max = max(items[p][2] for p in positions)
        has_excludes = any(items[p][3] for p in positions)
        excludes = [row for p in positions for row in (items[p][3] or [[]] * len(items[p][1]))] \
            if has_excludes else None
        ids, scores = snapshot.index.search(vectors, k_max, exclude_ids=excludes)
        start = 0
        for p in positions:
            count, k = len(items[p][1]), items[p][2]
            rows = slice(start, start + count)
            wants_scores = len(items[p]) > 4 and items[p][4]
            excludes_p = items[p][3] or [[] for _ in range(count)]
            extra = snapshot.index.scores_for(items[p][1], excludes_p) if wants_scores else None
            results[p] = (snapshot.version, [row[:k] for row in ids[rows]], scores[rows, :k], extra)
            start += count
    return results


class StatsRecorder:
    """Query counts and recent search latencies of one replica, plus its Prometheus registry."""

    def __init__(self, replica_id: str, window: int = 4096) -> None:
        self.requests_total = 0
        self.queries_total = 0
        self.errors_total = 0
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.registry = CollectorRegistry()
        labels = {"replica": replica_id}
        self._requests = Counter("whetstone_index_search_requests", "search requests", registry=self.registry)
        self._queries = Counter("whetstone_index_search_queries", "query vectors searched", registry=self.registry)
        self._errors = Counter("whetstone_index_http_errors", "HTTP responses >= 400", ["path", "status"],
                               registry=self.registry)
        self._latency = Histogram("whetstone_index_search_latency_seconds", "search latency in the replica",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
                                  registry=self.registry)
        self._version = Gauge("whetstone_index_version", "loaded index version", list(labels),
                              registry=self.registry).labels(**labels)
        self._size = Gauge("whetstone_index_size", "documents in the loaded index", list(labels),
                           registry=self.registry).labels(**labels)

    def searched(self, queries: int, latency_ms: float) -> None:
        self.requests_total += 1
        self.queries_total += queries
        self._latencies_ms.append(latency_ms)
        self._requests.inc()
        self._queries.inc(queries)
        self._latency.observe(latency_ms / 1000)

    def error(self, path: str, status: int) -> None:
        self.errors_total += 1
        self._errors.labels(path=path, status=str(status)).inc()

    def summary(self) -> dict:
        latencies = np.asarray(self._latencies_ms, dtype=np.float64)
        p50, p95, p99 = (np.percentile(latencies, [50, 95, 99]).tolist() if len(latencies) else (None,) * 3)
        return {"requests_total": self.requests_total, "queries_total": self.queries_total,
                "errors_total": self.errors_total, "latency_ms_p50": p50, "latency_ms_p95": p95,
                "latency_ms_p99": p99}

    def prometheus(self, version: int | None, size: int) -> tuple[bytes, str]:
        self._version.set(-1 if version is None else version)
        self._size.set(size)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
