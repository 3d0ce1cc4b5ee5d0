"""Ingest of declared-format records (corpus, pairs, preference, hh-rlhf) into one store dataset.

Sources are JSONL, JSONL.gz or Parquet: one file, or a folder / ``s3://`` prefix of shards. Each
file is read and validated by :func:`whetstone.data.records.stage_file`; the staged tables then
pass, in source order, through one consumer that does the cross-row checks (duplicate ids, pair
ids that name documents missing from the store's corpus) and writes shards and quarantine parts.

Two engines produce the staged tables, with identical results (the same shards, byte for byte):

``local``
    the files are staged in this process, one after the other. No Ray start-up, so it wins on
    small inputs (the built-in sets take well under a second).
``ray``
    a Ray Data job: one row per file, ``map_batches`` stages each file in its own task (files read
    and validated in parallel, on any node), and the driver consumes the blocks in order
    (``preserve_order``), so the accounting and the shard contents do not depend on scheduling.

``engine="auto"`` picks ``ray`` when Ray is initialised, there is more than one file and the
source holds at least ``ray_min_bytes``; otherwise ``local``. A single huge file gets no
parallelism from per-file tasks: shard it first.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import whetstone.storage as wstorage
from whetstone.config.base import StorageConfig
from whetstone.console import DEFAULT_EVERY_S
from whetstone.data import schemas as S
from whetstone.data.ingest_sink import (
    DamagedFile,
    DatasetSink,
    IngestError,
    IngestReport,
    new_generation,
    open_store,
    remove_superseded,
)
from whetstone.data.records import (
    FILE,
    ID_COLUMN,
    LOST,
    POS,
    RAW,
    REASON,
    STORE_KIND,
    list_source_files,
    position_unit,
    relative_name,
    stage_file,
    target_schema,
)
from whetstone.data.store import (
    Manifest,
    new_manifest,
    read_dataset_table,
    write_manifest,
)

logger = logging.getLogger(__name__)

DEFAULT_DATASET = {"corpus": "corpus", "pairs": "pairs/train", "preference": "preference/train",
                   "hh-rlhf": "preference/train"}
RAY_MIN_BYTES = 32 * 1024**2


class _StagedConsumer:
    """Staged tables in, shards and quarantine out; the one place rows are counted.

    Args:
        sink: the dataset's shard and quarantine writers.
        kind: the source kind (decides the id column and the reference checks).
        corpus_ids: the store's document ids, to check pair ids against; ``None`` skips the check
            (the store has no corpus yet).
    """

    def __init__(self, sink: DatasetSink, kind: str, corpus_ids: set[str] | None) -> None:
        self.sink = sink
        self.kind = kind
        self.schema = target_schema(kind)
        self.id_column = ID_COLUMN[STORE_KIND[kind]]
        self.corpus_ids = corpus_ids if kind == "pairs" else None
        self.seen: dict[str, tuple[str, int]] = {}
        self.failed_files: list[str] = []
        self.rows_read: Counter[str] = Counter()  # per file: rows read one by one
        self.damage: dict[str, tuple[int | None, list[str]]] = {}  # per file: (rows lost or None, what)

    def consume(self, table: pa.Table) -> None:
        reasons = table.column(REASON).to_pylist()
        ids = table.column(self.id_column).to_pylist()
        files, positions = table.column(FILE).to_pylist(), table.column(POS).to_pylist()
        lost = table.column(LOST).to_pylist()
        references = self._references(table)
        keep = [False] * table.num_rows
        for i, reason in enumerate(reasons):
            if lost[i] is not None:  # a part of the file that could not be read: it stands for its rows
                self._damaged(files[i], positions[i], reason, lost[i])
                continue
            self.sink.rows_in += 1
            self.rows_read[files[i]] += 1
            if reason is None:
                reason = self._cross_row_reason(ids[i], files[i], references[i] if references else ())
            if reason is None:
                self.seen[ids[i]] = (files[i], positions[i])
                keep[i] = True
                continue
            raw = table.column(RAW)[i].as_py()
            if raw is None:  # a cross-row reject: the record itself was valid, keep what was read
                raw = json.dumps(table.slice(i, 1).select(self.schema.names).to_pylist()[0],
                                 ensure_ascii=False, default=str)
            self.sink.reject(reason, files[i], positions[i], raw, position_unit(files[i]))
        self.sink.accept_table(table.filter(pa.array(keep, pa.bool_())))

    def _damaged(self, file: str, position: int, reason: str, lost: int) -> None:
        """Count the rows a damage record stands for (at least the record itself) as read and
        quarantined, and list the file as damaged."""
        rows = max(lost, 1)
        self.sink.rows_in += rows
        self.sink.reject(reason, file, position, "", position_unit(file), rows=rows)
        if position == 0:
            self.failed_files.append(file)
        known, what = self.damage.get(file, (0, []))
        self.damage[file] = (None if known is None or lost == 0 else known + lost, what + [reason])

    def damaged_files(self) -> list[DamagedFile]:
        return [DamagedFile(file=file, rows_read=self.rows_read[file], rows_lost=lost, damage=what)
                for file, (lost, what) in sorted(self.damage.items())]

    def _references(self, table: pa.Table) -> list[list[str]] | None:
        if self.corpus_ids is None:
            return None
        positives = table.column(S.POSITIVE_IDS).to_pylist()
        negatives = table.column(S.NEGATIVE_IDS).to_pylist()
        return [(p or []) + (n or []) for p, n in zip(positives, negatives, strict=True)]

    def _cross_row_reason(self, key: str, file: str, references: Any) -> str | None:
        if key in self.seen:
            first_file, first_pos = self.seen[key]
            where = f"{position_unit(first_file)} {first_pos}" + ("" if first_file == file else f" of {first_file}")
            return f"duplicate {self.id_column} {key!r} (first at {where})"
        for doc_id in references:
            if doc_id not in self.corpus_ids:
                return f"document id {doc_id!r} is not in the store's corpus"
        return None


def _stage_files_batch(batch: pa.Table, kind: str, storage_wire: dict | None,
                       chunk_rows: int) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: stage the files named in ``batch`` (one row per file)."""
    storage_config = StorageConfig.model_validate(storage_wire) if storage_wire else None
    for file_uri, id_prefix in zip(batch.column("file").to_pylist(), batch.column("id_prefix").to_pylist(),
                                   strict=True):
        yield from stage_file(file_uri, kind, id_prefix, storage_config, chunk_rows)


