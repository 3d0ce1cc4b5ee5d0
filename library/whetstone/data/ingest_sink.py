"""What every ingest writes through and reports: one dataset's sink (shards + quarantine + the
rows-in counter), the per-dataset row accounting and the report; and how a store changes
atomically.

Atomic per dataset version ("write new objects, then flip one pointer"): an ingest writes its
shards and quarantine parts to a new generation folder (``<dataset>/<generation>/``) beside the
ones the manifest names, writes ``manifest.json`` last (the one pointer), and only then removes
what the manifest no longer names. A re-ingest killed at any point leaves the previous manifest
and every file it names in place: the store stays readable, and the next ingest removes the
leftovers. A first ingest marks the folder ``INGESTING`` until its manifest exists, so a rerun
after a kill knows the leftovers are its own and removes them instead of refusing the folder.

Both ingest paths use these: :mod:`whetstone.data.ingest` (BEIR folders, the one entry point) and
:mod:`whetstone.data.ingest_files` (declared-format records). They live below both so that the
imports go one way: ``ingest -> ingest_files -> ingest_sink``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.console import ProgressLine, plural
from whetstone.data.store import (
    MANIFEST_NAME,
    DatasetEntry,
    Manifest,
    QuarantineEntry,
    QuarantineWriter,
    ShardWriter,
    read_manifest,
)

INGESTING_MARKER = "INGESTING"

logger = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """Ingest cannot proceed (bad destination, missing split); the message names the URI."""


class DatasetCounts(BaseModel):
    """Row accounting for one dataset: ``rows_in == rows_written + rows_quarantined``."""

    model_config = ConfigDict(extra="forbid")
    rows_in: int = Field(ge=0)
    rows_written: int = Field(ge=0)
    rows_quarantined: int = Field(ge=0)

    @model_validator(mode="after")
    def _adds_up(self) -> DatasetCounts:
        if self.rows_in != self.rows_written + self.rows_quarantined:
            raise ValueError(f"rows_in {self.rows_in} != written {self.rows_written} + "
                             f"quarantined {self.rows_quarantined}")
        return self


class DamagedFile(BaseModel):
    """A source file that could be read only in part (or not at all)."""

    model_config = ConfigDict(extra="forbid")
    file: str
    rows_read: int = Field(ge=0, description="rows read from it (written or quarantined one by one)")
    rows_lost: int | None = Field(description="rows that could not be read: counted from a Parquet footer; None "
                                              "where the file breaks off (truncated gzip/JSONL: unknowable)")
    damage: list[str] = Field(description="what could not be read, where")


class IngestReport(BaseModel):
    """What an ingest did; JSON-serialisable (``report.model_dump_json()``)."""

    model_config = ConfigDict(extra="forbid")
    source: str
    store_uri: str
    manifest_uri: str
    datasets: dict[str, DatasetCounts]
    quarantine_files: dict[str, list[str]] = Field(default_factory=dict)
    failed_files: dict[str, list[str]] = Field(
        default_factory=dict, description="per dataset, files rejected whole (e.g. corrupt Parquet)")
    damaged_files: dict[str, list[DamagedFile]] = Field(
        default_factory=dict, description="per dataset, files read in part: what was read, what was lost and where "
                                          "(each lost part is also a quarantine record)")
    engine: str = "local"
    seconds: float = 0.0

    @property
    def rows_quarantined(self) -> int:
        return sum(c.rows_quarantined for c in self.datasets.values())

    def summary(self) -> str:
        """One line per dataset, for logs and the CLI."""
        lines = [f"ingested {self.source} -> {self.store_uri} in {self.seconds:.1f}s ({self.engine})"]
        for name, c in sorted(self.datasets.items()):
            lines.append(f"  {name:<20} in {c.rows_in:>9}  written {c.rows_written:>9}  "
                         f"quarantined {c.rows_quarantined:>7}")
        for name, files in sorted(self.failed_files.items()):
            lines.extend(f"  {name:<20} whole file rejected: {file}" for file in files)
        for name, damaged in sorted(self.damaged_files.items()):
            lines.extend(f"  {name:<20} DAMAGED {d.file}: {d.rows_read} rows read, "
                         f"{'an unknown number of' if d.rows_lost is None else d.rows_lost} rows lost ({d.damage[0]}"
                         f"{f' and {len(d.damage) - 1} more' if len(d.damage) > 1 else ''})" for d in damaged)
        return "\n".join(lines)


class DatasetSink:
    """One dataset's shard writer + quarantine writer + its rows-in counter.

    With ``progress_every_s`` (not None) it prints ``[ingest] <dataset>: N rows (R rows/s), S shards,
    Q quarantined`` at most that often while rows arrive, and the totals when it closes.
    """

    def __init__(self, store_uri: str, dataset: str, schema: pa.Schema, rows_per_shard: int,
                 storage_config: StorageConfig | None, generation: str | None = None,
                 progress_every_s: float | None = None) -> None:
        self.dataset = dataset
        self.rows_in = 0
        self.shards = ShardWriter(store_uri, dataset, schema, rows_per_shard, storage_config, generation)
        self.quarantine = QuarantineWriter(store_uri, dataset, storage_config, generation=generation)
        self.progress = None if progress_every_s is None else ProgressLine(
            dataset, "rows", every_s=progress_every_s, tag="[ingest]",
            details=lambda: f"{plural(len(self.shards.shards), 'shard')}, {self.quarantine.rows:,} quarantined")

    def accept(self, row: dict[str, Any]) -> None:
        self.shards.add(row)
        if self.progress is not None:
            self.progress.update(self.rows_in)

    def accept_table(self, table: pa.Table) -> None:
        self.shards.add_table(table)
        if self.progress is not None:
            self.progress.update(self.rows_in)

    def reject(self, reason: str, file: str, line: int, raw: bytes | str, unit: str = "line", rows: int = 1) -> None:
        logger.debug("quarantined %s %s %d: %s", file, unit, line, reason)
        self.quarantine.add(reason, file, line, raw, unit, rows)

    def close(self) -> tuple[DatasetEntry, QuarantineEntry, DatasetCounts]:
        entry = self.shards.close()
        quarantined = self.quarantine.close()
        counts = DatasetCounts(rows_in=self.rows_in, rows_written=entry.rows,
                               rows_quarantined=quarantined.rows)
        if self.progress is not None:
            self.progress.count = self.rows_in
            self.progress.details = lambda: (f"{entry.rows:,} written in {plural(len(entry.shards), 'shard')}, "
                                             f"{quarantined.rows:,} quarantined")
            self.progress.done()
        return entry, quarantined, counts


def new_generation() -> str:
    """A fresh, sortable folder name for one ingest's files (``20261205T213000-1a2b3c``)."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def open_store(dest_uri: str, storage_config: StorageConfig | None) -> Manifest | None:
    """Before an ingest writes: the store's manifest (a re-ingest; what it names stays readable
    until the new manifest replaces it), or None for a new store, which gets the ``INGESTING``
    marker. A folder with files but no manifest is refused, unless the marker says a first ingest
    was cut off there: then what it wrote is removed.

    Raises:
        IngestError: ``dest_uri`` holds files but no manifest and no marker (not a store).
    """
    if store.exists(store.join(dest_uri, MANIFEST_NAME), storage_config):
        return read_manifest(dest_uri, storage_config)
    marker = store.join(dest_uri, INGESTING_MARKER)
    entries = store.list_dir(dest_uri, storage_config)
    if entries:
        if not store.exists(marker, storage_config):
            raise IngestError(f"{dest_uri} is not empty and holds no {MANIFEST_NAME}; "
                              "refusing to write a store into it")
        logger.warning("%s: a first ingest there did not finish (%s); removing what it wrote", dest_uri,
                       INGESTING_MARKER)
        for entry in entries:
            store.delete_path(entry, storage_config)
    store.write_bytes(marker, json.dumps({"started_at": time.time()}).encode(), storage_config)
    return None


def remove_superseded(dest_uri: str, manifest: Manifest, datasets: Iterable[str],
                      storage_config: StorageConfig | None) -> None:
    """After ``manifest`` is written: remove every file under each of ``datasets`` (its shard and
    quarantine folders) that the manifest does not name: the previous generation, an interrupted
    ingest's leftovers, a dataset the manifest dropped. Then the ``INGESTING`` marker."""
    named = {shard.path for entry in manifest.datasets.values() for shard in entry.shards}
    named |= {part for entry in manifest.quarantine.values() for part in entry.files}
    for name in datasets:
        for folder in (name, f"quarantine/{name}"):
            for entry in store.list_dir(store.join(dest_uri, folder), storage_config):
                rel = f"{folder}/{entry.rstrip('/').rsplit('/', 1)[-1]}"
                if rel in named or any(path.startswith(f"{rel}/") for path in named):
                    continue
                store.delete_path(entry, storage_config)
            if not store.list_dir(store.join(dest_uri, folder), storage_config):  # nothing of it is named
                store.delete_dir(store.join(dest_uri, folder), storage_config)
    store.delete_file(store.join(dest_uri, INGESTING_MARKER), storage_config)
