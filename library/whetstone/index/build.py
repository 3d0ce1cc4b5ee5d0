"""Build a sharded index from vector chunks in storage, one shard per process, streaming.

A shard builder never holds the corpus: it streams the vector chunks
(``whetstone.index.vector_chunks``) and keeps only its own shard's rows (``shard_of``: crc32 of
the id, modulo S); when the writer partitioned the chunks by S (or a multiple of S) it reads only
its own partitions.

IVF kinds are trained once per build, not once per shard (:func:`train_shared`): k-means runs on
a uniform sample of rows from a seeded random set of whole chunks (at most ``64 * nlist`` rows and
512 MiB; ``faiss_kinds.train_rows``) with ``nlist`` for the whole corpus, and every shard adds its
rows to a copy of that trained, empty index. The shards then share their cells, so searching
every shard with nprobe p scans what one unsharded index with the same cells would with p, and
the merged top-k is that index's.

A builder holds its index and one chunk, then streams the shard into storage in chunks
(``whetstone.index.shard_io``). :func:`build_sharded_index` runs the S builders as Ray tasks when
Ray is initialised (one process each, ``task_cpus`` CPUs each), else one after another here, and
publishes the manifest last.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Iterator

import numpy as np

from whetstone.config.base import StorageConfig
from whetstone.index.ann import AnnIndex
from whetstone.index.faiss_kinds import AnnConfig, AnnInputError, make_faiss, nlist_for, train_rows
from whetstone.index.shard_io import save_shard
from whetstone.index.snapshot import (
    DEFAULT_CHUNK_BYTES,
    ShardEntry,
    SnapshotConflict,
    SnapshotManifest,
    check_version,
    manifest_exists,
    publish_manifest,
    shard_of,
    snapshot_path,
)
from whetstone.index.vector_chunks import (
    VectorChunksManifest,
    is_layered,
    iter_vector_chunks,
    read_vector_chunks,
)

logger = logging.getLogger(__name__)

# Rows read for the shared IVF training sample: at least this many times the sample, from whole
# chunks drawn at random (every chunk when the corpus is smaller), so k-means sees every part of a
# corpus whose chunks follow its files' order.
_SAMPLE_READ_FACTOR = 8


def _partitions_of(manifest: VectorChunksManifest, shard: int, num_shards: int) -> list[int] | None:
    """The writer's partitions that hold exactly shard ``shard``'s rows, or None when its
    partitioning does not line up with ``num_shards``. ``shard_of`` is crc32 % S, so partition p
    of a writer with S' = k*S shards belongs wholly to shard p % S (e.g. vectors written for 4
    shards build 2 shards without filtering)."""
    if manifest.num_shards % num_shards:
        return None
    return [p for p in range(manifest.num_shards) if p % num_shards == shard]


def _shard_chunks(
    vectors_uri: str, manifest: VectorChunksManifest, shard: int, num_shards: int, storage: StorageConfig | None,
    newest_first: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """The shard's rows, chunk by chunk: only its own partitions' chunks when the writer's
    partitioning lines up with S (:func:`_partitions_of`), else every chunk filtered by ``shard_of``."""
    partitions = _partitions_of(manifest, shard, num_shards)
    if partitions is not None:
        yield from iter_vector_chunks(vectors_uri, storage, manifest, shard=partitions, newest_first=newest_first)
        return
    for ids, vectors in iter_vector_chunks(vectors_uri, storage, manifest, newest_first=newest_first):
        rows = np.flatnonzero(shard_of(ids, num_shards) == shard)
        if rows.size:
            yield [ids[row] for row in rows.tolist()], vectors[rows]


def _train_sample(vectors_uri: str, manifest: VectorChunksManifest, cap: int, version: int,
                  storage: StorageConfig | None) -> np.ndarray:
    """Up to ``cap`` rows drawn uniformly from a seeded random set of whole chunks holding at least
    ``_SAMPLE_READ_FACTOR * cap`` rows (all chunks when fewer): every read row gets a random key,
    the rows with the smallest keys stay, in place. Seeded by ``version``."""
    rng = np.random.default_rng([version, 17])
    order = rng.permutation(len(manifest.chunks))
    chosen, rows = [], 0
    for position in order.tolist():
        if rows >= _SAMPLE_READ_FACTOR * cap:
            break
        chosen.append(position)
        rows += manifest.chunks[position].rows
    picked = manifest.model_copy(update={"chunks": [manifest.chunks[i] for i in sorted(chosen)]})
    largest_chunk = max((chunk.rows for chunk in picked.chunks), default=0)
    buffer = np.empty((cap + largest_chunk, manifest.dim), np.float32)
    keys = np.empty(cap + largest_chunk, np.float64)
    held = 0
    for _, vectors in iter_vector_chunks(vectors_uri, storage, picked):
        buffer[held: held + vectors.shape[0]] = vectors
        keys[held: held + vectors.shape[0]] = rng.random(vectors.shape[0])
        held += vectors.shape[0]
        if held > cap:
            held = _keep_smallest(buffer, keys, held, cap)
    return buffer[:held]


def _keep_smallest(buffer: np.ndarray, keys: np.ndarray, held: int, keep: int) -> int:
    """Move the ``keep`` rows with the smallest keys to the front, in place (no second buffer)."""
    chosen = np.sort(np.argpartition(keys[:held], keep)[:keep])
    # chosen[i] >= i, so filling the front block by block never reads a row already overwritten.
    block = 8192
    for start in range(0, keep, block):
        rows = chosen[start: start + block]
        buffer[start: start + rows.shape[0]] = buffer[rows]
        keys[start: start + rows.shape[0]] = keys[rows]
    return keep


def train_shared(vectors_uri: str, config: AnnConfig, version: int = 1, storage: StorageConfig | None = None,
                 threads: int | None = None) -> np.ndarray:
    """The trained, empty IVF index every shard of a build starts from, serialised (uint8).

    Trained once for all S shards on a sample of the whole corpus (:func:`_train_sample`), with
    ``nlist`` for the whole corpus: every shard holds the same cells, so a search with nprobe p on
    every shard scans exactly the cells the unsharded index would scan with p, and the merged top-k
    equals the unsharded IVF index's (the k-means cost is paid once, not S times).

    Raises:
        AnnInputError: the corpus has fewer rows than ``nlist`` (or the PQ codebook), naming ``vectors_uri``.
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(max(1, int(threads)))
    manifest = read_vector_chunks(vectors_uri, storage)
    cpu_config = config.model_copy(update={"use_gpu": False})  # built on CPU: the loader places it
    cap = train_rows(nlist_for(cpu_config, manifest.count), manifest.dim)
    sample = _train_sample(vectors_uri, manifest, cap, version, storage)
    try:
        trained = make_faiss(manifest.dim, cpu_config, sample, manifest.count, overwrite_train=True)
    except AnnInputError as err:
        raise AnnInputError(f"{vectors_uri} ({manifest.count} rows): {err}") from None
    return faiss.serialize_index(trained)


