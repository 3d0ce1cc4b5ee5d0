"""Declared-format source files -> validated, *staged* Arrow tables, one file at a time.

A source is one file or a folder / ``s3://`` prefix of shards: ``*.jsonl``, ``*.jsonl.gz`` and
``*.parquet``. :func:`stage_file` reads one file and yields tables of the *staged schema*: the
columns of the target store schema (all nullable here) plus

    ``_file``    the source file URI
    ``_pos``     1-based line (JSONL) or row (Parquet) in that file; 0 for a whole-file failure
    ``_reason``  null for a valid record, else why it was rejected (names the field)
    ``_raw``     the source record as text, for rejected records only

Every record of the file appears exactly once, valid or not, so whoever consumes the staged
tables can keep the accounting exact: rows in = rows written + rows quarantined. The function is
pure per file, which is what lets the Ray Data ingest run it in parallel tasks and the in-process
ingest run it in a loop with identical results.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from whetstone import storage
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S
from whetstone.data.sources import SourceError, iter_lines
from whetstone.data.validate import (
    RowRejected,
    corpus_row,
    hh_rlhf_row,
    pairs_row,
    parse_json_object,
    preference_row,
)

RecordKind = Literal["corpus", "pairs", "preference", "hh-rlhf"]
RECORD_KINDS: tuple[str, ...] = ("corpus", "pairs", "preference", "hh-rlhf")
SOURCE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")

FILE, POS, REASON, RAW = "_file", "_pos", "_reason", "_raw"
# A damage record (a part of the file that cannot be read) carries how many source rows it stands
# for: the rows of an unreadable Parquet row group (from the footer), or 0 where that cannot be
# known (a truncated or corrupt gzip/JSONL stream: whatever came after the break). Null otherwise.
LOST = "_lost"


class FileDamaged(RowRejected):
    """Part of a source file cannot be read; ``lost`` rows of it (0: unknown how many) are gone."""

    def __init__(self, message: str, lost: int) -> None:
        super().__init__(message)
        self.lost = lost

# The store dataset kind each source kind is written as (hh-rlhf becomes ordinary preference rows).
STORE_KIND: dict[str, str] = {"corpus": "corpus", "pairs": "pairs", "preference": "preference",
                              "hh-rlhf": "preference"}
ID_COLUMN: dict[str, str] = {"corpus": S.DOC_ID, "pairs": S.QUERY_ID, "preference": S.PAIR_ID}


def _corpus(record: dict[str, Any], default_id: str) -> dict[str, Any]:
    return corpus_row(record)  # documents must carry their own id: pairs refer to it


VALIDATORS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "corpus": _corpus,
    "pairs": pairs_row,
    "preference": preference_row,
    "hh-rlhf": hh_rlhf_row,
}


def target_schema(kind: str) -> pa.Schema:
    """The store schema rows of source ``kind`` are written with."""
    if kind not in STORE_KIND:
        raise ValueError(f"unknown record kind {kind!r}; kinds are {list(RECORD_KINDS)}")
    return S.SCHEMAS[STORE_KIND[kind]]


def staged_schema(kind: str) -> pa.Schema:
    """:func:`target_schema` with every field nullable, plus ``_file``, ``_pos``, ``_reason``, ``_raw``
    and ``_lost`` (see :data:`LOST`)."""
    fields = [field.with_nullable(True) for field in target_schema(kind)]
    fields += [pa.field(FILE, pa.string()), pa.field(POS, pa.int64()), pa.field(REASON, pa.string()),
               pa.field(RAW, pa.string()), pa.field(LOST, pa.int64())]
    return pa.schema(fields)


def position_unit(file_uri: str) -> str:
    """What ``_pos`` counts in ``file_uri``: ``"row"`` for Parquet, ``"line"`` otherwise."""
    return "row" if file_uri.endswith(".parquet") else "line"


def list_source_files(source: str, storage_config: StorageConfig | None = None) -> list[tuple[str, int]]:
    """``(uri, size in bytes)`` of every source file: ``source`` itself, or the files under it.

    Names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``) are skipped, as writers of sharded
    datasets leave them; any other file with an unsupported suffix is an error rather than being
    ignored, because ignoring it would lose its rows without counting them.

    Raises:
        SourceError: ``source`` does not exist, is empty, or holds unsupported files (named).
    """
    loc = storage.resolve(source, storage_config)
    info = storage.with_retries(source, lambda: loc.filesystem.get_file_info(loc.path), storage_config, "stat")
    prefix = "s3://" if storage.is_s3(source) else ""
    if info.type == pafs.FileType.File:
        infos = [info]
    elif info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(loc.path, recursive=True)
        infos = storage.with_retries(source, lambda: loc.filesystem.get_file_info(selector), storage_config,
                                     "list")
        infos = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))]
    else:
        raise SourceError(f"{source} does not exist")
    unsupported = [prefix + i.path for i in infos if not i.path.endswith(SOURCE_SUFFIXES)]
    if unsupported:
        raise SourceError(f"unsupported source file(s) {unsupported[:5]}: expected {list(SOURCE_SUFFIXES)}")
    if not infos:
        raise SourceError(f"{source} holds no {list(SOURCE_SUFFIXES)} files")
    files = sorted((prefix + i.path, int(i.size or 0)) for i in infos)
    return files if info.type == pafs.FileType.Directory else [(source, files[0][1])]


def relative_name(source: str, file_uri: str) -> str:
    """``file_uri`` relative to the ``source`` folder (its base name when ``source`` is the file)."""
    root = source.rstrip("/")
    if file_uri == root:
        return posixpath.basename(file_uri)
    if not storage.is_s3(root):  # list_source_files returns absolute local paths
        root = str(Path(root.removeprefix("file://")).expanduser().resolve())
    return posixpath.relpath(file_uri, root)


def _jsonl_records(uri: str, storage_config: StorageConfig | None) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, parsed object or RowRejected, raw text)`` per non-blank line; a break mid-file is
    one last record at the next line number, since the rows after it cannot be counted."""
    last = 0
    try:
        for last, raw in iter_lines(uri, storage_config):
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                yield last, parse_json_object(raw), None
            except RowRejected as err:
                yield last, err, raw.decode("utf-8", errors="replace")
    except SourceError as err:  # the data is damaged (a storage outage raises StorageError: the run fails)
        yield last + 1, FileDamaged(f"file breaks at line {last + 1}: {err}", lost=0), ""


