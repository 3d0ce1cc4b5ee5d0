"""Save and load one shard of a sharded snapshot (format 2, ``whetstone.index.snapshot``).

A shard's FAISS index goes through ``faiss.PyCallbackIOWriter`` into fixed-size chunks, each
uploaded as soon as it fills, with its sha256; loading fetches one chunk at a time through
``faiss.PyCallbackIOReader`` and verifies each before FAISS sees a byte (a corrupt chunk raises
``SnapshotError`` naming the chunk's URI). Saving or loading therefore holds the shard's index
plus one chunk (64 MiB by default), never a second serialised copy of it.

Typical use: a shard builder (``whetstone.index.build``) or an index-service replica that
mutated its shard calls :func:`save_shard`, then someone calls ``publish_manifest`` with every
shard's entry; a replica calls :func:`load_shard` with the manifest it was told to serve.
"""

from __future__ import annotations

from whetstone.config.base import StorageConfig
from whetstone.index.ann import AnnIndex
from whetstone.index.shard_files import write_shard_files
from whetstone.index.snapshot import (
    DEFAULT_CHUNK_BYTES,
    ShardEntry,
    SnapshotConflict,
    SnapshotManifest,
    check_version,
    manifest_exists,
    snapshot_path,
)

__all__ = ["DEFAULT_CHUNK_BYTES", "save_shard", "load_shard"]


def save_shard(
    index: AnnIndex,
    index_root_uri: str,
    version: int,
    shard: int,
    storage: StorageConfig | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    overwrite: bool = False,
) -> ShardEntry:
    """Write ``index`` as shard ``shard`` of version ``version`` (``v{n}/shard-{s:04d}/``).

    Publishes nothing: the returned entry goes into ``publish_manifest`` with the other shards'.

    Raises:
        SnapshotConflict: ``v{version}`` is already published (its files are immutable) and not
            ``overwrite``.
    """
    check_version(version)
    if not isinstance(shard, int) or shard < 0:
        raise ValueError(f"shard: must be a non-negative integer, got {shard!r}")
    if not overwrite and manifest_exists(index_root_uri, version, storage):
        raise SnapshotConflict(f"snapshot {snapshot_path(index_root_uri, version)} is already published: "
                               f"its shard files are immutable (write the shard under a new version)")
    return write_shard_files(index._cpu_index(), index.idmap, index_root_uri, version, shard,
                             storage=storage, chunk_bytes=chunk_bytes)


def load_shard(
    index_root_uri: str, manifest: SnapshotManifest, shard: int, storage: StorageConfig | None = None,
    use_gpu: bool | None = None,
) -> AnnIndex:
    """Shard ``shard`` of the snapshot ``manifest`` describes (read it with ``read_manifest``).

    Sets ``version``, ``checkpoint``, ``built_at`` and ``extra`` from the manifest. The index goes
    to the GPU when ``use_gpu`` is True, stays on CPU when False, and with None follows the
    manifest's config (``use_gpu: auto`` moves it when a GPU is visible).

    Raises:
        SnapshotError: a chunk is missing or corrupt (its URI named) or counts disagree.
        AnnInputError: ``shard`` is not one of the manifest's.
    """
    return AnnIndex.from_manifest(index_root_uri, manifest, shard, storage, use_gpu)
