"""Embedded vectors in object storage as fixed-row chunks, for shard builders to stream.

A refresh (or a benchmark) embeds a corpus batch by batch and hands each batch to a
:class:`VectorChunkWriter`; the writer cuts them into chunks of ``rows_per_chunk`` rows
(65,536 x 384 float32 = 96 MiB by default), uploads each as soon as it fills and finally writes
``manifest.json``. Shard builders (``whetstone.index.build``) read the chunks back one at a time
(:func:`iter_vector_chunks`), so nobody holds all N x D vectors. Layout::

    uri/chunk-{c:05d}.bin    magic, rows, dim, id bytes; int64 id offsets; utf-8 ids; float32 rows
    uri/manifest.json        {"format": 1, "dim", "count", "rows_per_chunk", "num_shards",
                              "chunks": [{name, rows, bytes, sha256, shard}]}

Written with ``num_shards`` S, every chunk holds the rows of one shard (``shard_of``), so the
builder of a shard downloads only its 1/S of the vectors (a build with another S reads them all
and filters).

Ids are not checked for uniqueness across chunks (that would need them all at once); a
builder that meets an id twice keeps the later vector (upsert).

A partial refresh writes a *layered* manifest (:func:`layered`): the chunks of earlier versions
that still hold current vectors (named with their ``folder``), then its own new chunks. An id may
then appear in several chunks; the last one listed is its vector (builders read a layered
manifest newest first and skip ids they already hold; ``count`` counts rows, duplicates included).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.index.faiss_kinds import AnnInputError, check_vectors
from whetstone.index.idmap import encode_ids
from whetstone.index.snapshot import SnapshotError, SnapshotNotFound, read_optional, shard_of

MANIFEST_FILE = "manifest.json"
MAGIC = b"WSVEC\x00\x00\x01"
_HEADER = struct.Struct("<8sQQQ")  # magic, rows, dim, id bytes


class VectorChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    shard: int = Field(0, ge=0, description="the shard of every row in it (0 when not partitioned)")
    folder: str | None = Field(None, description="a sibling vector folder holding the chunk (a layered "
                                                 "manifest reuses an earlier version's chunks); None: this one")
    step: int | None = Field(None, description="the training step whose checkpoint embedded these rows")
    refresh: int | None = Field(None, description="the refresh that wrote it (0: the base embedding)")


class VectorChunksManifest(BaseModel):
    """``manifest.json`` of a vector-chunk folder."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    dim: int = Field(ge=1)
    count: int = Field(ge=0)
    rows_per_chunk: int = Field(ge=1)
    num_shards: int = Field(1, ge=1, description="chunks are partitioned by shard_of(id, num_shards)")
    created_at: str
    chunks: list[VectorChunk]


def _encode_chunk(encoded: Sequence[bytes], vectors: np.ndarray) -> bytes:
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, "<i8")
    np.cumsum(lengths, out=offsets[1:])
    id_bytes = b"".join(encoded)
    header = _HEADER.pack(MAGIC, vectors.shape[0], vectors.shape[1], len(id_bytes))
    return b"".join([header, offsets.tobytes(), id_bytes, vectors.astype("<f4", copy=False).tobytes()])