def _staged_local(files: list[str], source: str, kind: str, storage_config: StorageConfig | None,
                  chunk_rows: int) -> Iterator[pa.Table]:
    for file_uri in files:
        yield from stage_file(file_uri, kind, relative_name(source, file_uri), storage_config, chunk_rows)


def _staged_ray(files: list[str], source: str, kind: str, storage_config: StorageConfig | None,
                chunk_rows: int, num_cpus: float) -> Iterator[pa.Table]:
    import ray.data

    items = [{"file": uri, "id_prefix": relative_name(source, uri)} for uri in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _stage_files_batch,
        fn_kwargs={"kind": kind, "chunk_rows": chunk_rows,
                   "storage_wire": storage_config.resolved().to_wire() if storage_config else None},
        batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
    )
    # Blocks must reach the consumer in file order: first occurrence wins a duplicate id, and the
    # shards must not depend on which task finished first.
    ds.context.execution_options.preserve_order = True
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4)


def _choose_engine(engine: str, files: list[tuple[str, int]], ray_min_bytes: int) -> str:
    import ray

    if engine == "local":
        return "local"
    if engine == "ray":
        if not ray.is_initialized():
            raise IngestError("engine='ray' needs Ray initialised first (ray.init, or run under ray job submit)")
        return "ray"
    if engine != "auto":
        raise IngestError(f"engine must be 'auto', 'local' or 'ray', got {engine!r}")
    large = len(files) > 1 and sum(size for _, size in files) >= ray_min_bytes
    return "ray" if large and ray.is_initialized() else "local"


def _check_dataset_name(kind: str, dataset_name: str) -> None:
    store_kind = STORE_KIND[kind]
    parts = dataset_name.split("/")
    if store_kind == "corpus" and dataset_name != "corpus":
        raise IngestError(f"dataset_name for kind 'corpus' must be 'corpus' (the stream reads it), "
                          f"got {dataset_name!r}")
    if store_kind != "corpus" and (len(parts) != 2 or parts[0] != store_kind or not parts[1]):
        raise IngestError(f"dataset_name for kind {kind!r} must be '{store_kind}/<split>', got {dataset_name!r}")


def _corpus_ids(kind: str, dest_uri: str, old: Manifest | None,
                storage_config: StorageConfig | None) -> set[str] | None:
    if kind != "pairs" or old is None or "corpus" not in old.datasets:
        return None
    table = read_dataset_table(dest_uri, "corpus", storage_config, columns=[S.DOC_ID])
    return set(pc.unique(table.column(S.DOC_ID)).to_pylist())