def _empty_shard_index(dim: int, config: AnnConfig, trained: np.ndarray | None) -> AnnIndex:
    """A trained, empty index for a shard: the shared trained index for IVF kinds."""
    import faiss

    config = config.model_copy(update={"use_gpu": False})  # built on CPU: the loader places it
    if config.kind in ("flat", "hnsw"):
        return AnnIndex(make_faiss(dim, config), config, dim)
    if trained is None:
        raise ValueError(f"{config.kind}: a shard needs the shared trained index (train_shared)")
    return AnnIndex(faiss.deserialize_index(trained), config, dim)


def build_shard(
    vectors_uri: str,
    shard: int,
    num_shards: int,
    config: AnnConfig,
    index_root: str,
    version: int,
    storage: StorageConfig | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    trained: np.ndarray | None = None,
) -> ShardEntry:
    """Build shard ``shard`` of ``num_shards`` from the vector chunks at ``vectors_uri`` and save it.

    Writes ``index_root/v{version}/shard-{shard:04d}/`` and returns its entry; publishes nothing.
    Holds the shard's index and one vector chunk. IVF kinds start from ``trained``
    (:func:`train_shared`, shared by every shard of the build; trained here when None).

    Raises:
        AnnInputError: IVF training failed (the corpus is smaller than ``nlist``).
        SnapshotError: a vector chunk is missing or corrupt, or the version is already published.
    """
    started = time.perf_counter()
    manifest = read_vector_chunks(vectors_uri, storage)
    if trained is None and config.kind in ("ivf", "ivfpq"):
        trained = train_shared(vectors_uri, config, version, storage)
    index = _empty_shard_index(manifest.dim, config, trained)
    trained_at = time.perf_counter()
    layers = is_layered(manifest)  # a partial refresh: newest chunks first, an id's first vector wins
    for shard_ids, rows in _shard_chunks(vectors_uri, manifest, shard, num_shards, storage, newest_first=layers):
        if layers:
            shard_ids, rows = _not_yet_held(index, shard_ids, rows)
        index.add(rows, shard_ids)
    added = time.perf_counter()
    entry = save_shard(index, index_root, version, shard, storage, chunk_bytes)
    timings = {"train_s": trained_at - started, "add_s": added - trained_at, "save_s": time.perf_counter() - added}
    logger.info("built %s shard %d/%d: %d docs (train %.1f s, add %.1f s, save %.1f s, %d bytes)",
                config.kind, shard, num_shards, index.size, *timings.values(),
                sum(f.bytes for f in entry.files.values()))
    return entry.model_copy(update={"build_s": {name: round(value, 3) for name, value in timings.items()}})


