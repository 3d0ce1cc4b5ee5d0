"""One shard's files streamed through fixed-size, checksummed chunks in object storage.

:class:`ChunkSink` is a ``write(bytes)`` stream that cuts what it is given into objects of
``chunk_bytes`` and uploads each as soon as it fills (sha256 each); :class:`ChunkSource`
downloads one chunk at a time, verifies its sha256 before handing out a byte, and serves
``read(n)``. FAISS writes through ``faiss.PyCallbackIOWriter`` into a sink and reads through
``faiss.PyCallbackIOReader`` from a source, and the :class:`~whetstone.index.idmap.IdMap` streams
its arrays the same way, so saving or loading a shard holds the index plus one chunk, never a
second serialised copy. :mod:`whetstone.index.shard_io` puts an ``AnnIndex`` on top.
"""

from __future__ import annotations

import hashlib
from typing import Any

import faiss

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.index.faiss_kinds import read_faiss, write_faiss
from whetstone.index.idmap import IdMap
from whetstone.index.snapshot import (
    DEFAULT_CHUNK_BYTES,
    IDS_FILE,
    INDEX_FILE,
    ChunkDigest,
    FileDigest,
    ShardEntry,
    SnapshotError,
    read_optional,
    shard_prefix,
)


class ChunkSink:
    """Upload what is written as ``{prefix}/{name}.{c:05d}`` objects of ``chunk_bytes`` each.

    Holds at most one chunk plus the piece being written. :meth:`close` uploads the remainder and
    returns the file's :class:`FileDigest`.
    """

    def __init__(self, index_root_uri: str, prefix: str, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 storage: StorageConfig | None = None) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes: must be positive, got {chunk_bytes}")
        self.base = store.join(index_root_uri, prefix)
        self.name, self.chunk_bytes, self.storage = name, chunk_bytes, storage
        self._buffer = bytearray()
        self._chunks: list[ChunkDigest] = []
        self._total = 0

    def write(self, data: Any) -> None:
        self._buffer += data
        while len(self._buffer) >= self.chunk_bytes:
            self._upload(self.chunk_bytes)

    __call__ = write

    def _upload(self, size: int) -> None:
        name = f"{self.name}.{len(self._chunks):05d}"
        with memoryview(self._buffer) as whole, whole[:size] as view:
            digest = hashlib.sha256(view).hexdigest()
            store.write_bytes(store.join(self.base, name), view, self.storage)
        del self._buffer[:size]
        self._chunks.append(ChunkDigest(name=name, bytes=size, sha256=digest))
        self._total += size

    def close(self) -> FileDigest:
        if self._buffer:
            self._upload(len(self._buffer))
        return FileDigest(bytes=self._total, chunks=list(self._chunks))


