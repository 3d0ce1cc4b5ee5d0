"""Build a sharded index from vector chunks in storage, one shard per process, streaming.

A shard builder never holds the corpus: it streams the vector chunks
(``whetstone.index.vector_chunks``) and keeps only its own shard's rows (``shard_of``: crc32 of
the id, modulo S); when the writer partitioned the chunks by the same S it reads only its own
partition. IVF kinds stream twice:

1. pass 1 draws the shard's training sample: every shard row gets a seeded random key and the
   rows with the smallest keys stay (a uniform sample without replacement, at most
   ``64 * nlist`` rows and 512 MiB; ``faiss_kinds.train_rows``), and counts the shard's rows,
   which fix the automatic ``nlist``;
2. pass 2 adds the shard's rows chunk by chunk to the trained index.

``flat`` and ``hnsw`` need only pass 2. A builder holds the index, one chunk and (IVF) the
sample, then streams the shard into storage in chunks (``whetstone.index.shard_io``).
:func:`build_sharded_index` runs the S builders as Ray tasks when Ray is initialised (one process
each, ``task_cpus`` CPUs each), else one after another here, and publishes the manifest last.
"""

from __future__ import annotations

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
from whetstone.index.vector_chunks import VectorChunksManifest, iter_vector_chunks, read_vector_chunks

logger = logging.getLogger(__name__)

# Slack on the expected shard size (N / S) when sizing the sample buffer before pass 1 has
# counted: crc32 spreads ids within a fraction of a percent at these sizes.
_SHARD_SIZE_SLACK = 1.1


def _shard_chunks(
    vectors_uri: str, manifest: VectorChunksManifest, shard: int, num_shards: int, storage: StorageConfig | None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """The shard's rows, chunk by chunk: its own partition when the writer partitioned by the
    same S, else every chunk filtered by ``shard_of``."""
    if manifest.num_shards == num_shards:
        yield from iter_vector_chunks(vectors_uri, storage, manifest, shard=shard)
        return
    for ids, vectors in iter_vector_chunks(vectors_uri, storage, manifest):
        rows = np.flatnonzero(shard_of(ids, num_shards) == shard)
        if rows.size:
            yield [ids[row] for row in rows.tolist()], vectors[rows]


def _train_sample(
    vectors_uri: str, manifest: VectorChunksManifest, shard: int, num_shards: int, config: AnnConfig,
    storage: StorageConfig | None,
) -> tuple[np.ndarray, int]:
    """Pass 1: ``(sample rows, shard row count)``; bottom-k of seeded random keys, in place."""
    if manifest.num_shards == num_shards:  # partitioned: the manifest knows the shard's rows
        expected = sum(chunk.rows for chunk in manifest.chunks if chunk.shard == shard)
    else:
        expected = int(manifest.count / num_shards * _SHARD_SIZE_SLACK) + 1
    cap = train_rows(nlist_for(config, min(expected, manifest.count)), manifest.dim)
    largest_chunk = max((chunk.rows for chunk in manifest.chunks), default=0)
    buffer = np.empty((cap + largest_chunk, manifest.dim), np.float32)
    keys = np.empty(cap + largest_chunk, np.float64)
    rng = np.random.default_rng(1000 + shard)
    held = count = 0
    for _, rows in _shard_chunks(vectors_uri, manifest, shard, num_shards, storage):
        buffer[held: held + rows.shape[0]] = rows
        keys[held: held + rows.shape[0]] = rng.random(rows.shape[0])
        held += rows.shape[0]
        count += rows.shape[0]
        if held > cap:
            held = _keep_smallest(buffer, keys, held, cap)
    limit = train_rows(nlist_for(config, count), manifest.dim)
    if held > limit:
        held = _keep_smallest(buffer, keys, held, limit)
    return buffer[:held], count


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


def _empty_shard_index(
    vectors_uri: str, manifest: VectorChunksManifest, shard: int, num_shards: int, config: AnnConfig,
    storage: StorageConfig | None,
) -> AnnIndex:
    """A trained, empty index for the shard (pass 1 for IVF kinds)."""
    config = config.model_copy(update={"use_gpu": False})  # built on CPU: the loader places it
    if config.kind in ("flat", "hnsw"):
        return AnnIndex(make_faiss(manifest.dim, config), config, manifest.dim)
    sample, count = _train_sample(vectors_uri, manifest, shard, num_shards, config, storage)
    try:
        faiss_index = make_faiss(manifest.dim, config, sample, count, overwrite_train=True)
    except AnnInputError as err:
        raise AnnInputError(f"shard {shard} of {num_shards} ({count} rows from {vectors_uri}): {err}") from None
    return AnnIndex(faiss_index, config, manifest.dim)


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
) -> ShardEntry:
    """Build shard ``shard`` of ``num_shards`` from the vector chunks at ``vectors_uri`` and save it.

    Writes ``index_root/v{version}/shard-{shard:04d}/`` and returns its entry; publishes nothing.
    Holds the shard's index, one vector chunk and (IVF) the training sample.

    Raises:
        AnnInputError: an IVF shard has fewer rows than its ``nlist`` (the shard is named).
        SnapshotError: a vector chunk is missing or corrupt, or the version is already published.
    """
    started = time.perf_counter()
    manifest = read_vector_chunks(vectors_uri, storage)
    index = _empty_shard_index(vectors_uri, manifest, shard, num_shards, config, storage)
    trained = time.perf_counter()
    for shard_ids, rows in _shard_chunks(vectors_uri, manifest, shard, num_shards, storage):
        index.add(rows, shard_ids)
    added = time.perf_counter()
    entry = save_shard(index, index_root, version, shard, storage, chunk_bytes)
    timings = {"train_s": trained - started, "add_s": added - trained, "save_s": time.perf_counter() - added}
    logger.info("built %s shard %d/%d: %d docs (train %.1f s, add %.1f s, save %.1f s, %d bytes)",
                config.kind, shard, num_shards, index.size, *timings.values(),
                sum(f.bytes for f in entry.files.values()))
    return entry.model_copy(update={"build_s": {name: round(value, 3) for name, value in timings.items()}})


