"""A FAISS index with string document ids, per-query exclusions and versioned snapshots.

This module knows nothing about Ray: the Serve deployment (``services/index``), the refresh job
and the benchmarks all use it in-process.

Index kinds (:class:`AnnConfig.kind`): ``flat`` (exact inner product), ``hnsw`` (graph, Malkov &
Yashunin 2016), ``ivf`` (inverted lists over k-means cells) and ``ivfpq`` (IVF with product
quantisation, Jégou et al. 2011). With ``normalize=True`` (the default) vectors and queries are
L2-normalised, so inner product is cosine similarity.

Document ids are strings; FAISS only knows int64 *labels*, so the wrapper keeps the mapping.
``flat`` and ``ivf*`` remove vectors natively; FAISS's HNSW cannot, so removed HNSW labels
become tombstones that a search-time ``IDSelector`` skips, and the graph is rebuilt from the
stored vectors once tombstones exceed a quarter of it.

Snapshot layout under an index root (a local folder or ``s3://``; see ``whetstone.index.snapshot``)::

    index_root/v{n}/index.faiss     faiss.serialize_index bytes
    index_root/v{n}/ids.json        {"labels": [...], "ids": [...], "next_label": n, "tombstones": [...]}
    index_root/v{n}/manifest.json   checkpoint, dim, kind, count, built_at, config, sha256 per file
    index_root/LATEST               the published version number, written last

Readers follow ``LATEST``, so a snapshot is visible only after all its files are in place.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import Field

from whetstone.config.base import StorageConfig, StrictModel
from whetstone.index.snapshot import (
    LATEST_FILE,
    MANIFEST_FILE,
    SnapshotConflict,
    SnapshotError,
    SnapshotNotFound,
    latest_version,
    list_versions,
    read_manifest,
    read_snapshot,
    set_latest_version,
    snapshot_path,
    write_snapshot,
)

# The snapshot functions are part of this module's API (callers import them from here).
__all__ = [
    "AnnConfig", "AnnIndex", "AnnInputError", "SnapshotError", "SnapshotNotFound", "SnapshotConflict",
    "check_vectors", "latest_version", "list_versions", "read_manifest", "set_latest_version", "snapshot_path",
    "LATEST_FILE", "MANIFEST_FILE", "INDEX_FILE", "IDS_FILE",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
# HNSW graphs are rebuilt once this share of their labels are tombstones (search quality and
# speed degrade as the selector filters more of the visited nodes).
HNSW_REBUILD_FRACTION = 0.25


class AnnInputError(ValueError):
    """Vectors, ids or search arguments are invalid; the message names the argument at fault."""


class AnnConfig(StrictModel):
    """Which FAISS index to build and how to search it.

    Typical values: ``hnsw_m`` 16-64 (graph degree; memory grows with it), ``ef_construction``
    100-400, ``ef_search`` 64-256 (recall vs speed at query time); ``nlist`` about 4*sqrt(N)
    cells, ``nprobe`` 8-64 cells visited per query; ``pq_m`` sub-quantisers (must divide the
    dimension; D/8 keeps 8 dims per code byte).
    """

    kind: Literal["flat", "hnsw", "ivf", "ivfpq"] = "flat"
    hnsw_m: int = Field(32, ge=4, le=256)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(128, ge=1)
    nlist: int | None = Field(None, ge=1, description="IVF cells; None = about 4*sqrt(N)")
    nprobe: int | None = Field(None, ge=1, description="IVF cells visited; None = max(8, nlist/16)")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantisers; None = D/8 (or a divisor of D)")
    pq_nbits: int = Field(8, ge=4, le=12)
    use_gpu: Literal["auto"] | bool = "auto"
    normalize: bool = True


def _auto_nlist(count: int) -> int:
    # FAISS wants ~39 training points per centroid; fewer gives poor cells and a warning.
    return max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39))


def _auto_pq_m(dim: int) -> int:
    for m in range(max(dim // 8, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_gpu(config: AnnConfig) -> bool:
    """Whether this config's index lives on the GPU (FAISS has no GPU HNSW: that stays on CPU)."""
    if config.use_gpu is False or (config.use_gpu == "auto" and not _gpu_available()):
        return False
    if not _gpu_available():
        raise AnnInputError("use_gpu: true, but FAISS has no GPU support here "
                            "(install faiss-gpu, the `gpu` extra, on a CUDA machine)")
    return config.kind != "hnsw"