def ingest_records(source: str, dest_uri: str, kind: str, dataset_name: str | None = None,
                   storage: StorageConfig | None = None, rows_per_shard: int = 50_000, *,
                   engine: str = "auto", chunk_rows: int = 8192, ray_min_bytes: int = RAY_MIN_BYTES,
                   num_cpus: float = 0.5, progress_every_s: float | None = DEFAULT_EVERY_S) -> IngestReport:
    """Ingest corpus / pairs / preference / hh-rlhf records into dataset ``dataset_name`` of a store.

    The store may already hold other datasets (ingest a corpus, then its pairs): they are kept,
    and the manifest is rewritten with this dataset replaced. Pair rows whose positive or negative
    ids are missing from the store's corpus are quarantined (ingest the corpus first to get this
    check; without a corpus it is skipped).

    Args:
        source: a ``.jsonl``/``.jsonl.gz``/``.parquet`` file or a folder/prefix of them.
        dest_uri: the store root (local or ``s3://``): missing, empty, or an existing store.
        kind: ``"corpus"``, ``"pairs"``, ``"preference"`` or ``"hh-rlhf"``.
        dataset_name: default ``corpus``, ``pairs/train``, ``preference/train``.
        storage: how to reach ``s3://``.
        rows_per_shard: rows per Parquet shard.
        engine: ``"auto"``, ``"local"`` or ``"ray"`` (see the module docstring).
        chunk_rows: rows per staged table (the unit moved between Ray tasks and the writer).
        ray_min_bytes: the source size from which ``auto`` uses Ray.
        num_cpus: CPUs per Ray staging task.
        progress_every_s: seconds between progress lines (rows read, rows/s, shards, quarantined),
            printed where the rows are consumed (this process, whichever engine stages them); the
            totals are printed at the end. None: silent.

    Returns:
        The report; ``datasets[name].rows_in == rows_written + rows_quarantined``; whole-file
        failures (a corrupt Parquet file) count as one quarantined record at position 0 and are
        listed in ``failed_files``.

    Raises:
        SourceError: the source is missing, empty or holds unsupported files.
        IngestError: bad ``dataset_name`` or ``engine``, or the destination is not a store.
    """
    started = time.monotonic()
    if kind not in STORE_KIND:
        raise IngestError(f"unknown kind {kind!r}; kinds are {sorted(STORE_KIND)} and 'beir'")
    dataset = dataset_name or DEFAULT_DATASET[kind]
    _check_dataset_name(kind, dataset)
    files = list_source_files(source, storage)
    chosen = _choose_engine(engine, files, ray_min_bytes)
    old = open_store(dest_uri, storage)  # the old manifest (and what it names) stays until ours replaces it
    sink = DatasetSink(dest_uri, dataset, target_schema(kind), rows_per_shard, storage, new_generation(),
                       progress_every_s)
    consumer = _StagedConsumer(sink, kind, _corpus_ids(kind, dest_uri, old, storage))
    uris = [uri for uri, _ in files]
    staged = (_staged_ray(uris, source, kind, storage, chunk_rows, num_cpus) if chosen == "ray"
              else _staged_local(uris, source, kind, storage, chunk_rows))
    for table in staged:
        consumer.consume(table)
    entry, quarantined, counts = sink.close()
    entry.source = source
    datasets = {**(old.datasets if old else {}), dataset: entry}
    quarantine = {k: v for k, v in (old.quarantine if old else {}).items() if k != dataset}
    if quarantined.rows:
        quarantine[dataset] = quarantined
    manifest = new_manifest(old.source if old else source, datasets, quarantine)
    manifest_uri = write_manifest(dest_uri, manifest, storage)  # the flip: readers see the new dataset
    remove_superseded(dest_uri, manifest, [dataset], storage)
    report = IngestReport(
        source=source, store_uri=dest_uri, manifest_uri=manifest_uri, datasets={dataset: counts},
        quarantine_files={dataset: [wstorage.join(dest_uri, f) for f in quarantined.files]} if quarantined.rows else {},
        failed_files={dataset: consumer.failed_files} if consumer.failed_files else {},
        damaged_files={dataset: consumer.damaged_files()} if consumer.damage else {},
        engine=chosen, seconds=round(time.monotonic() - started, 3),
    )
    logger.info("%s", report.summary())
    return report


__all__ = ["DEFAULT_DATASET", "ingest_records"]