def _build_shard_task(storage_wire: dict, vectors_uri: str, shard: int, num_shards: int, config: AnnConfig,
                      index_root: str, version: int, chunk_bytes: int) -> ShardEntry:
    """:func:`build_shard` in a Ray task, with the storage config as JSON-safe data."""
    storage = StorageConfig.model_validate(storage_wire)
    return build_shard(vectors_uri, shard, num_shards, config, index_root, version, storage, chunk_bytes=chunk_bytes)


def _gather_in_shard_order(refs: list) -> list[ShardEntry]:
    """The tasks' entries, in shard order. A failed shard raises its own error (the lowest shard
    first, whichever failed first in time; not Ray's wrapper) and the other tasks are cancelled."""
    import ray

    entries = []
    for ref in refs:
        try:
            entries.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            for other in refs:
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

    One Ray task per shard (``num_cpus=task_cpus``) when Ray is initialised, else the shards one
    after another in this process. ``LATEST`` moves only with ``set_latest`` (the index service's
    two-phase swap moves it otherwise).

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

    if ray.is_initialized():
        # Workers may not share this process's AWS_* variables: ship the resolved config.
        wire = (storage or StorageConfig()).resolved().to_wire()
        task = ray.remote(num_cpus=task_cpus)(_build_shard_task)
        entries = _gather_in_shard_order([
            task.remote(wire, vectors_uri, shard, num_shards, config, index_root, version, chunk_bytes)
            for shard in range(num_shards)])
    else:
        entries = [build_shard(vectors_uri, shard, num_shards, config, index_root, version, storage,
                               chunk_bytes=chunk_bytes) for shard in range(num_shards)]
    manifest = publish_manifest(index_root, version, entries, checkpoint=checkpoint, dim=vectors.dim,
                                kind=config.kind, config=config.model_dump(mode="json"), extra=extra,
                                storage=storage, set_latest=set_latest)
    logger.info("built v%d: %d shards, %d docs in %.1f s", version, num_shards, manifest.count,
                time.perf_counter() - started)
    return manifest
