"""Chunked snapshots, vector chunks and sharded builds on S3 (moto's server on loopback)."""

from __future__ import annotations

import boto3
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex, SnapshotError
from whetstone.index.build import build_sharded_index
from whetstone.index.merge import merge_topk
from whetstone.index.shard_io import load_shard
from whetstone.index.snapshot import set_staged_version, staged_version
from whetstone.index.vector_chunks import VectorChunkWriter

pytestmark = pytest.mark.e2e
DIM = 12


def test_chunked_snapshot_and_sharded_build_on_s3(s3_bucket, s3_server, ray_cluster):
    """Shards build as Ray tasks, which see S3 only through the storage config the driver resolved
    (the AWS_* variables are monkeypatched into this process alone)."""
    rng = np.random.default_rng(3)
    docs = rng.standard_normal((900, DIM)).astype(np.float32)
    ids = [f"s3-{i}" for i in range(len(docs))]
    root = f"s3://{s3_bucket}/idx"
    with VectorChunkWriter(f"{root}/vectors/v1", DIM, rows_per_chunk=200) as writer:
        writer.write(ids, docs)
    manifest = build_sharded_index(f"{root}/vectors/v1", root, 1, 2, AnnConfig(kind="hnsw", hnsw_m=8), "ck",
                                   chunk_bytes=4096, set_latest=True)
    assert len(manifest.shards[0].files["index.faiss"].chunks) > 3
    shards = [load_shard(root, manifest, shard) for shard in range(2)]
    got, _ = merge_topk([shard.search(docs[:4], 1) for shard in shards], 1)
    assert got == [[doc] for doc in ids[:4]]

    AnnIndex.build(docs, ids, AnnConfig()).save(root, 2, "ck", chunk_bytes=2048, set_latest=False)
    assert AnnIndex.load(root, 2).search(docs[:3], 1)[0] == [[doc] for doc in ids[:3]]
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    key = "idx/v2/shard-0000/index.faiss.00001"
    data = bytearray(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    data[7] ^= 0xFF
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(data))
    with pytest.raises(SnapshotError, match=rf"checksum mismatch for s3://{s3_bucket}/{key}"):
        AnnIndex.load(root, 2)

    set_staged_version(root, 2)
    assert staged_version(root) == 2
    set_staged_version(root, None)
    assert staged_version(root) is None
