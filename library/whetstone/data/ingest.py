"""Ingest: raw source files -> validated, sharded Parquet + manifest + quarantine, losing no row.

Every non-blank source line is one row in: it is either written to a shard or written to
``quarantine/<dataset>/`` with the reason, the file and the line, so for every dataset
``rows_in == rows_written + rows_quarantined`` (:class:`IngestReport` checks it).

First cut: a single-process streaming pyarrow path (the files are read line by line and shards are
written as they fill, so memory is bounded by one shard plus the id sets needed for cross-row
checks). It reads and writes local folders and ``s3://`` alike through :mod:`whetstone.storage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa

import whetstone.storage as wstorage
from whetstone.config.base import StorageConfig
from whetstone.console import DEFAULT_EVERY_S
from whetstone.data import schemas as S
from whetstone.data.ingest_files import ingest_records
from whetstone.data.ingest_sink import (
    DatasetCounts,
    DatasetSink,
    IngestError,
    IngestReport,
    new_generation,
    open_store,
    remove_superseded,
)
from whetstone.data.sources import SourceError, find_source_file, iter_lines, list_qrels_splits
from whetstone.data.store import (
    DatasetEntry,
    Manifest,
    QuarantineEntry,
    new_manifest,
    write_manifest,
)
from whetstone.data.validate import (
    RowRejected,
    corpus_row,
    is_qrels_header,
    parse_json_object,
    qrels_row,
    query_row,
)

logger = logging.getLogger(__name__)


def _ingest_jsonl(file_uri: str, sink: DatasetSink, validate: Callable[[dict[str, Any]], dict[str, Any]],
                  id_column: str, seen: dict[str, int], storage_config: StorageConfig | None,
                  on_accept: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Validate each JSONL line of ``file_uri`` into ``sink``; ``seen`` maps accepted id -> line."""
    for line_number, raw in iter_lines(file_uri, storage_config):
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) are not rows
        sink.rows_in += 1
        try:
            row = validate(parse_json_object(raw))
        except RowRejected as err:
            sink.reject(str(err), file_uri, line_number, raw)
            continue
        key = row[id_column]
        if key in seen:
            sink.reject(f"duplicate {id_column} {key!r} (first at line {seen[key]})", file_uri, line_number, raw)
            continue
        seen[key] = line_number
        sink.accept(row)
        if on_accept is not None:
            on_accept(row)


