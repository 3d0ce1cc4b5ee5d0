"""A FAISS index with string document ids, per-query exclusions and versioned snapshots.

This module knows nothing about Ray: the Serve deployment (``services/index``), the refresh job
and the benchmarks all use it in-process. An :class:`AnnIndex` is one whole index or one shard
of a sharded one (``whetstone.index.shard_io``, ``whetstone.index.build``).

Index kinds and their knobs are in :mod:`whetstone.index.faiss_kinds` (:class:`AnnConfig`:
``flat``, ``hnsw``, ``ivf``, ``ivfpq``). Document ids are strings; FAISS only knows int64
*labels*, so the wrapper keeps an :class:`~whetstone.index.idmap.IdMap` (numpy arrays, no
per-id Python objects). ``flat`` and ``ivf*`` remove vectors natively; FAISS's HNSW cannot, so
removed HNSW labels become tombstones (an int64 array) that a search-time ``IDSelector`` skips,
and the graph is rebuilt from the stored vectors once tombstones exceed a quarter of it.

Snapshots are format 2 (``whetstone.index.snapshot``): :meth:`AnnIndex.save` writes a 1-shard
snapshot whose files stream through checksummed chunks; :meth:`AnnIndex.load` reads one back.
Readers follow ``LATEST``, so a snapshot is visible only after all its files are in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import faiss
import numpy as np

from whetstone.config.base import StorageConfig
from whetstone.index.coarse import Assignment, CoarseAssigner, search_preassigned
from whetstone.index.faiss_kinds import (
    AnnConfig,
    AnnInputError,
    check_vectors,
    make_faiss,
    maybe_to_gpu,
    on_gpu,
)
from whetstone.index.idmap import IdMap
from whetstone.index.shard_files import read_shard_files, write_shard_files
from whetstone.index.snapshot import (
    DEFAULT_CHUNK_BYTES,
    IDS_FILE,
    INDEX_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    SnapshotConflict,
    SnapshotError,
    SnapshotManifest,
    SnapshotNotFound,
    latest_version,
    list_versions,
    manifest_exists,
    publish_manifest,
    read_manifest,
    set_latest_version,
    snapshot_path,
)

# The snapshot functions are part of this module's API (callers import them from here).
__all__ = [
    "AnnConfig", "AnnIndex", "AnnInputError", "SnapshotError", "SnapshotNotFound", "SnapshotConflict",
    "check_vectors", "latest_version", "list_versions", "read_manifest", "set_latest_version", "snapshot_path",
    "LATEST_FILE", "MANIFEST_FILE", "INDEX_FILE", "IDS_FILE",
]

logger = logging.getLogger(__name__)

# HNSW graphs are rebuilt once this share of their labels are tombstones (search quality and
# speed degrade as the selector filters more of the visited nodes).
HNSW_REBUILD_FRACTION = 0.25


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _valid_ids(ids: Sequence[Any]) -> list[str]:
    """The ids that can name a document (non-empty strings); others can match nothing."""
    return [doc_id for doc_id in ids if isinstance(doc_id, str) and doc_id]


class AnnIndex:
    """A FAISS index over string ids. Build with :meth:`build`, :meth:`create` + :meth:`add`, or :meth:`load`.

    Not safe for concurrent mutation: the index service mutates a :meth:`copy` and swaps it in,
    so searches (which FAISS runs thread-safely) never see a half-applied change.
    """

    def __init__(self, index: faiss.Index, config: AnnConfig, dim: int, idmap: IdMap | None = None) -> None:
        self._index = index
        self.config = config
        self.dim = dim
        self.idmap = idmap if idmap is not None else IdMap()
        # HNSW keeps removed labels in its graph: every dead label is a tombstone.
        self._tombstones = self.idmap.dead_labels() if config.kind == "hnsw" else np.zeros(0, np.int64)
        self._selector: tuple[Any, Any] | None = None  # (IDSelectorNot, its batch), built on demand
        self._assigner: CoarseAssigner | None = None  # IVF: the quantizer apart, built on demand
        self.version: int | None = None
        self.checkpoint: str | None = None
        self.built_at: str | None = None
        self.extra: dict[str, Any] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls, dim: int, config: AnnConfig | None = None, train: np.ndarray | None = None, count: int | None = None
    ) -> AnnIndex:
        """An empty index of dimension ``dim``; IVF kinds are trained on ``train`` first.

        Args:
            train: (T, D) rows for IVF training (at most ``64 * nlist`` are used, sampled with a
                seeded rng); ignored by ``flat`` and ``hnsw``.
            count: how many rows the index will hold, for the automatic ``nlist`` (default T).
        """
        config = config or AnnConfig()
        if train is not None:
            train = check_vectors(train, dim, "vectors")
        index = cls(maybe_to_gpu(make_faiss(dim, config, train, count), config), config, dim)
        index.built_at = _now()
        return index

    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], config: AnnConfig | None = None) -> AnnIndex:
        """Build an index from ``vectors`` (N, D) float32 named by ``ids`` (N strings).

        IVF kinds train their cells on these vectors, so they need at least ``nlist`` of them
        (``ivfpq``: also at least ``2**pq_nbits``). ``flat`` and ``hnsw`` accept N = 0.
        """
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise AnnInputError(f"vectors: expected shape (N, D) with D >= 1, got {array.shape}")
        array = check_vectors(array, None, "vectors")
        config = config or AnnConfig()
        index = cls(maybe_to_gpu(make_faiss(array.shape[1], config, array), config), config, array.shape[1])
        index.built_at = _now()
        index._add_checked(array, ids)
        return index

    def copy(self) -> AnnIndex:
        """A deep copy (FAISS index and id map) that can be mutated while this one serves."""
        clone = AnnIndex(maybe_to_gpu(faiss.clone_index(self._cpu_index()), self.config),
                         self.config, self.dim, self.idmap.copy())
        clone.version, clone.checkpoint, clone.built_at = self.version, self.checkpoint, self.built_at
        clone.extra = dict(self.extra)
        return clone

    def _cpu_index(self) -> faiss.Index:
        """The index on the CPU (serialisation and cloning need it); GPU indexes are copied back."""
        return faiss.index_gpu_to_cpu(self._index) if on_gpu(self.config) else self._index

    # ----------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Number of live (searchable) documents."""
        return len(self.idmap)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def faiss_index(self) -> faiss.Index:
        """The FAISS index itself (labels are ``idmap`` labels); for callers that tune or measure it."""
        return self._index

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.idmap

    def __repr__(self) -> str:
        return f"AnnIndex(kind={self.kind}, dim={self.dim}, size={self.size}, version={self.version})"

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Add ``vectors`` (N, D) under ``ids`` (N); an id already present is replaced (upsert)."""
        self._add_checked(check_vectors(vectors, self.dim, "vectors"), ids)

    def _add_checked(self, array: np.ndarray, ids: Sequence[str]) -> None:
        """Add a checked float32 copy (normalised in place here)."""
        if len(ids) != array.shape[0]:
            raise AnnInputError(f"ids: {len(ids)} ids for {array.shape[0]} vectors")
        if not len(ids):
            return
        labels, replaced = self.idmap.upsert(ids)
        if replaced.size:
            self._drop_labels(replaced)
        if self.config.normalize:
            faiss.normalize_L2(array)
        if self.kind == "hnsw":
            # HNSW labels are positions in insertion order; they must stay in step with ours.
            assert self._index.ntotal == int(labels[0]), "HNSW labels out of step with the id map"
            self._index.add(array)
        else:
            self._index.add_with_ids(array, labels)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the documents named by ``ids``; unknown ids are ignored. Returns how many went."""
        labels = self.idmap.labels_of(_valid_ids(ids))
        labels = np.unique(labels[labels >= 0])
        if not labels.size:
            return 0
        self.idmap.remove_labels(labels)
        self._drop_labels(labels)
        return int(labels.size)

    def _drop_labels(self, labels: np.ndarray) -> None:
        """Take labels the id map has just retired out of FAISS (HNSW: tombstone them)."""
        if self.kind == "hnsw":
            self._tombstones = np.union1d(self._tombstones, labels).astype(np.int64)
            self._selector = None
            if self._tombstones.size > HNSW_REBUILD_FRACTION * max(self._index.ntotal, 1):
                self._rebuild_hnsw()
        else:
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))

    def _rebuild_hnsw(self) -> None:
        """Rebuild the graph from the live vectors (stored in the HNSW's flat storage)."""
        live = self.idmap.live_labels()
        storage = faiss.downcast_index(self._index.storage)
        vectors = storage.reconstruct_batch(live) if live.size else np.zeros((0, self.dim), dtype=np.float32)
        index = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.config.ef_construction
        index.add(vectors)  # already normalised when they went in
        self._index = index
        self.idmap = self.idmap.compacted()
        self._tombstones = np.zeros(0, np.int64)
        self._selector = None
        logger.info("rebuilt HNSW graph with %d live vectors", live.size)

    # ----------------------------------------------------------------- search
    def _search_params(self, fetch: int) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.ef_search, fetch)
            if self._tombstones.size:
                if self._selector is None:
                    batch = faiss.IDSelectorBatch(self._tombstones)
                    self._selector = (faiss.IDSelectorNot(batch), batch)
                params.sel = self._selector[0]
                params._keep_alive = self._selector  # the SWIG selector does not own its child
            return params
        if self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
            return params
        return None

    @property
    def nprobe(self) -> int:
        """IVF cells a query visits: ``config.nprobe`` or ``max(8, nlist / 16)``, at most nlist."""
        nlist = faiss.extract_index_ivf(self._index).nlist
        return min(self.config.nprobe or max(8, nlist // 16), nlist)

    # ----------------------------------------------------------------- coarse assignment (IVF)
    def _cpu_ivf(self) -> faiss.IndexIVF | None:
        """The IVF index itself on CPU, whose coarse step can run elsewhere; None otherwise."""
        if self.kind not in ("ivf", "ivfpq") or on_gpu(self.config):
            return None
        return faiss.try_extract_index_ivf(self._index)

    def coarse_assigner(self) -> CoarseAssigner | None:
        """This IVF index's coarse quantizer, to assign queries to cells once for every shard
        (``whetstone.index.coarse``); None for other kinds and GPU indexes."""
        ivf = self._cpu_ivf()
        if ivf is None:
            return None
        if self._assigner is None:
            self._assigner = CoarseAssigner(ivf.quantizer, self.nprobe, self.config.normalize, owner=self._index)
        return self._assigner

    def _search_assigned(self, array: np.ndarray, fetch: int, assigned: Assignment | None,
                         params: faiss.SearchParameters | None) -> tuple[np.ndarray, np.ndarray] | None:
        """FAISS's search over the cells ``assigned`` names, or None when it cannot be used (not
        an IVF index here, another quantizer's cells, or rows that do not match the queries)."""
        own = self.coarse_assigner() if assigned is not None else None
        if own is None or assigned.fingerprint != own.fingerprint or assigned.cells.shape[0] != array.shape[0]:
            return None
        return search_preassigned(self._cpu_ivf(), array, fetch, assigned, params)

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[Sequence[str]] | None = None,
        assigned: Assignment | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` nearest documents for each query, best first.

        Args:
            queries: (Q, D) float32.
            k: results per query (>= 1).
            exclude_ids: Q lists of ids never to return for that query (e.g. its positives).
            assigned: IVF kinds: the cells each query visits, found once for every shard by the
                ingress (``whetstone.index.coarse``); ignored unless it comes from this index's
                quantizer, so the answer is the one this index gives alone.

        Returns:
            ``(ids, scores)``: Q lists of k ids and a (Q, k) float32 array of similarities.
            Rows are padded with ``""`` / ``-inf`` only when fewer than k documents qualify.
        """
        array = check_vectors(queries, self.dim, "queries")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise AnnInputError(f"k: must be a positive integer, got {k!r}")
        count = array.shape[0]
        if exclude_ids is not None and len(exclude_ids) != count:
            raise AnnInputError(f"exclude_ids: {len(exclude_ids)} lists for {count} queries")
        if self.config.normalize:
            faiss.normalize_L2(array)
        max_excluded = max((len(e) for e in exclude_ids), default=0) if exclude_ids else 0
        # Excluded ids can take up to len(excluded) of the top slots, so fetch that many extra.
        fetch = min(k + max_excluded, self.size)
        out_ids = [[""] * k for _ in range(count)]
        out_scores = np.full((count, k), -np.inf, dtype=np.float32)
        if fetch == 0 or count == 0:
            return out_ids, out_scores
        params = self._search_params(fetch)
        found = self._search_assigned(array, fetch, assigned, params)
        if found is None:
            found = self._index.search(array, fetch, params=params) if params is not None \
                else self._index.search(array, fetch)
        scores, labels = found
        found = self.idmap.ids_of(labels)  # "" for -1 (no result) and removed labels
        for row in range(count):
            excluded = set(exclude_ids[row]) if exclude_ids else ()
            filled = 0
            row_ids = found[row * fetch: (row + 1) * fetch]
            for doc_id, score in zip(row_ids, scores[row].tolist(), strict=True):
                if not doc_id or doc_id in excluded:
                    continue
                out_ids[row][filled] = doc_id
                out_scores[row, filled] = score
                filled += 1
                if filled == k:
                    break
        return out_ids, out_scores

    def scores_for(self, queries: np.ndarray, ids_per_query: Sequence[Sequence[str]]) -> list[list[float | None]]:
        """Similarity of each query to each of its listed documents, as ``search`` would score them.

        ``None`` where the id is not in the index or the kind keeps no full vectors (IVF kinds):
        training asks this for its labelled positives (the false-negative margin) and treats a
        missing score as "no rule for this query".
        """
        array = check_vectors(queries, self.dim, "queries")
        if len(ids_per_query) != array.shape[0]:
            raise AnnInputError(f"ids_per_query: {len(ids_per_query)} lists for {array.shape[0]} queries")
        if self.kind not in ("flat", "hnsw"):
            return [[None] * len(ids) for ids in ids_per_query]
        if self.config.normalize:
            faiss.normalize_L2(array)
        flat = [doc_id for ids in ids_per_query for doc_id in ids]
        labels = np.full(len(flat), -1, dtype=np.int64)
        valid = [position for position, doc_id in enumerate(flat) if isinstance(doc_id, str) and doc_id]
        if valid:
            labels[valid] = self.idmap.labels_of([flat[position] for position in valid])
        known = np.flatnonzero(labels >= 0)
        vectors = self._reconstruct(labels[known])
        rows = np.repeat(np.arange(len(ids_per_query)), [len(ids) for ids in ids_per_query])
        scores: list[float | None] = [None] * len(flat)
        for position, value in zip(known.tolist(), np.einsum("nd,nd->n", vectors, array[rows[known]]).tolist(),
                                   strict=True):
            scores[position] = value
        out, start = [], 0
        for ids in ids_per_query:
            out.append(scores[start: start + len(ids)])
            start += len(ids)
        return out

    def vectors_for(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised when ``normalize``) vectors of ``ids``, shape (len(ids), D).

        Only ``flat`` and ``hnsw`` store full vectors; IVF kinds raise ``AnnInputError``.
        """
        labels = np.full(len(ids), -1, dtype=np.int64)
        valid = [position for position, doc_id in enumerate(ids) if isinstance(doc_id, str) and doc_id]
        if valid:
            labels[valid] = self.idmap.labels_of([ids[position] for position in valid])
        if (labels < 0).any():
            missing = [ids[int(position)] for position in np.flatnonzero(labels < 0)[:5]]
            raise AnnInputError(f"ids: {missing} not in the index")
        if self.kind not in ("flat", "hnsw"):
            raise AnnInputError(f"vectors_for is not supported for kind {self.kind!r}")
        return self._reconstruct(labels)

    def _reconstruct(self, labels: np.ndarray) -> np.ndarray:
        if not labels.size:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.kind == "hnsw":
            return faiss.downcast_index(self._index.storage).reconstruct_batch(labels)
        # flat: IndexIDMap2 maps labels to rows itself; on GPU only its inner flat index moved
        # there, so this copies the asked rows back, not the whole index.
        return self._index.reconstruct_batch(np.ascontiguousarray(labels, dtype=np.int64))

    # ----------------------------------------------------------------- snapshots
    def save(
        self,
        index_root_uri: str,
        version: int,
        checkpoint: str,
        storage: StorageConfig | None = None,
        extra: dict | None = None,
        *,
        overwrite: bool = False,
        set_latest: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> str:
        """Write a 1-shard snapshot ``index_root/v{version}/`` and then (``set_latest``) ``LATEST``.

        Args:
            index_root_uri: a local folder or ``s3://bucket/prefix``.
            version: a non-negative integer; snapshots are immutable unless ``overwrite``.
            checkpoint: the encoder the vectors came from (local dir or storage URI).
            extra: JSON-safe metadata kept in the manifest (e.g. corpus manifest, step).
            chunk_bytes: the size of each stored chunk (64 MiB; tests use small ones).

        Returns:
            The snapshot URI.

        Raises:
            SnapshotConflict: the version already exists (and not ``overwrite``); nothing is written.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise AnnInputError(f"version: must be a non-negative integer, got {version!r}")
        snapshot_uri = snapshot_path(index_root_uri, version)
        if not overwrite and manifest_exists(index_root_uri, version, storage):
            raise SnapshotConflict(f"snapshot {snapshot_uri} already exists (snapshots are immutable)")
        built_at = self.built_at or _now()
        entry = write_shard_files(self._cpu_index(), self.idmap, index_root_uri, version, 0,
                                  storage=storage, chunk_bytes=chunk_bytes)
        publish_manifest(index_root_uri, version, [entry], checkpoint=checkpoint, dim=self.dim, kind=self.kind,
                         config=self.config.model_dump(mode="json"), built_at=built_at, extra=extra,
                         storage=storage, overwrite=overwrite, set_latest=set_latest)
        self.version, self.checkpoint, self.built_at, self.extra = version, checkpoint, built_at, extra or {}
        logger.info("saved %s snapshot v%d (%d docs) to %s", self.kind, version, self.size, snapshot_uri)
        return snapshot_uri

    @classmethod
    def load(
        cls, index_root_uri: str, version: int | None = None, storage: StorageConfig | None = None
    ) -> AnnIndex:
        """Load 1-shard snapshot ``version`` (None = the one ``LATEST`` names), checksums verified.

        Raises:
            SnapshotNotFound: no LATEST, or no snapshot of the version (URI named).
            SnapshotError: a missing or corrupt chunk (its URI named), format 1.
            AnnInputError: the snapshot has several shards (load them with ``shard_io.load_shard``).
        """
        if version is None:
            version = latest_version(index_root_uri, storage)
            if version is None:
                raise SnapshotNotFound(f"no published index under {index_root_uri} ({LATEST_FILE} is missing)")
        manifest = read_manifest(index_root_uri, version, storage)
        if manifest.num_shards != 1:
            raise AnnInputError(f"{snapshot_path(index_root_uri, version)} has {manifest.num_shards} shards: "
                                f"AnnIndex.load reads 1-shard snapshots; use whetstone.index.shard_io.load_shard "
                                f"per shard, or the index service")
        return cls.from_manifest(index_root_uri, manifest, 0, storage)

    @classmethod
    def from_manifest(
        cls, index_root_uri: str, manifest: SnapshotManifest, shard: int, storage: StorageConfig | None = None,
        use_gpu: bool | None = None,
    ) -> AnnIndex:
        """Shard ``shard`` of a snapshot, streamed in and verified.

        GPU placement follows the manifest's config (``use_gpu``) unless ``use_gpu`` overrides it.
        """
        if not 0 <= shard < manifest.num_shards:
            raise AnnInputError(f"shard: {shard} is not in 0..{manifest.num_shards - 1} "
                                f"(snapshot {snapshot_path(index_root_uri, manifest.version)})")
        entry = manifest.shards[shard]
        faiss_index, idmap = read_shard_files(index_root_uri, entry, storage)
        expected = idmap.next_label if manifest.kind == "hnsw" else len(idmap)
        if faiss_index.ntotal != expected:
            raise SnapshotError(f"{snapshot_path(index_root_uri, manifest.version)} shard {shard}: FAISS holds "
                                f"{faiss_index.ntotal} vectors, the id map {expected}")
        config = AnnConfig.model_validate(manifest.config)
        if use_gpu is not None:
            config = config.model_copy(update={"use_gpu": use_gpu})
        index = cls(maybe_to_gpu(faiss_index, config), config, manifest.dim, idmap)
        index.version, index.checkpoint = manifest.version, manifest.checkpoint
        index.built_at, index.extra = manifest.built_at, dict(manifest.extra)
        return index

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change query-time knobs (HNSW ``ef_search``, IVF ``nprobe``) without rebuilding."""
        updates = {key: value for key, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value}
        self.config = self.config.model_copy(update=updates)
        self._assigner = None  # its nprobe changed