def _parquet_records(uri: str, storage_config: StorageConfig | None,
                     chunk_rows: int) -> Iterator[tuple[int, Any, str | None]]:
    """``(row, record dict or RowRejected, None)``, row group by row group: a row group that
    cannot be read is one damage record standing for its rows (their count is in the footer) and
    the next group is read; a file whose footer cannot be read is one damage record at row 0."""
    reader = _ParquetGroups(uri, storage_config)
    try:
        groups = reader.sizes()
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, storage.StorageError):
            raise
        yield 0, FileDamaged(f"whole file rejected: not a readable Parquet file: {err}", lost=0), ""
        return
    row = 0
    try:
        for group, size in enumerate(groups):
            try:
                table = reader.read(group)
            except (pa.ArrowException, OSError) as err:
                if isinstance(err, storage.StorageError):
                    raise
                yield row + 1, FileDamaged(f"row group {group} (rows {row + 1} to {row + size}, {size} rows) "
                                           f"unreadable: {err}", lost=size), ""
                row += size
                continue
            for batch in table.to_batches(max_chunksize=chunk_rows):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record, None
    finally:
        reader.close()


class _ParquetGroups:
    """A Parquet source read one row group at a time; a network failure (a stalled or dropped
    connection) reopens the file and reads the group again, within the storage retry budget."""

    def __init__(self, uri: str, storage_config: StorageConfig | None) -> None:
        self.uri, self.storage_config = uri, storage_config
        self.loc = storage.resolve(uri, storage_config)
        self.file: pq.ParquetFile | None = None

    def _open(self) -> pq.ParquetFile:
        if self.file is None:
            self.file = pq.ParquetFile(self.loc.filesystem.open_input_file(self.loc.path))
        return self.file

    def _retrying(self, op: Callable[[pq.ParquetFile], Any], what: str) -> Any:
        def attempt() -> Any:
            try:
                return op(self._open())
            except OSError:
                self.close()  # a retry starts from a fresh handle
                raise
        return storage.with_retries(self.uri, attempt, self.storage_config, what, only=storage.is_network_error)

    def sizes(self) -> list[int]:
        return self._retrying(lambda f: [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)],
                              "read footer")

    def read(self, group: int) -> pa.Table:
        return self._retrying(lambda f: f.read_row_group(group), f"read row group {group}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _raw_text(record: Any, raw: str | None) -> str:
    if raw is not None:
        return raw
    return json.dumps(record, ensure_ascii=False, default=str)


def stage_file(file_uri: str, kind: str, id_prefix: str, storage_config: StorageConfig | None = None,
               chunk_rows: int = 8192) -> Iterator[pa.Table]:
    """Read and validate one source file; yield staged tables of at most ``chunk_rows`` rows.

    Args:
        file_uri: a ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` file (local or ``s3://``).
        kind: ``"corpus"``, ``"pairs"``, ``"preference"`` or ``"hh-rlhf"``.
        id_prefix: records without their own id (pairs, preference, hh-rlhf) get
            ``"<id_prefix>:<line or row>"``, so ids stay stable across re-ingests.
        storage_config: how to reach ``s3://``.
        chunk_rows: rows per yielded table.

    Yields:
        Tables of :func:`staged_schema`; concatenated, one row per record of the file, in order.
    """
    schema = staged_schema(kind)
    validate = VALIDATORS[kind]
    columns = target_schema(kind).names
    is_parquet = file_uri.endswith(".parquet")
    records = (_parquet_records(file_uri, storage_config, chunk_rows) if is_parquet
               else _jsonl_records(file_uri, storage_config))
    rows: list[dict[str, Any]] = []
    for position, record, raw in records:
        try:
            if isinstance(record, RowRejected):
                raise record
            row = validate(record, f"{id_prefix}:{position}")
            row.update({FILE: file_uri, POS: position, REASON: None, RAW: None, LOST: None})
        except RowRejected as err:
            row = dict.fromkeys(columns)
            row.update({FILE: file_uri, POS: position, REASON: str(err), RAW: _raw_text(record, raw),
                        LOST: err.lost if isinstance(err, FileDamaged) else None})
        rows.append(row)
        if len(rows) >= chunk_rows:
            yield pa.Table.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)


__all__ = ["RECORD_KINDS", "SOURCE_SUFFIXES", "list_source_files", "stage_file", "staged_schema",
           "target_schema"]
