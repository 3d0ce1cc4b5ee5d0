"""Reading raw source files (local or ``s3://``, plain or gzip) line by line, with line numbers.

Line numbers are 1-based physical lines of the decompressed file, so a quarantine record or an
error message points at the line a person would open in an editor.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from whetstone import storage
from whetstone.config.base import StorageConfig

READ_CHUNK_BYTES = 1 << 20
COMPRESSED_SUFFIXES = (".gz",)


class SourceError(ValueError):
    """A source file is missing, ambiguous or unreadable; the message names the file."""


def find_source_file(folder_uri: str, name: str, storage_config: StorageConfig | None = None,
                     required: bool = True) -> str | None:
    """The URI of ``name`` or ``name.gz`` inside ``folder_uri``.

    Raises:
        SourceError: neither exists (when ``required``) or both exist (which one is meant?).
    """
    found = [uri for uri in (storage.join(folder_uri, name), storage.join(folder_uri, name + ".gz"))
             if storage.exists(uri, storage_config)]
    if len(found) == 2:
        raise SourceError(f"both {found[0]} and {found[1]} exist; remove one so the source is unambiguous")
    if not found:
        if required:
            raise SourceError(f"{storage.join(folder_uri, name)} (or {name}.gz) does not exist")
        return None
    return found[0]


def list_qrels_splits(folder_uri: str, storage_config: StorageConfig | None = None) -> dict[str, str]:
    """Map split name -> qrels file URI for ``qrels/<split>.tsv[.gz]`` under a BEIR folder."""
    splits: dict[str, str] = {}
    for uri in storage.list_dir(storage.join(folder_uri, "qrels"), storage_config):
        base = uri.rsplit("/", 1)[-1]
        split = base.removesuffix(".gz").removesuffix(".tsv")
        if not base.removesuffix(".gz").endswith(".tsv"):
            continue
        if split in splits:
            raise SourceError(f"both {splits[split]} and {uri} exist; remove one")
        splits[split] = uri
    return splits


def _raw_chunks(uri: str, storage_config: StorageConfig | None) -> Iterator[bytes]:
    """The object's bytes as stored; reads resume after a transient failure (storage.read_chunks).

    Raises:
        SourceError: the object does not exist.
        StorageError: storage failed for good (permanent error, or the retry budget was spent): the
            run fails, rather than recording the rest of the file as damaged.
    """
    try:
        yield from storage.read_chunks(uri, storage_config, READ_CHUNK_BYTES)
    except FileNotFoundError:
        raise SourceError(f"{uri} does not exist") from None


def _chunks(uri: str, storage_config: StorageConfig | None) -> Iterator[bytes]:
    """The file's bytes in chunks, gunzipped when it ends in ``.gz``.

    Decompression is done here with zlib rather than by the stream, so every byte before a
    truncation point is delivered before the error (a truncated upload keeps its complete lines).
    """
    gzipped = uri.endswith(COMPRESSED_SUFFIXES)
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gzipped else None
    for chunk in _raw_chunks(uri, storage_config):
        if decompressor is None:
            yield chunk
            continue
        while chunk:
            try:
                yield decompressor.decompress(chunk)
            except zlib.error as err:
                raise SourceError(f"{uri}: not a valid gzip stream: {err}") from None
            chunk = decompressor.unused_data if decompressor.eof else b""
            if chunk:  # concatenated gzip members: start the next one
                decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if decompressor is not None and not decompressor.eof:
        raise SourceError(f"{uri}: gzip stream ends early (truncated file?)")


def iter_lines(uri: str, storage_config: StorageConfig | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` for each line (without ``\\n`` / ``\\r\\n``), blank lines included.

    Raises:
        SourceError: the stream breaks mid-file (e.g. a truncated gzip) after every complete line
            before the break was yielded; the message names the file and the line that broke.
    """
    line_number = 0
    pending = b""
    try:
        for chunk in _chunks(uri, storage_config):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                line_number += 1
                yield line_number, raw.removesuffix(b"\r")
    except SourceError as err:
        raise SourceError(f"{err}; line {line_number + 1} is incomplete, lines after it are lost") from None
    if pending:
        yield line_number + 1, pending.removesuffix(b"\r")
