"""The on-storage layout of a Whetstone store: sharded Parquet, quarantine JSONL and the manifest.

Writers buffer rows and write whole shards through :mod:`whetstone.storage` (retries, atomic local
writes, ``s3://``); the manifest is written last, so a store with a ``manifest.json`` is complete.
Shard paths in the manifest are relative to the store root, so a store copied from a local folder
to S3 stays valid. Readers verify each shard's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

import whetstone.storage as wstorage
from whetstone import storage
from whetstone.config.base import StorageConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


class DataIntegrityError(RuntimeError):
    """A store is incomplete or a shard does not match its manifest entry (names the URI)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardEntry(_Model):
    """One Parquet shard: its path relative to the store root, rows, size and sha256."""

    path: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str


class SchemaField(_Model):
    name: str
    type: str
    nullable: bool


class DatasetEntry(_Model):
    """A dataset in the store (``corpus``, ``pairs/train``, ...): its shards and schema."""

    rows: int = Field(ge=0)
    shards: list[ShardEntry]
    schema_fields: list[SchemaField] = Field(alias="schema")
    source: str | None = None  # set when the dataset was ingested on its own (not with the store)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class QuarantineEntry(_Model):
    rows: int = Field(ge=0)
    files: list[str]


class Manifest(_Model):
    """``manifest.json``: every dataset's shards, row counts and schema, plus quarantine files."""

    format: int = MANIFEST_FORMAT
    created_at: str
    source: str
    datasets: dict[str, DatasetEntry]
    quarantine: dict[str, QuarantineEntry] = Field(default_factory=dict)
    total_rows: int = Field(ge=0)

    def dataset(self, name: str, store_uri: str = "<store>") -> DatasetEntry:
        if name not in self.datasets:
            raise KeyError(f"{storage.join(store_uri, MANIFEST_NAME)} has no dataset {name!r}; "
                           f"it has {sorted(self.datasets)}")
        return self.datasets[name]

    def shard_uris(self, store_uri: str, name: str) -> list[str]:
        """Full URIs of the shards of ``name`` under ``store_uri``."""
        return [storage.join(store_uri, shard.path) for shard in self.dataset(name, store_uri).shards]


def schema_fields(schema: pa.Schema) -> list[SchemaField]:
    return [SchemaField(name=f.name, type=str(f.type), nullable=f.nullable) for f in schema]


def new_manifest(source: str, datasets: dict[str, DatasetEntry],
                 quarantine: dict[str, QuarantineEntry]) -> Manifest:
    return Manifest(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=source,
        datasets=datasets,
        quarantine=quarantine,
        total_rows=sum(entry.rows for entry in datasets.values()),
    )


def write_manifest(store_uri: str, manifest: Manifest, storage_config: StorageConfig | None = None) -> str:
    uri = storage.join(store_uri, MANIFEST_NAME)
    text = manifest.model_dump_json(by_alias=True, indent=2)
    storage.write_bytes(uri, text.encode("utf-8"), storage_config)
    return uri


def require_store(given: str, resolved: str, storage_config: StorageConfig | None = None) -> None:
    """Stop a training job at start when ``store_uri`` holds no ingested store.

    ``given`` is the URI as the user wrote it, ``resolved`` the absolute one. A relative path under
    ``ray job submit`` resolves inside the job's unpacked working directory, which never holds a
    gitignored local store (``.whetstone/``): the message says so and what to pass instead.
    """
    import os

    from whetstone.config.base import ConfigError

    if storage.exists(storage.join(resolved, MANIFEST_NAME), storage_config):
        return
    message = (f"store_uri: no ingested store at {resolved} ({MANIFEST_NAME} missing); run "
               f"`python -m jobs.ingest --config <ingest config> store_uri={given}` first")
    if "://" not in given and not os.path.isabs(given) and os.environ.get("RAY_ADDRESS"):
        message += (". A relative path resolves in the job's working directory, which under `ray job submit` "
                    "is the uploaded copy of --working-dir (gitignored folders such as .whetstone/ are not "
                    "uploaded): pass an absolute path (store_uri=$PWD/...) on a one-machine cluster, or an s3:// URI")
    raise ConfigError(message)


