"""Build a new index version from a checkpoint and swap it into the running index service.

Ray Data batch inference re-embeds the corpus with ``checkpoint`` and streams the vectors to
``<index_uri>/vectors/v{n+1}/`` in chunks; one Ray task per shard builds that shard from the
chunks and writes it to ``<index_uri>/v{n+1}`` (checksummed manifest naming the checkpoint); then
``/swap`` is called on the service (Serve handle when the service runs in this cluster, HTTP with a
bearer token when ``service_url`` is set), which loads the version on every shard and flips them
together. Searches keep answering during the swap. No process holds the whole corpus' vectors.

``index`` (kind, FAISS knobs, ``num_shards``) defaults to the newest version's, so a refresh keeps
the layout the service was deployed with (its ``num_shards`` must match).

Launch:
  local:           python -m jobs.refresh_index --config jobs/configs/refresh_index/smoke.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.refresh_index \
                       --config jobs/configs/refresh_index/scifact.yaml checkpoint=s3://.../step-000040
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from whetstone.config.base import KEEP_VERSIONS_HELP, StorageConfig, StrictModel
from whetstone.config.contrastive import IndexBuildConfig
from whetstone.console import DEFAULT_EVERY_S, PROGRESS_EVERY_S_HELP


class RefreshIndexJobConfig(StrictModel):
    checkpoint: str = Field(..., description="model folder, storage URI or alias to embed with")
    store_uri: str = Field(..., description="the ingested store whose corpus is embedded")
    index_uri: str = Field(..., description="index root holding v{n}/ and LATEST")
    storage: StorageConfig = StorageConfig()
    index: IndexBuildConfig | None = Field(
        None, description="kind, FAISS knobs and num_shards of the new version; None: the newest version's "
                          "(flat, one shard when there is none)")
    doc_max_length: int = Field(256, ge=16, le=512, description="tokens kept per document when the corpus is "
                                "embedded")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="autocast dtype of the embedding on CPU (bfloat16: faster on CPUs with "
        "AVX-512 BF16; vectors stay float32)")
    batch_size: int = Field(32, ge=1, description="documents per encoder forward in each embedding actor")
    embed_concurrency: int = Field(2, ge=1, description="embedding actors (Ray Data) over the corpus")
    swap: Literal["handle", "http", "none"] = Field("handle", description="how to tell the service")
    keep_versions: int | None = Field(10, ge=1, description=KEEP_VERSIONS_HELP)
    service_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/index (swap=http)")
    ray_num_cpus: int = Field(8, ge=1, description="logical CPUs when this job starts its own local Ray")
    ray_object_store_mb: int = Field(512, ge=128, description="object store memory (MiB) when this job "
                                     "starts its own local Ray")
    progress_every_s: float = Field(DEFAULT_EVERY_S, ge=0, description=PROGRESS_EVERY_S_HELP)


def build_settings(config: RefreshIndexJobConfig, latest: int | None) -> IndexBuildConfig:
    """The configured ``index``, else the layout of version ``latest`` (so the service's shards match)."""
    if config.index is not None:
        return config.index
    if latest is None:
        return IndexBuildConfig()
    from whetstone.index.snapshot import read_manifest

    manifest = read_manifest(config.index_uri, latest, config.storage)
    knobs = {key: value for key, value in manifest.config.items() if key in IndexBuildConfig.model_fields}
    return IndexBuildConfig.model_validate({**knobs, "use_gpu": knobs.get("use_gpu") is True,
                                            "num_shards": manifest.num_shards})


def main(argv: Sequence[str] | None = None) -> dict:
    from whetstone.index.client import IndexClient
    from whetstone.index.snapshot import latest_version, snapshot_path
    from whetstone.train.refresh import (
        CorpusVectors,
        embed_progress,
        embedded_batches,
        next_version,
        publish_index,
        vectors_uri,
    )
    from whetstone.train.runtime import init_ray, parse_job_args

    config = parse_job_args(RefreshIndexJobConfig, argv, __doc__)
    if config.swap == "http" and not config.service_url:
        raise SystemExit("error: service_url: required when swap=http")
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    started = time.monotonic()
    old = latest_version(config.index_uri, config.storage) or 0
    settings = build_settings(config, old or None)
    new = next_version(config.index_uri, config.storage)
    vectors_at = vectors_uri(config.index_uri, new)
    corpus = CorpusVectors(embedded_batches(config.store_uri, config.checkpoint, config.storage, config.batch_size,
                                            config.doc_max_length, config.embed_concurrency, dtype=config.dtype),
                           vectors_at, config.storage, num_shards=settings.num_shards,
                           progress=embed_progress(f"corpus v{new}", config.store_uri, config.storage,
                                                   config.progress_every_s)).drain()
    # With a service, its two-phase swap writes LATEST once every shard holds the new version.
    manifest = publish_index(vectors_at, config.index_uri, new, config.checkpoint, settings, config.storage,
                             set_latest=config.swap == "none")
    swapped = None
    if config.swap == "handle":
        swapped = IndexClient.from_handle().swap(new)
    elif config.swap == "http":
        client = IndexClient.from_http(config.service_url, token=os.environ.get("WHETSTONE_INDEX_TOKEN"))
        swapped = client.swap(new)
    if config.keep_versions:  # after the swap: the service has left the old version
        from whetstone.index.retention import retain_versions

        print(f"[refresh] retention: {retain_versions(config.index_uri, config.keep_versions, config.storage).line()}",
              flush=True)
    path = snapshot_path(config.index_uri, new)
    result = {"old_version": old, "new_version": new, "snapshot": path, "vectors": vectors_at,
              "documents": corpus.rows, "kind": settings.kind, "num_shards": manifest.num_shards,
              "swapped": swapped, "seconds": round(time.monotonic() - started, 1)}
    print(f"[refresh] index v{old} -> v{new} from {config.checkpoint} ({corpus.rows} docs, {settings.kind}, "
          f"{manifest.num_shards} shard(s), {result['seconds']} s); snapshot {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