def _qrels_fields(raw: bytes) -> list[str]:
    try:
        return raw.decode("utf-8").split("\t")
    except UnicodeDecodeError as err:
        raise RowRejected(f"line is not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _looks_like_header(raw: bytes) -> bool:
    # A header's score column has no digits ("score"); a data row with a bad score such as "1.5"
    # has some, and must be quarantined rather than skipped as a header.
    fields = raw.decode("utf-8", errors="replace").split("\t")
    return is_qrels_header(fields) and not any(ch.isdigit() for ch in fields[-1])


def _ingest_qrels(file_uri: str, sink: DatasetSink, doc_ids: dict[str, int], query_ids: dict[str, int],
                  storage_config: StorageConfig | None) -> dict[str, list[str]]:
    """Validate a qrels TSV into ``sink``; return query id -> positive doc ids (score > 0), in order."""
    positives: dict[str, list[str]] = {}
    seen: dict[tuple[str, str], int] = {}
    first = True
    for line_number, raw in iter_lines(file_uri, storage_config):
        if not raw.strip():
            continue
        if first:
            first = False
            if _looks_like_header(raw):
                continue  # a header is not a row: it is neither written nor quarantined
        sink.rows_in += 1
        try:
            row = qrels_row(_qrels_fields(raw))
            if row[S.QUERY_ID] not in query_ids:
                raise RowRejected(f"query-id {row[S.QUERY_ID]!r} is not in queries (or was quarantined)")
            if row[S.DOC_ID] not in doc_ids:
                raise RowRejected(f"corpus-id {row[S.DOC_ID]!r} is not in the corpus (or was quarantined)")
            key = (row[S.QUERY_ID], row[S.DOC_ID])
            if key in seen:
                raise RowRejected(f"duplicate qrels pair {key[0]!r} -> {key[1]!r} (first at line {seen[key]})")
        except RowRejected as err:
            sink.reject(str(err), file_uri, line_number, raw)
            continue
        seen[key] = line_number
        sink.accept(row)
        if row[S.SCORE] > 0:
            positives.setdefault(row[S.QUERY_ID], []).append(row[S.DOC_ID])
    return positives


def ingest_beir(source: str, dest_uri: str, storage: StorageConfig | None = None,
                rows_per_shard: int = 50_000, splits: Sequence[str] | None = None,
                progress_every_s: float | None = DEFAULT_EVERY_S) -> IngestReport:
    """Ingest a BEIR folder into a store.

    Source layout: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, each optionally
    gzip-compressed (``.gz``). qrels may or may not start with a header row (detected). Writes
    ``corpus``, ``queries``, ``qrels/<split>`` and ``pairs/<split>`` (one row per query with its
    positive doc ids, qrels score > 0) plus ``quarantine/`` and ``manifest.json`` under ``dest_uri``.

    Args:
        source: the BEIR folder (local path or ``s3://``).
        dest_uri: the store root (local path or ``s3://``); empty, missing, or an earlier store.
        storage: how to reach ``s3://`` (defaults to the AWS environment variables).
        rows_per_shard: rows per Parquet shard.
        splits: qrels splits to ingest; default all found under ``qrels/``.
        progress_every_s: a progress line per dataset (rows, rows/s, shards, quarantined) at most
            this often, and its totals when it is written; None: silent.

    Returns:
        The report; ``report.datasets[name].rows_in == rows_written + rows_quarantined``.

    Raises:
        SourceError: a source file is missing, ambiguous or breaks mid-stream (names the file).
        IngestError: the destination is unusable, or a requested split has no qrels file.
    """
    started = time.monotonic()
    storage_config = storage
    corpus_uri = find_source_file(source, "corpus.jsonl", storage_config)
    queries_uri = find_source_file(source, "queries.jsonl", storage_config)
    available = list_qrels_splits(source, storage_config)
    wanted = list(splits) if splits is not None else sorted(available)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise IngestError(f"no qrels for split(s) {missing} under {wstorage.join(source, 'qrels')}; "
                          f"found {sorted(available)}")
    old = open_store(dest_uri, storage_config)  # the old store stays readable until the new manifest replaces it
    generation = new_generation()

    def sink(name: str, schema: pa.Schema) -> DatasetSink:
        return DatasetSink(dest_uri, name, schema, rows_per_shard, storage_config, generation, progress_every_s)

    sinks: list[DatasetSink] = []
    doc_ids: dict[str, int] = {}
    corpus = sink("corpus", S.CORPUS_SCHEMA)
    _ingest_jsonl(corpus_uri, corpus, corpus_row, S.DOC_ID, doc_ids, storage_config)
    sinks.append(corpus)

    query_ids: dict[str, int] = {}
    query_texts: dict[str, str] = {}
    queries = sink("queries", S.QUERIES_SCHEMA)
    _ingest_jsonl(queries_uri, queries, query_row, S.QUERY_ID, query_ids, storage_config,
                  on_accept=lambda row: query_texts.__setitem__(row[S.QUERY_ID], row[S.TEXT]))
    sinks.append(queries)

    for split in wanted:
        qrels = sink(f"qrels/{split}", S.QRELS_SCHEMA)
        positives = _ingest_qrels(available[split], qrels, doc_ids, query_ids, storage_config)
        sinks.append(qrels)
        pairs = sink(f"pairs/{split}", S.PAIRS_SCHEMA)
        for query_id, positive_ids in positives.items():
            pairs.rows_in += 1
            pairs.accept({S.QUERY_ID: query_id, S.QUERY: query_texts[query_id], S.POSITIVE_IDS: positive_ids,
                          S.NEGATIVE_IDS: [], S.SCORE: None})
        sinks.append(pairs)
    return _finish(source, dest_uri, sinks, storage_config, started, old)


def _finish(source: str, dest_uri: str, sinks: list[DatasetSink], storage_config: StorageConfig | None,
            started: float, old: Manifest | None) -> IngestReport:
    """Close every sink, write the manifest (last: it flips the store to the new datasets), remove
    what the old store held, report."""
    datasets: dict[str, DatasetEntry] = {}
    quarantine: dict[str, QuarantineEntry] = {}
    counts: dict[str, DatasetCounts] = {}
    for item in sinks:
        entry, quarantined, item_counts = item.close()
        datasets[item.dataset] = entry
        counts[item.dataset] = item_counts
        if quarantined.rows:
            quarantine[item.dataset] = quarantined
    manifest = new_manifest(source, datasets, quarantine)
    manifest_uri = write_manifest(dest_uri, manifest, storage_config)
    remove_superseded(dest_uri, manifest, sorted(set(datasets) | set(old.datasets if old else ())), storage_config)
    report = IngestReport(
        source=source,
        store_uri=dest_uri,
        manifest_uri=manifest_uri,
        datasets=counts,
        quarantine_files={name: [wstorage.join(dest_uri, f) for f in q.files] for name, q in quarantine.items()},
        seconds=round(time.monotonic() - started, 3),
    )
    logger.info("%s", report.summary())
    return report


IngestKind = Literal["beir", "corpus", "pairs", "preference", "hh-rlhf"]


def ingest(source: str, dest_uri: str, kind: IngestKind, dataset_name: str | None = None,
           storage: StorageConfig | None = None, rows_per_shard: int = 50_000, *,
           splits: Sequence[str] | None = None, engine: str = "auto",
           progress_every_s: float | None = DEFAULT_EVERY_S, **options: Any) -> IngestReport:
    """Ingest any declared source format into a store: the one entry point for jobs and the CLI.

    Args:
        source: a BEIR folder (``kind="beir"``), or a ``.jsonl``/``.jsonl.gz``/``.parquet`` file or
            folder/prefix of them (local or ``s3://``).
        dest_uri: the store root.
        kind: ``"beir"`` (writes corpus, queries, qrels/*, pairs/* and replaces the whole store),
            or ``"corpus"``, ``"pairs"``, ``"preference"``, ``"hh-rlhf"`` (write one dataset,
            keeping the store's others; see :func:`whetstone.data.ingest_files.ingest_records`).
        dataset_name: for the record kinds: ``corpus``, ``pairs/<split>``, ``preference/<split>``.
        storage: how to reach ``s3://``.
        rows_per_shard: rows per Parquet shard.
        splits: for ``beir``: the qrels splits to ingest (default all).
        engine: for the record kinds: ``"auto"``, ``"local"`` or ``"ray"``.
        progress_every_s: seconds between a dataset's progress lines (rows, rows/s, shards,
            quarantined; its totals at the end); None: silent.
        **options: passed to :func:`~whetstone.data.ingest_files.ingest_records`.

    Returns:
        The report: rows in = rows written + rows quarantined for every dataset.
    """
    if kind == "beir":
        if dataset_name is not None:
            raise IngestError("dataset_name does not apply to kind 'beir' (it writes every BEIR dataset)")
        return ingest_beir(source, dest_uri, storage, rows_per_shard=rows_per_shard, splits=splits,
                           progress_every_s=progress_every_s)
    if splits is not None:
        raise IngestError(f"splits applies to kind 'beir' only; for {kind!r} name the split in dataset_name")
    return ingest_records(source, dest_uri, kind, dataset_name, storage, rows_per_shard, engine=engine,
                          progress_every_s=progress_every_s, **options)


__all__ = ["DatasetCounts", "IngestError", "IngestKind", "IngestReport", "SourceError", "ingest", "ingest_beir"]