def _not_yet_held(index: AnnIndex, ids: list[str], rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The rows of ids the index does not hold yet (each id's last row in the chunk): read newest
    chunk first, this keeps every id's newest vector without replacing anything in FAISS."""
    held = index.idmap.labels_of(ids) >= 0
    keep, seen = [], set()
    for position in range(len(ids) - 1, -1, -1):
        if not held[position] and ids[position] not in seen:
            seen.add(ids[position])
            keep.append(position)
    keep.reverse()
    if len(keep) == len(ids):
        return ids, rows
    return [ids[p] for p in keep], rows[np.asarray(keep, dtype=np.int64)]


def _build_shard_task(storage_wire: dict, vectors_uri: str, shard: int, num_shards: int, config: AnnConfig,
                      index_root: str, version: int, chunk_bytes: int, trained: np.ndarray | None,
                      threads: int) -> ShardEntry:
    """:func:`build_shard` in a Ray task, with the storage config as JSON-safe data."""
    import faiss

    faiss.omp_set_num_threads(threads)
    storage = StorageConfig.model_validate(storage_wire)
    try:
        return build_shard(vectors_uri, shard, num_shards, config, index_root, version, storage,
                           chunk_bytes=chunk_bytes, trained=trained)
    finally:
        release_freed_memory()


def _train_task(storage_wire: dict, vectors_uri: str, config: AnnConfig, version: int, threads: int) -> np.ndarray:
    """:func:`train_shared` in a Ray task."""
    try:
        return train_shared(vectors_uri, config, version, StorageConfig.model_validate(storage_wire), threads)
    finally:
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the memory a task freed back to the OS. glibc keeps freed blocks in its arenas, so a
    Ray worker that built a shard stayed at about the shard's size while idle, waiting for its
    next task; ``malloc_trim`` returns them (a no-op where the C library is not glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _gather_in_shard_order(refs: list) -> list[ShardEntry]:
    """The tasks' entries, in shard order. A failed shard raises its own error (the lowest shard
    first, whichever failed first in time; not Ray's wrapper) and the other tasks are cancelled."""
    import ray

    entries = []
    for ref in refs:
        try:
            entries.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            # cancel only what has not finished: cancelling a task whose reply is arriving crashed
            # Ray 2.60's driver (task_manager "Tried to complete task that was not pending")
            pending = [other for other in refs if other is not ref]
            _, unfinished = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
            for other in unfinished:
                ray.cancel(other)
            raise (err.cause if isinstance(err.cause, Exception) else err) from None
    return entries


def build_sharded_index(
    vectors_uri: str,
    index_root: str,
    version: int,
    num_shards: int,
    config: AnnConfig,
    checkpoint: str,
    storage: StorageConfig | None = None,
    extra: dict | None = None,
    set_latest: bool = False,
    task_cpus: float = 1.0,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> SnapshotManifest:
    """Build every shard of version ``version`` from ``vectors_uri`` and publish its manifest.

    IVF kinds first train one empty index for every shard (:func:`train_shared`; one Ray task
    with the CPUs the S builders will use next, as far as they are free now, at least
    ``task_cpus``). Then one Ray task per shard
    (``num_cpus=task_cpus``) when Ray is initialised, else the shards one after another in this
    process. ``LATEST`` moves only with ``set_latest`` (the index service's two-phase swap moves
    it otherwise).

    Raises:
        SnapshotConflict: the version is already published (checked before any work).
    """
    check_version(version)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise AnnInputError(f"num_shards: must be a positive integer, got {num_shards!r}")
    if manifest_exists(index_root, version, storage):
        raise SnapshotConflict(f"snapshot {snapshot_path(index_root, version)} already exists "
                               f"(snapshots are immutable)")
    vectors = read_vector_chunks(vectors_uri, storage)
    started = time.perf_counter()
    import ray

    ivf = config.kind in ("ivf", "ivfpq")
    if ray.is_initialized():
        # Workers may not share this process's AWS_* variables: ship the resolved config.
        wire = (storage or StorageConfig()).resolved().to_wire()
        trained = None
        if ivf:
            # the CPUs free now, up to what the S builders take next (asking for more than is free
            # would wait on whatever holds them, e.g. the service's own replicas)
            train_cpus = max(task_cpus, min(task_cpus * num_shards, ray.available_resources().get("CPU", 0.0)))
            train = ray.remote(num_cpus=train_cpus)(_train_task)
            trained = train.remote(wire, vectors_uri, config, version, max(1, int(train_cpus)))
            _gather_in_shard_order([trained])  # a failed training raises its own error here
            # the builders get the ref: the trained index stays one copy in the object store
        task = ray.remote(num_cpus=task_cpus)(_build_shard_task)
        entries = _gather_in_shard_order([
            task.remote(wire, vectors_uri, shard, num_shards, config, index_root, version, chunk_bytes, trained,
                        max(1, int(task_cpus)))
            for shard in range(num_shards)])
    else:
        trained = train_shared(vectors_uri, config, version, storage) if ivf else None
        entries = [build_shard(vectors_uri, shard, num_shards, config, index_root, version, storage,
                               chunk_bytes=chunk_bytes, trained=trained) for shard in range(num_shards)]
    manifest = publish_manifest(index_root, version, entries, checkpoint=checkpoint, dim=vectors.dim,
                                kind=config.kind, config=config.model_dump(mode="json"), extra=extra,
                                storage=storage, set_latest=set_latest)
    logger.info("built v%d: %d shards, %d docs in %.1f s", version, num_shards, manifest.count,
                time.perf_counter() - started)
    return manifest
