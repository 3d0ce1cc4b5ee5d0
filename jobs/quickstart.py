"""Quickstart: ingest the shipped scifact-subset, then train MiniLM against live hard negatives.

The whole loop on the embedded default (a local folder as object storage, a local Ray):
  1. ingest the BEIR folder into sharded Parquet under ``store_uri`` (skipped when present);
  2-5. the contrastive job (jobs/train_contrastive.py): index service on Ray Serve, Ray Train
     with live negatives, at least one index refresh, before/after evaluation, a JSON report.

Launch:
  make demo
  python -m jobs.quickstart --config jobs/configs/quickstart/demo.yaml [key=value ...]
  ray job submit --working-dir . -- python -m jobs.quickstart --config jobs/configs/quickstart/demo.yaml
"""

from __future__ import annotations

import time

from whetstone import storage as store
from whetstone.config.contrastive import IngestSpec, QuickstartConfig


def resolve_source(source: str) -> str:
    """``builtin:<name>`` names a dataset shipped inside the package; anything else is a path/URI.

    A BEIR set is its folder; a record-format set (one data file beside its README) is that file.
    """
    if source.startswith("builtin:"):
        from whetstone.datasets import path

        folder = path(source[len("builtin:"):])
        data = [p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))]
        return str(data[0]) if len(data) == 1 else str(folder)
    return source


def ingest_if_needed(spec: IngestSpec, store_uri: str, storage) -> None:
    from whetstone.data.ingest import ingest_beir

    manifest = store.join(store_uri, "manifest.json")
    if spec.skip_if_present and store.exists(manifest, storage):
        print(f"[ingest] {manifest} exists; skipping ingest (ingest.skip_if_present=false redoes it)",
              flush=True)
        return
    started = time.monotonic()
    report = ingest_beir(resolve_source(spec.source), store_uri, storage, rows_per_shard=spec.rows_per_shard)
    print(f"[ingest] {report.summary()}", flush=True)
    print(f"[ingest] {time.monotonic() - started:.1f} s; manifest {report.manifest_uri}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    from whetstone.train.runtime import parse_job_args

    from jobs.train_contrastive import run

    config = parse_job_args(QuickstartConfig, argv, __doc__)
    ingest_if_needed(config.ingest, config.store_uri, config.storage)
    return run(config)


if __name__ == "__main__":
    main()
