"""Index snapshots and the index service on S3, through moto's S3 server on loopback."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex, SnapshotError, latest_version, list_versions

from tests.e2e.test_index_service import serve_root_url

pytestmark = pytest.mark.e2e
DIM = 24


def corpus(seed: int, count: int = 120):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, DIM)).astype(np.float32), [f"s{seed}-{i}" for i in range(count)]


def test_snapshots_round_trip_on_s3(s3_bucket):
    root = f"s3://{s3_bucket}/prefix/index"
    assert latest_version(root) is None and list_versions(root) == []
    docs, ids = corpus(1)
    index = AnnIndex.build(docs, ids, AnnConfig(kind="hnsw"))
    index.remove(ids[:3])
    index.save(root, 1, checkpoint=f"s3://{s3_bucket}/checkpoints/step-1")
    loaded = AnnIndex.load(root)
    assert (loaded.version, loaded.size, loaded.checkpoint) == (1, 117, f"s3://{s3_bucket}/checkpoints/step-1")
    assert loaded.search(docs[:4], 5)[0] == index.search(docs[:4], 5)[0]
    with pytest.raises(SnapshotError, match=rf"no snapshot v4 under s3://{s3_bucket}/prefix/index"):
        AnnIndex.load(root, 4)


def test_service_serves_and_swaps_from_s3(s3_bucket, ray_cluster):
    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    root = f"s3://{s3_bucket}/index"
    for seed in (1, 2):
        docs, ids = corpus(seed)
        AnnIndex.build(docs, ids, AnnConfig()).save(root, seed, checkpoint="none", set_latest=seed == 1)
    base = serve_root_url(ray_cluster) + "/index-s3"
    # The AWS_* variables exist only in this process (monkeypatched): build_app resolves them
    # into the storage config that travels to the replicas.
    deploy(IndexServiceArgs(index_uri=root, auth_token="tok", num_cpus=0.1, poll_interval_s=0.5),
           name="whetstone-index-s3", route_prefix="/index-s3")
    try:
        query = corpus(2)[0][:1].tolist()
        assert httpx.post(base + "/search", json={"vectors": query, "k": 1}, timeout=30).json()["version"] == 1
        r = httpx.post(base + "/swap", json={"version": 2}, headers={"Authorization": "Bearer tok"}, timeout=60)
        assert r.status_code == 200, r.text
        body = httpx.post(base + "/search", json={"vectors": query, "k": 1}, timeout=30).json()
        assert body["version"] == 2 and body["ids"] == [["s2-0"]]
        assert latest_version(root) == 2
        r = httpx.post(base + "/swap", json={"version": 3}, headers={"Authorization": "Bearer tok"}, timeout=60)
        assert r.status_code == 404 and f"s3://{s3_bucket}/index" in r.text
    finally:
        serve.delete("whetstone-index-s3")
        time.sleep(0.5)
