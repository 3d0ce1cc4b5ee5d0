"""Ingest raw files into sharded, validated Parquet with a manifest (issue 3: the data plane).

Formats (``format:``):
  beir        a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv, each optionally .gz);
              writes corpus, queries, qrels/<split>, pairs/<split> and replaces the whole store.
  corpus      documents: id (``_id``/``id``/``doc_id``), text, optional title and metadata.
  pairs       query, positive id(s), optional query_id, negative ids and score.
  preference  prompt, chosen, rejected, optional pair_id and time.
  hh-rlhf     Anthropic hh-rlhf dialogues, split into prompt / chosen / rejected on ingest.
The record formats read ``.jsonl``, ``.jsonl.gz`` and ``.parquet``: one file or a folder (or
``s3://`` prefix) of shards, and write one dataset (``dataset_name``) into the store, keeping the
store's other datasets. Large multi-file sources run as a Ray Data job (files staged in parallel
tasks); small ones in process (``engine: auto``; force with ``engine=local|ray``).

Rows that fail validation go to ``<store_uri>/quarantine/`` with the reason, file and line (or
Parquet row); the report shows rows in = rows written + rows quarantined for every dataset.

Launch:
  local:           python -m jobs.ingest --config jobs/configs/ingest/smoke.yaml
                   python -m jobs.ingest --config jobs/configs/ingest/hh_rlhf.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.ingest \
                       --config jobs/configs/ingest/s3.yaml
  CLI:             whetstone ingest --config jobs/configs/ingest/pairs.yaml source=s3://b/raw/pairs/
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator
from whetstone.config.base import StorageConfig, StrictModel
from whetstone.console import DEFAULT_EVERY_S, PROGRESS_EVERY_S_HELP


class IngestJobConfig(StrictModel):
    source: str = Field(..., description="local path, s3:// URI or builtin:<name> (a dataset shipped "
                        "in whetstone/datasets: scifact-subset, hh-rlhf-harmless-sample)")
    format: Literal["beir", "corpus", "pairs", "preference", "hh-rlhf"] = Field(
        "beir", description="source layout: beir (a BEIR folder; replaces the store) or a record format "
        "written as dataset_name: corpus, pairs, preference, hh-rlhf")
    store_uri: str = Field(..., description="destination store (local path or s3://)")
    dataset_name: str | None = Field(None, description="record formats: corpus, pairs/<split>, preference/<split>")
    storage: StorageConfig = StorageConfig()
    rows_per_shard: int = Field(50_000, ge=1, description="rows per Parquet shard written")
    splits: list[str] | None = Field(None, description="beir only: qrels splits (default all)")
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="record formats: local stages the files in this process, ray in one Ray Data "
        "task per file (same shards); auto: ray when several files total at least ray_min_mb")
    ray_min_mb: float = Field(32.0, gt=0, description="auto: source size from which Ray Data is used")
    ray_num_cpus: int = Field(8, ge=1, description="logical CPUs of a local Ray (ignored under a cluster)")
    ray_object_store_mb: int = Field(512, ge=64, description="object store memory (MiB) of the local Ray "
                                     "started for the ray engine (ignored under a cluster)")
    progress_every_s: float = Field(DEFAULT_EVERY_S, ge=0, description=PROGRESS_EVERY_S_HELP)

    @model_validator(mode="after")
    def _options_fit_format(self) -> IngestJobConfig:
        if self.format == "beir" and self.dataset_name is not None:
            raise ValueError("dataset_name applies to the record formats, not beir")
        if self.format != "beir" and self.splits is not None:
            raise ValueError(f"splits applies to beir only; for {self.format} set dataset_name")
        return self


def _needs_ray(config: IngestJobConfig, source: str) -> bool:
    """Start (or join) Ray only when the Ray Data engine will run: Ray start-up dwarfs small ingests."""
    if config.format == "beir" or config.engine == "local":
        return False
    if config.engine == "ray" or os.environ.get("RAY_ADDRESS"):
        return True
    from whetstone.data.records import list_source_files

    files = list_source_files(source, config.storage)
    return len(files) > 1 and sum(size for _, size in files) >= config.ray_min_mb * 1024**2


def main(argv: Sequence[str] | None = None) -> dict:
    from whetstone.data.ingest import ingest
    from whetstone.train.runtime import init_ray, parse_job_args

    from jobs.quickstart import resolve_source

    config = parse_job_args(IngestJobConfig, argv, __doc__)
    print(f"[ingest] config: {config.model_dump_json(exclude={'storage'})}", flush=True)  # no secrets
    source = resolve_source(config.source)
    if _needs_ray(config, source):
        init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    options = {} if config.format == "beir" else {"ray_min_bytes": int(config.ray_min_mb * 1024**2)}
    report = ingest(source, config.store_uri, config.format, config.dataset_name, config.storage,
                    rows_per_shard=config.rows_per_shard, splits=config.splits, engine=config.engine,
                    progress_every_s=config.progress_every_s, **options)
    print(report.summary(), flush=True)
    print(f"manifest: {report.manifest_uri}", flush=True)
    return json.loads(report.model_dump_json())


if __name__ == "__main__":
    main()