def read_manifest(store_uri: str, storage_config: StorageConfig | None = None) -> Manifest:
    """Load ``manifest.json`` from a store.

    Raises:
        DataIntegrityError: there is no manifest (the store was never completed) or it is invalid.
    """
    uri = storage.join(store_uri, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(uri, storage_config)
    except FileNotFoundError:
        raise DataIntegrityError(f"{uri} does not exist: not a Whetstone store, or ingest did not finish") from None
    try:
        return Manifest.model_validate_json(raw)
    except ValueError as err:
        raise DataIntegrityError(f"{uri} is not a valid manifest: {err}") from None


def read_shard(uri: str, entry: ShardEntry | None = None,
               storage_config: StorageConfig | None = None) -> pa.Table:
    """Read one Parquet shard, checking its sha256 against ``entry`` when given."""
    data = storage.read_bytes(uri, storage_config)
    if entry is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise DataIntegrityError(f"{uri}: sha256 {digest} does not match the manifest ({entry.sha256})")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as err:
        raise DataIntegrityError(f"{uri} is not a readable Parquet file: {err}") from None
    if entry is not None and table.num_rows != entry.rows:
        raise DataIntegrityError(f"{uri}: {table.num_rows} rows, manifest says {entry.rows}")
    return table


class ShardWriter:
    """Buffers validated rows of one dataset and writes ``part-NNNNN.parquet`` shards.

    Args:
        store_uri: the store root.
        dataset: dataset name, also its folder (``"corpus"``, ``"qrels/train"``).
        schema: the Arrow schema every row must fit.
        rows_per_shard: rows per shard (the last shard may be smaller).
    """

    def __init__(self, store_uri: str, dataset: str, schema: pa.Schema, rows_per_shard: int,
                 storage_config: StorageConfig | None = None, generation: str | None = None) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.store_uri = store_uri
        self.dataset = dataset
        # generation: shards go to <dataset>/<generation>/, beside (not over) what the manifest names now
        self.folder = f"{dataset}/{generation}" if generation else dataset
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.storage_config = storage_config
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._row_buffered = 0
        self._tables: list[pa.Table] = []  # pending whole tables, in arrival order
        self._buffered = 0  # rows in _buffer and _tables together
        self.shards: list[ShardEntry] = []

    @property
    def rows_written(self) -> int:
        return sum(shard.rows for shard in self.shards) + self._buffered

    def add(self, row: dict[str, Any]) -> None:
        for name in self.schema.names:
            self._buffer[name].append(row.get(name))
        self._row_buffered += 1
        self._buffered += 1
        if self._buffered >= self.rows_per_shard:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        """Append validated rows as a table (its columns are selected and cast to the schema)."""
        if table.num_rows == 0:
            return
        self._rows_to_table()  # keep arrival order between add() and add_table()
        self._tables.append(table.select(self.schema.names).cast(self.schema))
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            self._flush()

    def _rows_to_table(self) -> None:
        if self._row_buffered:
            self._tables.append(pa.Table.from_pydict(self._buffer, schema=self.schema))
            self._buffer = {name: [] for name in self.schema.names}
            self._row_buffered = 0

    def _flush(self) -> None:
        """Write the first ``rows_per_shard`` pending rows (or all of them, at close) as a shard."""
        if self._buffered == 0:
            return
        self._rows_to_table()
        pending = pa.concat_tables(self._tables)
        table, rest = pending.slice(0, self.rows_per_shard), pending.slice(self.rows_per_shard)
        # One chunk per column: the bytes (and so the checksum) then depend on the rows alone,
        # not on how the input happened to be chunked (local vs Ray Data ingest).
        table = table.combine_chunks()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        rel = f"{self.folder}/part-{len(self.shards):05d}.parquet"
        storage.write_bytes(storage.join(self.store_uri, rel), data, self.storage_config)
        self.shards.append(ShardEntry(path=rel, rows=table.num_rows, bytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest()))
        self._tables = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows

    def close(self) -> DatasetEntry:
        """Write the last shard (an empty dataset still gets one empty shard, to carry the schema)."""
        while self._buffered:
            self._flush()
        if not self.shards:
            self._write_empty()
        return DatasetEntry(rows=self.rows_written, shards=list(self.shards),
                            schema_fields=schema_fields(self.schema))

    def _write_empty(self) -> None:
        table = self.schema.empty_table()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        rel = f"{self.folder}/part-00000.parquet"
        storage.write_bytes(storage.join(self.store_uri, rel), data, self.storage_config)
        self.shards.append(ShardEntry(path=rel, rows=0, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


class QuarantineWriter:
    """Collects rejected rows of one dataset as JSONL (``reason``, ``file``, ``line`` or ``row``, ``raw``).

    Rows are buffered and written in parts of ``rows_per_part``, so a corpus that is mostly bad
    does not sit in memory.
    """

    def __init__(self, store_uri: str, dataset: str, storage_config: StorageConfig | None = None,
                 rows_per_part: int = 50_000, generation: str | None = None) -> None:
        self.store_uri = store_uri
        self.dataset = dataset
        self.folder = f"{dataset}/{generation}" if generation else dataset
        self.storage_config = storage_config
        self.rows_per_part = rows_per_part
        self._buffer = io.StringIO()
        self._buffered = 0
        self.rows = 0
        self.files: list[str] = []

    def add(self, reason: str, file: str, line: int, raw: bytes | str, unit: str = "line",
            rows: int = 1) -> None:
        """Record one rejected row; ``unit`` names what ``line`` counts (``"row"`` for Parquet).
        ``rows`` > 1: the record stands for that many source rows (an unreadable row group); they
        count as quarantined and the record says so (``rows_lost``)."""
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        record = {"reason": reason, "file": file, unit: line, "raw": raw}
        if rows != 1:
            record["rows_lost"] = rows
        self._buffer.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._buffered += 1
        self.rows += rows
        if self._buffered >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        rel = f"quarantine/{self.folder}/part-{len(self.files):05d}.jsonl"
        storage.write_bytes(storage.join(self.store_uri, rel), self._buffer.getvalue().encode("utf-8"),
                            self.storage_config)
        self.files.append(rel)
        self._buffer = io.StringIO()
        self._buffered = 0

    def close(self) -> QuarantineEntry:
        self._flush()
        return QuarantineEntry(rows=self.rows, files=list(self.files))


def read_dataset_table(store_uri: str, name: str, storage: StorageConfig | None = None,
                       columns: Sequence[str] | None = None) -> pa.Table:
    """Read every shard of dataset ``name`` (``"corpus"``, ``"qrels/test"``, ...) listed in the manifest.

    Each shard's sha256 and row count are checked against the manifest.

    Raises:
        DataIntegrityError: no manifest, or a shard is missing, corrupt or altered (names the URI).
        KeyError: the store has no dataset ``name``.
    """
    manifest = read_manifest(store_uri, storage)
    entry = manifest.dataset(name, store_uri)
    tables = []
    for shard in entry.shards:
        table = read_shard(wstorage.join(store_uri, shard.path), shard, storage)
        tables.append(table.select(list(columns)) if columns is not None else table)
    return pa.concat_tables(tables)
