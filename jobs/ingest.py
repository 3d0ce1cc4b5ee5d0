"""Ingest raw files (BEIR folders) into sharded, validated Parquet with a manifest.

Rows that fail validation go to ``<store_uri>/quarantine/`` with the reason, file and line;
the report shows rows in = rows written + rows quarantined for every dataset.

Launch:
  local:           python -m jobs.ingest --config jobs/configs/ingest/smoke.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.ingest \
                       --config jobs/configs/ingest/s3.yaml
  CLI:             whetstone ingest --config jobs/configs/ingest/smoke.yaml source=path/to/beir
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from whetstone.config.base import StorageConfig, StrictModel


class IngestJobConfig(StrictModel):
    source: str = Field(..., description="BEIR folder: local path, s3:// URI or builtin:<name>")
    format: Literal["beir"] = "beir"
    store_uri: str = Field(..., description="destination store (local path or s3://)")
    storage: StorageConfig = StorageConfig()
    rows_per_shard: int = Field(50_000, ge=1)
    splits: list[str] | None = None


def main(argv: Sequence[str] | None = None) -> dict:
    from whetstone.data.ingest import ingest_beir
    from whetstone.train.pipeline import parse_job_args

    from jobs.quickstart import resolve_source

    config = parse_job_args(IngestJobConfig, argv, __doc__)
    report = ingest_beir(resolve_source(config.source), config.store_uri, config.storage,
                         rows_per_shard=config.rows_per_shard, splits=config.splits)
    print(report.summary(), flush=True)
    print(f"manifest: {report.manifest_uri}", flush=True)
    return json.loads(report.model_dump_json())


if __name__ == "__main__":
    main()
