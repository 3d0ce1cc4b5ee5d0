"""What every ingest writes through and reports: one dataset's sink (shards + quarantine + the
rows-in counter), the per-dataset row accounting and the report.

Both ingest paths use these: :mod:`whetstone.data.ingest` (BEIR folders, the one entry point) and
:mod:`whetstone.data.ingest_files` (declared-format records). They live below both so that the
imports go one way: ``ingest -> ingest_files -> ingest_sink``.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from whetstone.config.base import StorageConfig
from whetstone.data.store import DatasetEntry, QuarantineEntry, QuarantineWriter, ShardWriter

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
        return "\n".join(lines)


class DatasetSink:
    """One dataset's shard writer + quarantine writer + its rows-in counter."""

    def __init__(self, store_uri: str, dataset: str, schema: pa.Schema, rows_per_shard: int,
                 storage_config: StorageConfig | None) -> None:
        self.dataset = dataset
        self.rows_in = 0
        self.shards = ShardWriter(store_uri, dataset, schema, rows_per_shard, storage_config)
        self.quarantine = QuarantineWriter(store_uri, dataset, storage_config)

    def accept(self, row: dict[str, Any]) -> None:
        self.shards.add(row)

    def accept_table(self, table: pa.Table) -> None:
        self.shards.add_table(table)

    def reject(self, reason: str, file: str, line: int, raw: bytes | str, unit: str = "line") -> None:
        logger.debug("quarantined %s %s %d: %s", file, unit, line, reason)
        self.quarantine.add(reason, file, line, raw, unit)

    def close(self) -> tuple[DatasetEntry, QuarantineEntry, DatasetCounts]:
        entry = self.shards.close()
        quarantined = self.quarantine.close()
        counts = DatasetCounts(rows_in=self.rows_in, rows_written=entry.rows,
                               rows_quarantined=quarantined.rows)
        return entry, quarantined, counts
