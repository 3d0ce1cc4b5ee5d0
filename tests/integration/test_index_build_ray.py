"""build_sharded_index on a local Ray: one task per shard, same shard files as a build without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig
from whetstone.index.build import build_sharded_index
from whetstone.index.merge import merge_topk
from whetstone.index.shard_io import load_shard
from whetstone.index.vector_chunks import VectorChunkWriter

pytestmark = pytest.mark.integration


def test_shards_build_as_ray_tasks_and_match_a_local_build(ray_cluster, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((1200, 16)).astype(np.float32)
    ids = [f"r{i}" for i in range(len(docs))]
    uri = str(tmp_path / "index" / "vectors" / "v1")
    with VectorChunkWriter(uri, 16, rows_per_chunk=250) as writer:
        writer.write(ids, docs)
    root = str(tmp_path / "index")
    assert ray_cluster.is_initialized()
    remote = build_sharded_index(uri, root, 1, 3, AnnConfig(kind="flat"), "ck", task_cpus=0.5, chunk_bytes=8192)
    # The same build without Ray (is_initialized patched for this process only) gives byte-identical shards.
    monkeypatch.setattr(ray_cluster, "is_initialized", lambda: False)
    local = build_sharded_index(uri, root, 2, 3, AnnConfig(kind="flat"), "ck", chunk_bytes=8192)
    assert [s.fingerprint for s in remote.shards] == [s.fingerprint for s in local.shards]
    assert sum(s.count for s in remote.shards) == 1200 and min(s.count for s in remote.shards) > 300
    shards = [load_shard(root, remote, shard) for shard in range(3)]
    got, _ = merge_topk([shard.search(docs[:5], 1) for shard in shards], 1)
    assert got == [[doc] for doc in ids[:5]]