class ChunkSource:
    """Read a chunked file back, verifying each chunk's sha256 before using it.

    ``read(n)`` returns exactly ``n`` bytes (fewer only at the end), across chunk boundaries.

    Raises:
        SnapshotError: a chunk is missing, has the wrong size or sha256 (the chunk's URI is
            named), or the file ends early.
    """

    def __init__(self, index_root_uri: str, prefix: str, digest: FileDigest,
                 storage: StorageConfig | None = None) -> None:
        self.base = store.join(index_root_uri, prefix)
        self.digest, self.storage = digest, storage
        self._next_chunk = 0
        self._current = memoryview(b"")
        self._position = 0
        self.error: SnapshotError | None = None  # kept: FAISS turns a callback's exception into its own

    def _fetch(self) -> bool:
        if self._next_chunk >= len(self.digest.chunks):
            return False
        chunk = self.digest.chunks[self._next_chunk]
        uri = store.join(self.base, chunk.name)
        data = read_optional(uri, self.storage)
        if data is None:
            self.error = SnapshotError(f"snapshot chunk {uri} is missing")
        elif len(data) != chunk.bytes or hashlib.sha256(data).hexdigest() != chunk.sha256:
            self.error = SnapshotError(f"checksum mismatch for {uri}: the chunk ({len(data)} bytes) does not "
                                       f"match its manifest ({chunk.bytes} bytes, sha256 {chunk.sha256[:12]}...)")
        if self.error is not None:
            raise self.error
        self._next_chunk += 1
        self._current, self._position = memoryview(data), 0
        return True

    def read(self, n: int) -> bytes:
        pieces = []
        while n > 0:
            if self._position >= len(self._current) and not self._fetch():
                break
            piece = self._current[self._position: self._position + n]
            self._position += len(piece)
            n -= len(piece)
            pieces.append(piece.tobytes())
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    __call__ = read

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise SnapshotError(f"{self.where}: ends after {self.digest.bytes} bytes, a reader wanted more")
        return data

    def readinto(self, buffer: memoryview) -> None:
        """Fill ``buffer`` completely (arrays are read in place, without an intermediate copy)."""
        filled = 0
        while filled < len(buffer):
            if self._position >= len(self._current) and not self._fetch():
                raise SnapshotError(f"{self.where}: ends after {self.digest.bytes} bytes, a reader wanted more")
            piece = self._current[self._position: self._position + len(buffer) - filled]
            buffer[filled: filled + len(piece)] = piece
            filled += len(piece)
            self._position += len(piece)

    def finish(self) -> None:
        """Check that the reader consumed the whole file (a leftover byte means a mismatch)."""
        left = len(self._current) - self._position + sum(
            chunk.bytes for chunk in self.digest.chunks[self._next_chunk:])
        if left:
            raise SnapshotError(f"{self.where}: {left} bytes left unread (the file does not match its reader)")
        self._current = memoryview(b"")

    @property
    def where(self) -> str:
        first = self.digest.chunks[0].name.rsplit(".", 1)[0] if self.digest.chunks else "?"
        return store.join(self.base, first)


def write_shard_files(
    faiss_index: faiss.Index,
    idmap: IdMap,
    index_root_uri: str,
    version: int,
    shard: int,
    *,
    storage: StorageConfig | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ShardEntry:
    """Stream a CPU FAISS index and its IdMap into ``v{version}/shard-{shard:04d}/`` chunks."""
    prefix = shard_prefix(version, shard)
    files = {}
    sink = ChunkSink(index_root_uri, prefix, INDEX_FILE, chunk_bytes, storage)
    write_faiss(faiss_index, sink)
    files[INDEX_FILE] = sink.close()
    sink = ChunkSink(index_root_uri, prefix, IDS_FILE, chunk_bytes, storage)
    idmap.write(sink)
    files[IDS_FILE] = sink.close()
    return ShardEntry(shard=shard, count=len(idmap), prefix=prefix, files=files)


def read_shard_files(
    index_root_uri: str, entry: ShardEntry, storage: StorageConfig | None = None
) -> tuple[faiss.Index, IdMap]:
    """Read a shard's FAISS index (on CPU) and IdMap back, chunk by chunk, checksums verified.

    Raises:
        SnapshotError: a file is not listed, a chunk is missing or corrupt (URI named), or the
            id count does not match the entry.
    """
    missing = {INDEX_FILE, IDS_FILE} - set(entry.files)
    if missing:
        raise SnapshotError(f"{store.join(index_root_uri, entry.prefix)}: manifest lists no {sorted(missing)}")
    source = ChunkSource(index_root_uri, entry.prefix, entry.files[INDEX_FILE], storage)
    try:
        faiss_index = read_faiss(source)
    except RuntimeError as err:
        if source.error is not None:
            raise source.error from None
        if isinstance(err, SnapshotError):
            raise
        raise SnapshotError(f"{source.where}: FAISS could not read it: {str(err).strip()[:300]}") from None
    source.finish()
    source = ChunkSource(index_root_uri, entry.prefix, entry.files[IDS_FILE], storage)
    try:
        idmap = IdMap.read(source.read_exact, source.readinto, source.where)
    except ValueError as err:
        raise SnapshotError(str(err)) from None
    source.finish()
    if len(idmap) != entry.count:
        raise SnapshotError(f"{source.where}: {len(idmap)} live ids, the manifest says {entry.count}")
    return faiss_index, idmap
