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


def test_ivf_trains_once_in_a_task_even_when_most_cpus_are_held(ray_cluster, tmp_path):
    """IVF under Ray: one training task, then one builder per shard starting from its result. With
    all but half a CPU held by an actor (as a running index service holds its replicas' CPUs), the
    training task asks for what is free instead of waiting for CPUs that never come."""
    import faiss

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((12, 16)).astype(np.float32)
    docs = centres[rng.integers(0, 12, 3000)] + 0.3 * rng.standard_normal((3000, 16)).astype(np.float32)
    ids = [f"v{i}" for i in range(len(docs))]
    uri = str(tmp_path / "index" / "vectors" / "v1")
    with VectorChunkWriter(uri, 16, rows_per_chunk=500, num_shards=3) as writer:
        writer.write(ids, docs)

    @ray_cluster.remote
    class Holder:
        def ping(self) -> bool:
            return True

    free = ray_cluster.available_resources().get("CPU", 0.0)
    holder = Holder.options(num_cpus=max(free - 0.5, 0.0)).remote()
    try:
        ray_cluster.get(holder.ping.remote(), timeout=60)
        root = str(tmp_path / "index")
        manifest = build_sharded_index(uri, root, 1, 3, AnnConfig(kind="ivf", nlist=16, nprobe=4), "ck",
                                       task_cpus=0.5)
    finally:
        ray_cluster.kill(holder)
    shards = [load_shard(root, manifest, shard) for shard in range(3)]
    assert sum(shard.size for shard in shards) == 3000
    first = faiss.extract_index_ivf(shards[0].faiss_index).quantizer.reconstruct_n(0, 16)
    for shard in shards[1:]:  # one training for all shards: the same cells everywhere
        np.testing.assert_array_equal(faiss.extract_index_ivf(shard.faiss_index).quantizer.reconstruct_n(0, 16), first)
    got, _ = merge_topk([shard.search(docs[:20], 1) for shard in shards], 1)
    assert sum(row == [doc] for row, doc in zip(got, ids[:20], strict=True)) >= 19
