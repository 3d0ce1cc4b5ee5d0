"""Auxiliary task data for multi-task contrastive training (Piccolo2): graded pairs and labelled texts.

Two record kinds, read from JSONL (``.jsonl``, ``.jsonl.gz``) or Parquet, one file or a folder /
``s3://`` prefix of shards:

    sts             ``{"sentence1": str, "sentence2": str, "score": number}``: a graded pair (an STS
                    score, a relevance grade); only the order of the scores matters (CoSENT).
    classification  ``{"text": str, "label": str | int}``: a labelled text; the label's own text is
                    what the encoder embeds (name labels in words: "sports", not 3).

Auxiliary sets are small next to a corpus (thousands to a few hundred thousand rows), so they are
read and validated on the driver in one pass and handed to Ray Data as an in-memory dataset.
Every row ends up either in the table or in the quarantine (``reason`` names the field, with the
file and line or row), so rows in = rows kept + rows quarantined.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from whetstone.config.base import StorageConfig
from whetstone.data.records import _jsonl_records, _parquet_records, list_source_files, position_unit
from whetstone.data.store import QuarantineWriter
from whetstone.data.validate import RowRejected, require_string

TaskDataKind = Literal["sts", "classification"]

# column names of the tables handed to the workers
SENTENCE1, SENTENCE2, SCORE = "sentence1", "sentence2", "score"
TEXT, LABEL, LABEL_ID = "text", "label", "label_id"


class TaskDataError(ValueError):
    """A task's data cannot train at all (no valid rows, fewer than two labels); names the source."""


@dataclass
class TaskData:
    """One auxiliary task's validated rows.

    ``table`` columns: sts -> sentence1, sentence2, score (float64); classification -> text,
    label_id (int64, an index into ``labels``).
    """

    name: str
    kind: str
    source: str
    table: pa.Table
    labels: list[str] = field(default_factory=list)  # classification: label texts, in id order
    rows_read: int = 0
    quarantined: int = 0
    quarantine_files: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "source": self.source, "rows_read": self.rows_read,
                               "rows": self.table.num_rows, "quarantined": self.quarantined,
                               "quarantine_files": self.quarantine_files}
        if self.kind == "classification":
            out["labels"] = len(self.labels)
        return out


def sts_row(record: dict[str, Any]) -> tuple[str, str, float]:
    """A graded pair: two non-empty strings and a finite number (booleans are not scores)."""
    first, second = require_string(record, SENTENCE1), require_string(record, SENTENCE2)
    if SCORE not in record:
        raise RowRejected(f"missing field {SCORE!r}")
    value = record[SCORE]
    if isinstance(value, str):  # CSV-born JSONL often quotes numbers
        try:
            value = float(value)
        except ValueError:
            raise RowRejected(f"field {SCORE!r} must be a number, got string {record[SCORE]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowRejected(f"field {SCORE!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise RowRejected(f"field {SCORE!r} must be finite, got {value}")
    return first, second, float(value)


def classification_row(record: dict[str, Any]) -> tuple[str, str]:
    """A labelled text: a non-empty ``text`` and a ``label`` (a non-empty string, or an integer)."""
    text = require_string(record, TEXT)
    if LABEL not in record:
        raise RowRejected(f"missing field {LABEL!r}")
    label = record[LABEL]
    if isinstance(label, int) and not isinstance(label, bool):
        return text, str(label)
    if not isinstance(label, str):
        raise RowRejected(f"field {LABEL!r} must be a string or an integer, got {type(label).__name__}")
    if not label.strip():
        raise RowRejected(f"field {LABEL!r} is empty")
    return text, label.strip()


def load_task_data(name: str, kind: str, source: str, quarantine_root: str,
                   storage: StorageConfig | None = None, seed: int = 0) -> TaskData:
    """Read and validate every record of ``source``; bad rows go to ``<quarantine_root>/quarantine/task-<name>/``.

    Rows are shuffled once with ``seed`` (the workers shuffle again locally every pass).

    Raises:
        TaskDataError: no valid row, or (classification) fewer than two distinct labels.
        SourceError: ``source`` does not exist or holds unsupported files.
    """
    if kind not in ("sts", "classification"):
        raise ValueError(f"unknown task data kind {kind!r}; expected 'sts' or 'classification'")
    quarantine = QuarantineWriter(quarantine_root, f"task-{name}", storage)
    rows: list[tuple] = []
    read = 0
    parse = sts_row if kind == "sts" else classification_row
    for file_uri, _ in list_source_files(source, storage):
        unit = position_unit(file_uri)
        records = (_parquet_records(file_uri, storage, 8192) if unit == "row"
                   else _jsonl_records(file_uri, storage))
        for position, record, raw in records:
            read += 1
            try:
                if isinstance(record, RowRejected):
                    raise record
                if not isinstance(record, dict):
                    raise RowRejected(f"expected a JSON object, got {type(record).__name__}")
                rows.append(parse(record))
            except RowRejected as err:
                text = raw if raw is not None else json.dumps(record, ensure_ascii=False, default=str)
                quarantine.add(str(err), file_uri, position, text, unit)
    entry = quarantine.close()
    if not rows:
        raise TaskDataError(f"task {name!r}: no valid {kind} rows in {source} ({read} read, {entry.rows} "
                            f"quarantined under {quarantine_root}/quarantine/task-{name}/)")
    order = np.random.default_rng(seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    labels: list[str] = []
    if kind == "sts":
        table = pa.table({SENTENCE1: [r[0] for r in rows], SENTENCE2: [r[1] for r in rows],
                          SCORE: pa.array([r[2] for r in rows], pa.float64())})
    else:
        labels = sorted({r[1] for r in rows})
        if len(labels) < 2:
            raise TaskDataError(f"task {name!r}: label contrast needs at least 2 distinct labels, {source} "
                                f"has {labels}")
        ids = {label: i for i, label in enumerate(labels)}
        table = pa.table({TEXT: [r[0] for r in rows], LABEL_ID: pa.array([ids[r[1]] for r in rows], pa.int64())})
    return TaskData(name, kind, source, table, labels, read, entry.rows,
                    [f"{quarantine_root.rstrip('/')}/{f}" for f in entry.files])
