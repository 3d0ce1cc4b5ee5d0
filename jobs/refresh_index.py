"""Build a new index version from a checkpoint and swap it into the running index service.

Ray Data batch inference re-embeds the corpus with ``checkpoint``; the FAISS index is saved as
``<index_uri>/v{n+1}`` (checksummed manifest naming the checkpoint), then ``/swap`` is called on
the service (Serve handle when the service runs in this cluster, HTTP with a bearer token when
``service_url`` is set). Searches keep answering during the swap.

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
from whetstone.config.base import StorageConfig, StrictModel


class RefreshIndexJobConfig(StrictModel):
    checkpoint: str = Field(..., description="model folder, storage URI or alias to embed with")
    store_uri: str = Field(..., description="the ingested store whose corpus is embedded")
    index_uri: str = Field(..., description="index root holding v{n}/ and LATEST")
    storage: StorageConfig = StorageConfig()
    kind: Literal["flat", "hnsw", "ivf", "ivfpq"] = "flat"
    doc_max_length: int = Field(256, ge=16, le=512)
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(32, ge=1)
    embed_concurrency: int = Field(2, ge=1)
    swap: Literal["handle", "http", "none"] = Field("handle", description="how to tell the service")
    service_url: str | None = Field(None, description="e.g. http://127.0.0.1:8000/index (swap=http)")
    ray_num_cpus: int = Field(8, ge=1)
    ray_object_store_mb: int = Field(512, ge=128)


def main(argv: Sequence[str] | None = None) -> dict:
    from whetstone.index.ann import latest_version
    from whetstone.index.client import IndexClient
    from whetstone.train.refresh import embed_corpus, publish_index
    from whetstone.train.runtime import init_ray, parse_job_args

    config = parse_job_args(RefreshIndexJobConfig, argv, __doc__)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    started = time.monotonic()
    ids, vectors = embed_corpus(config.store_uri, config.checkpoint, config.storage, config.batch_size,
                                config.doc_max_length, config.embed_concurrency, dtype=config.dtype)
    old = latest_version(config.index_uri, config.storage) or 0
    path = publish_index(ids, vectors, config.index_uri, old + 1, config.checkpoint, config.kind, config.storage)
    swapped = None
    if config.swap == "handle":
        swapped = IndexClient.from_handle().swap(old + 1)
    elif config.swap == "http":
        if not config.service_url:
            raise SystemExit("error: service_url: required when swap=http")
        client = IndexClient.from_http(config.service_url, token=os.environ.get("WHETSTONE_INDEX_TOKEN"))
        swapped = client.swap(old + 1)
    result = {"old_version": old, "new_version": old + 1, "snapshot": path, "documents": len(ids),
              "swapped": swapped, "seconds": round(time.monotonic() - started, 1)}
    print(f"[refresh] index v{old} -> v{old + 1} from {config.checkpoint} ({len(ids)} docs, "
          f"{result['seconds']} s); snapshot {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