def check_vectors(vectors: Any, dim: int | None, name: str) -> np.ndarray:
    """Validate a (N, D) array and return it as contiguous float32 (a copy, safe to normalise)."""
    try:
        array = np.array(vectors, dtype=np.float32, copy=True)
    except (TypeError, ValueError) as err:
        raise AnnInputError(f"{name}: not a numeric (N, D) array ({err})") from None
    if array.ndim != 2:
        raise AnnInputError(f"{name}: expected shape (N, D), got {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise AnnInputError(f"{name}: dimension {array.shape[1]} does not match the index dimension {dim}")
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise AnnInputError(f"{name}[{row}][{col}] is {array[row, col]} (NaN or infinite values are refused)")
    return np.ascontiguousarray(array)


def _check_ids(ids: Sequence[str], count: int) -> list[str]:
    ids = list(ids)
    if len(ids) != count:
        raise AnnInputError(f"ids: {len(ids)} ids for {count} vectors")
    for position, doc_id in enumerate(ids):
        if not isinstance(doc_id, str) or not doc_id:
            raise AnnInputError(f"ids[{position}] must be a non-empty string, got {doc_id!r}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise AnnInputError(f"ids: {dup!r} appears more than once")
    return ids


class AnnIndex:
    """A FAISS index over string ids. Build with :meth:`build` or :meth:`load`.

    Not safe for concurrent mutation: the index service mutates a :meth:`copy` and swaps it in,
    so searches (which FAISS runs thread-safely) never see a half-applied change.
    """

    def __init__(self, index: faiss.Index, config: AnnConfig, dim: int) -> None:
        self._index = index
        self.config = config
        self.dim = dim
        self._label_to_id: dict[int, str] = {}
        self._id_to_label: dict[str, int] = {}
        self._next_label = 0
        self._tombstones: set[int] = set()
        self.version: int | None = None
        self.checkpoint: str | None = None
        self.built_at: str | None = None
        self.extra: dict[str, Any] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(cls, vectors: np.ndarray, ids: Sequence[str], config: AnnConfig | None = None) -> AnnIndex:
        """Build an index from ``vectors`` (N, D) float32 named by ``ids`` (N strings).

        IVF kinds train their cells on these vectors, so they need at least ``nlist`` of them
        (``ivfpq``: also at least ``2**pq_nbits``). ``flat`` and ``hnsw`` accept N = 0.
        """
        config = config or AnnConfig()
        array = np.asarray(vectors)
        if array.ndim != 2 or array.shape[1] < 1:
            raise AnnInputError(f"vectors: expected shape (N, D) with D >= 1, got {array.shape}")
        array = check_vectors(array, None, "vectors")
        index = cls(cls._make_faiss(array, config), config, array.shape[1])
        index.built_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        index.add(array, ids)
        return index

    @staticmethod
    def _make_faiss(vectors: np.ndarray, config: AnnConfig) -> faiss.Index:
        count, dim = vectors.shape
        ip = faiss.METRIC_INNER_PRODUCT
        if config.kind == "flat":
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
            index.hnsw.efConstruction = config.ef_construction
        else:
            nlist = config.nlist or _auto_nlist(count)
            if count < nlist:
                raise AnnInputError(f"vectors: {config.kind} with nlist={nlist} needs at least {nlist} "
                                    f"training vectors, got {count}")
            quantizer = faiss.IndexFlatIP(dim)
            if config.kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
            else:
                pq_m = config.pq_m or _auto_pq_m(dim)
                if dim % pq_m:
                    raise AnnInputError(f"pq_m: {pq_m} does not divide the dimension {dim}")
                if count < 2**config.pq_nbits:
                    raise AnnInputError(f"vectors: ivfpq with pq_nbits={config.pq_nbits} needs at least "
                                        f"{2**config.pq_nbits} training vectors, got {count}")
                index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, config.pq_nbits, ip)
            # k-means cost grows with the training set; 64 points per cell is plenty (FAISS
            # itself samples down to 256 per cell), so train on a seeded sample.
            limit = 64 * nlist
            sample = np.random.default_rng(0).choice(count, limit, replace=False) if count > limit else slice(None)
            train = vectors[sample].copy()
            if config.normalize:
                faiss.normalize_L2(train)
            index.train(train)
        return AnnIndex._maybe_to_gpu(index, config)

    @staticmethod
    def _maybe_to_gpu(index: faiss.Index, config: AnnConfig) -> faiss.Index:
        if not _on_gpu(config):
            return index
        # StandardGpuResources must outlive the index; the Python wrapper keeps a reference.
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)

    def copy(self) -> AnnIndex:
        """A deep copy (FAISS index and id maps) that can be mutated while this one serves."""
        clone = AnnIndex(self._maybe_to_gpu(faiss.clone_index(self._cpu_index()), self.config),
                         self.config, self.dim)
        clone._label_to_id = dict(self._label_to_id)
        clone._id_to_label = dict(self._id_to_label)
        clone._next_label = self._next_label
        clone._tombstones = set(self._tombstones)
        clone.version, clone.checkpoint, clone.built_at = self.version, self.checkpoint, self.built_at
        clone.extra = dict(self.extra)
        return clone

    def _cpu_index(self) -> faiss.Index:
        """The index on the CPU (serialisation and cloning need it); GPU indexes are copied back."""
        return faiss.index_gpu_to_cpu(self._index) if _on_gpu(self.config) else self._index

    # ----------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        """Number of live (searchable) documents."""
        return len(self._id_to_label)

    @property
    def kind(self) -> str:
        return self.config.kind

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._id_to_label

    def __repr__(self) -> str:
        return f"AnnIndex(kind={self.kind}, dim={self.dim}, size={self.size}, version={self.version})"

    # ----------------------------------------------------------------- mutation
    def add(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        """Add ``vectors`` (N, D) under ``ids`` (N); an id already present is replaced (upsert)."""
        array = check_vectors(vectors, self.dim, "vectors")
        ids = _check_ids(ids, array.shape[0])
        if not ids:
            return
        replaced = [doc_id for doc_id in ids if doc_id in self._id_to_label]
        if replaced:
            self.remove(replaced)
        if self.config.normalize:
            faiss.normalize_L2(array)
        if self.kind == "hnsw":
            # HNSW labels are positions in insertion order; they must stay in step with ours.
            assert self._index.ntotal == self._next_label, "HNSW labels out of step with the id map"
            self._index.add(array)
        else:
            labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
            self._index.add_with_ids(array, labels)
        for offset, doc_id in enumerate(ids):
            label = self._next_label + offset
            self._label_to_id[label] = doc_id
            self._id_to_label[doc_id] = label
        self._next_label += len(ids)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove the documents named by ``ids``; unknown ids are ignored. Returns how many went."""
        labels = [self._id_to_label.pop(doc_id) for doc_id in dict.fromkeys(ids) if doc_id in self._id_to_label]
        if not labels:
            return 0
        for label in labels:
            del self._label_to_id[label]
        if self.kind == "hnsw":
            self._tombstones.update(labels)
            if len(self._tombstones) > HNSW_REBUILD_FRACTION * max(self._index.ntotal, 1):
                self._rebuild_hnsw()
        else:
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))
        return len(labels)

    def _rebuild_hnsw(self) -> None:
        """Rebuild the graph from the live vectors (stored in the HNSW's flat storage)."""
        live = sorted(self._label_to_id)
        storage = faiss.downcast_index(self._index.storage)
        vectors = storage.reconstruct_batch(np.asarray(live, dtype=np.int64)) if live else \
            np.zeros((0, self.dim), dtype=np.float32)
        index = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.config.ef_construction
        index.add(vectors)  # already normalised when they went in
        self._index = index
        ids = [self._label_to_id[label] for label in live]
        self._label_to_id = dict(enumerate(ids))
        self._id_to_label = {doc_id: label for label, doc_id in self._label_to_id.items()}
        self._next_label = len(ids)
        self._tombstones = set()
        logger.info("rebuilt HNSW graph with %d live vectors", len(ids))

    # ----------------------------------------------------------------- search
    def _search_params(self, fetch: int) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.config.ef_search, fetch)
            if self._tombstones:
                tombstones = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
                batch = faiss.IDSelectorBatch(tombstones)
                params.sel = faiss.IDSelectorNot(batch)
                params._keep_alive = batch  # the SWIG selector does not own its child
            return params
        if self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF()
            nlist = faiss.extract_index_ivf(self._index).nlist
            params.nprobe = min(self.config.nprobe or max(8, nlist // 16), nlist)
            return params
        return None

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Sequence[Sequence[str]] | None = None
    ) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` nearest documents for each query, best first.

        Args:
            queries: (Q, D) float32.
            k: results per query (>= 1).
            exclude_ids: Q lists of ids never to return for that query (e.g. its positives).

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
        scores, labels = self._index.search(array, fetch, params=params) if params is not None \
            else self._index.search(array, fetch)
        lookup = self._label_to_id
        for row in range(count):
            excluded = set(exclude_ids[row]) if exclude_ids else ()
            filled = 0
            for label, score in zip(labels[row].tolist(), scores[row].tolist(), strict=True):
                doc_id = lookup.get(label)  # -1 (no result) and removed labels map to None
                if doc_id is None or doc_id in excluded:
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
        if self.config.normalize:
            faiss.normalize_L2(array)
        out: list[list[float | None]] = []
        for row, ids in enumerate(ids_per_query):
            known = [doc_id for doc_id in ids if doc_id in self._id_to_label]
            scores: dict[str, float] = {}
            if known and self.kind in ("flat", "hnsw"):
                scores = dict(zip(known, (self.vectors_for(known) @ array[row]).tolist(), strict=True))
            out.append([scores.get(doc_id) for doc_id in ids])
        return out

    def vectors_for(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised when ``normalize``) vectors of ``ids``, shape (len(ids), D).

        Only ``flat`` and ``hnsw`` store full vectors; IVF kinds raise ``AnnInputError``.
        """
        missing = [doc_id for doc_id in ids if doc_id not in self._id_to_label]
        if missing:
            raise AnnInputError(f"ids: {missing[:5]} not in the index")
        labels = np.asarray([self._id_to_label[doc_id] for doc_id in ids], dtype=np.int64)
        if self.kind == "hnsw":
            return faiss.downcast_index(self._index.storage).reconstruct_batch(labels)
        if self.kind == "flat":
            return np.stack([self._cpu_index().reconstruct(int(label)) for label in labels]) if len(labels) \
                else np.zeros((0, self.dim), dtype=np.float32)
        raise AnnInputError(f"vectors_for is not supported for kind {self.kind!r}")

    # ----------------------------------------------------------------- snapshots
    def _ids_payload(self) -> bytes:
        labels = sorted(self._label_to_id)
        return json.dumps({
            "labels": labels,
            "ids": [self._label_to_id[label] for label in labels],
            "next_label": self._next_label,
            "tombstones": sorted(self._tombstones),
        }).encode()

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
    ) -> str:
        """Write the snapshot ``index_root/v{version}/`` and then (``set_latest``) ``LATEST``.

        Args:
            index_root_uri: a local folder or ``s3://bucket/prefix``.
            version: a non-negative integer; snapshots are immutable unless ``overwrite``.
            checkpoint: the encoder the vectors came from (local dir or storage URI).
            extra: JSON-safe metadata kept in the manifest (e.g. corpus manifest, step).

        Returns:
            The snapshot URI.

        Raises:
            SnapshotConflict: the version already exists (and not ``overwrite``).
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise AnnInputError(f"version: must be a non-negative integer, got {version!r}")
        built_at = self.built_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        files = {INDEX_FILE: faiss.serialize_index(self._cpu_index()).tobytes(), IDS_FILE: self._ids_payload()}
        fields = {"checkpoint": checkpoint, "dim": self.dim, "kind": self.kind, "count": self.size,
                  "built_at": built_at, "config": self.config.model_dump(mode="json"), "extra": extra or {}}
        snapshot_uri = write_snapshot(index_root_uri, version, files, fields, storage,
                                      overwrite=overwrite, set_latest=set_latest)
        self.version, self.checkpoint, self.built_at, self.extra = version, checkpoint, built_at, extra or {}
        logger.info("saved %s snapshot v%d (%d docs) to %s", self.kind, version, self.size, snapshot_uri)
        return snapshot_uri

    @classmethod
    def load(
        cls, index_root_uri: str, version: int | None = None, storage: StorageConfig | None = None
    ) -> AnnIndex:
        """Load snapshot ``version`` (None = the one ``LATEST`` names) and verify its checksums.

        Raises:
            SnapshotNotFound: no LATEST, or no snapshot of the version (URI named).
            SnapshotError: a missing file or a checksum mismatch (URI named).
        """
        version, manifest, payloads = read_snapshot(index_root_uri, version, storage)
        snapshot_uri = snapshot_path(index_root_uri, version)
        config = AnnConfig.model_validate(manifest["config"])
        faiss_index = faiss.deserialize_index(np.frombuffer(payloads[INDEX_FILE], dtype=np.uint8))
        index = cls(cls._maybe_to_gpu(faiss_index, config), config, int(manifest["dim"]))
        mapping = json.loads(payloads[IDS_FILE])
        index._label_to_id = dict(zip(mapping["labels"], mapping["ids"], strict=True))
        index._id_to_label = {doc_id: label for label, doc_id in index._label_to_id.items()}
        index._next_label = int(mapping["next_label"])
        index._tombstones = set(mapping["tombstones"])
        index.version, index.checkpoint = version, manifest["checkpoint"]
        index.built_at, index.extra = manifest["built_at"], manifest.get("extra", {})
        if index.size != manifest["count"]:
            raise SnapshotError(f"{snapshot_uri}: manifest count {manifest['count']} != {index.size} ids")
        return index

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change query-time knobs (HNSW ``ef_search``, IVF ``nprobe``) without rebuilding."""
        updates = {key: value for key, value in (("ef_search", ef_search), ("nprobe", nprobe)) if value}
        self.config = self.config.model_copy(update=updates)