def _decode_chunk(data: bytes, dim: int, uri: str) -> tuple[list[str], np.ndarray]:
    magic, rows, chunk_dim, id_bytes = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or chunk_dim != dim:
        raise SnapshotError(f"{uri}: not a vector chunk of dimension {dim} (magic {magic!r}, dim {chunk_dim})")
    start = _HEADER.size
    offsets = np.frombuffer(data, "<i8", rows + 1, start)
    start += 8 * (rows + 1)
    text = data[start: start + id_bytes]
    ids = [text[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    vectors = np.frombuffer(data, "<f4", rows * dim, start + id_bytes).reshape(rows, dim)
    return ids, vectors


class _Pending:
    """Rows queued for one partition (shard) until a chunk's worth is there."""

    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.vectors: list[np.ndarray] = []
        self.rows = 0


class VectorChunkWriter:
    """Write ``(ids, vectors)`` batches of any size as fixed-row chunks; :meth:`close` writes the manifest.

    With ``num_shards`` S > 1 every row goes to the partition of its shard (``shard_of``) and
    each chunk holds one shard's rows, so the builder of shard s reads only its own chunks (with
    S = 1, or a build with another S, builders read every chunk and keep their rows). Holds at most
    one chunk's rows per partition plus the batch being written. Use as a context manager or call
    :meth:`close` (an unclosed writer leaves chunks without a manifest: invisible to readers).
    """

    def __init__(self, uri: str, dim: int, storage: StorageConfig | None = None, rows_per_chunk: int = 65536,
                 *, num_shards: int = 1, step: int | None = None, refresh: int | None = None) -> None:
        if dim < 1 or rows_per_chunk < 1 or num_shards < 1:
            raise AnnInputError(f"dim, rows_per_chunk and num_shards must be positive, "
                                f"got {dim}, {rows_per_chunk}, {num_shards}")
        self.uri, self.dim, self.storage, self.rows_per_chunk = uri, dim, storage, rows_per_chunk
        self.num_shards = num_shards
        self.step, self.refresh = step, refresh
        self._pending = [_Pending() for _ in range(num_shards)]
        self._chunks: list[VectorChunk] = []
        self._count = 0
        self._closed = False

    def write(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Queue a batch (float32 (n, dim), n ids); full chunks are uploaded now."""
        if self._closed:
            raise AnnInputError(f"{self.uri}: the writer is closed")
        array = check_vectors(vectors, self.dim, "vectors")
        if len(ids) != array.shape[0]:
            raise AnnInputError(f"ids: {len(ids)} ids for {array.shape[0]} vectors")
        encoded = encode_ids(ids)
        if self.num_shards == 1:
            self._queue(0, encoded, array)
            return
        owner = shard_of(ids, self.num_shards)
        for shard in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == shard)
            self._queue(shard, [encoded[row] for row in rows.tolist()], array[rows])

    def _queue(self, shard: int, encoded: list[bytes], array: np.ndarray) -> None:
        pending = self._pending[shard]
        pending.ids.extend(encoded)
        pending.vectors.append(array)
        pending.rows += array.shape[0]
        if pending.rows >= self.rows_per_chunk:
            self._flush(shard, final=False)

    def _flush(self, shard: int, final: bool) -> None:
        pending = self._pending[shard]
        vectors = np.concatenate(pending.vectors) if len(pending.vectors) > 1 else pending.vectors[0]
        start = 0
        while pending.rows - start >= self.rows_per_chunk or (final and start < pending.rows):
            stop = min(start + self.rows_per_chunk, pending.rows)
            self._upload(shard, pending.ids[start:stop], vectors[start:stop])
            start = stop
        pending.ids = pending.ids[start:]
        pending.vectors = [vectors[start:]] if start < pending.rows else []
        pending.rows -= start

    def _upload(self, shard: int, encoded: Sequence[bytes], vectors: np.ndarray) -> None:
        name = f"chunk-{len(self._chunks):05d}.bin"
        data = _encode_chunk(encoded, vectors)
        store.write_bytes(store.join(self.uri, name), data, self.storage)
        self._chunks.append(VectorChunk(name=name, rows=vectors.shape[0], bytes=len(data), shard=shard,
                                        sha256=hashlib.sha256(data).hexdigest(), step=self.step,
                                        refresh=self.refresh))
        self._count += vectors.shape[0]

    def close(self) -> VectorChunksManifest:
        """Upload the last partial chunk and write ``manifest.json``; returns the manifest."""
        for shard, pending in enumerate(self._pending):
            if pending.rows:
                self._flush(shard, final=True)
        manifest = VectorChunksManifest(
            dim=self.dim, count=self._count, rows_per_chunk=self.rows_per_chunk, num_shards=self.num_shards,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), chunks=list(self._chunks))
        store.write_bytes(store.join(self.uri, MANIFEST_FILE), manifest.model_dump_json(indent=1).encode(),
                          self.storage)
        self._closed = True
        return manifest

    def __enter__(self) -> VectorChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def read_vector_chunks(uri: str, storage: StorageConfig | None = None) -> VectorChunksManifest:
    """The manifest of a vector-chunk folder; ``SnapshotNotFound`` naming the URI when it is missing."""
    manifest_uri = store.join(uri, MANIFEST_FILE)
    data = read_optional(manifest_uri, storage)
    if data is None:
        raise SnapshotNotFound(f"no vector chunks at {uri} ({manifest_uri} is missing: was the writer closed?)")
    try:
        return VectorChunksManifest.model_validate_json(data)
    except ValueError as err:
        raise SnapshotError(f"{manifest_uri}: invalid vector-chunk manifest: {err}") from None


def chunk_uri(uri: str, chunk: VectorChunk) -> str:
    """Where ``chunk`` of the folder ``uri`` lives (a sibling folder for a layered manifest's reused chunks)."""
    if chunk.folder is None:
        return store.join(uri, chunk.name)
    return store.join(uri.rstrip("/").rsplit("/", 1)[0], chunk.folder, chunk.name)


def is_layered(manifest: VectorChunksManifest) -> bool:
    return any(chunk.folder is not None for chunk in manifest.chunks)


def layered(new: VectorChunksManifest, uri: str, older: VectorChunksManifest, older_uri: str, keep_from: int,
            storage: StorageConfig | None = None) -> VectorChunksManifest:
    """``new`` (written at ``uri``) on top of the chunks of ``older`` (at the sibling ``older_uri``)
    written by refresh ``keep_from`` or later: the manifest of a partial refresh, written to ``uri``.

    Raises:
        AnnInputError: the two differ in dimension or shard partitioning, or are not siblings.
    """
    parent, older_parent = (u.rstrip("/").rsplit("/", 1) for u in (uri, older_uri))
    if parent[0] != older_parent[0] or new.dim != older.dim or new.num_shards != older.num_shards:
        raise AnnInputError(f"{uri} cannot layer on {older_uri}: not sibling folders of the same dim and shards")
    reused = [chunk.model_copy(update={"folder": chunk.folder or older_parent[1]}) for chunk in older.chunks
              if (chunk.refresh or 0) >= keep_from]
    manifest = new.model_copy(update={"chunks": reused + list(new.chunks),
                                      "count": sum(chunk.rows for chunk in reused) + new.count})
    store.write_bytes(store.join(uri, MANIFEST_FILE), manifest.model_dump_json(indent=1).encode(), storage)
    return manifest


def iter_vector_chunks(
    uri: str, storage: StorageConfig | None = None, manifest: VectorChunksManifest | None = None,
    shard: int | Collection[int] | None = None, newest_first: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(ids, vectors)`` chunk by chunk, each checked against its sha256 first.

    ``vectors`` is a read-only (rows, dim) float32 view of the downloaded chunk. ``shard``: only
    the chunks of that partition, or of those partitions (a writer with ``num_shards`` > 1
    partitioned them). ``newest_first``: the chunks in reverse manifest order (a layered manifest's
    newest vectors first).

    Raises:
        SnapshotError: a chunk is missing or corrupt (its URI named).
    """
    manifest = manifest or read_vector_chunks(uri, storage)
    wanted = None if shard is None else {shard} if isinstance(shard, int) else set(shard)
    for chunk in reversed(manifest.chunks) if newest_first else manifest.chunks:
        if wanted is not None and chunk.shard not in wanted:
            continue
        where = chunk_uri(uri, chunk)
        data = read_optional(where, storage)
        if data is None:
            raise SnapshotError(f"vector chunk {where} is missing")
        if len(data) != chunk.bytes or hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise SnapshotError(f"checksum mismatch for {where}: the chunk does not match its manifest")
        yield _decode_chunk(data, manifest.dim, where)
