"""The refresh path without the whole corpus in one array: embedded batches stream into vector
chunks, shards are built from the chunks, evaluation reads the chunks back, versions never collide.

Ray Data and the encoder are left out (integration tests run them): the batches here are what
``embedded_batches`` yields, (ids, (n, D) float32) pairs. No Ray is initialised, so the shard
builds run in this process.
"""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.config.contrastive import IndexBuildConfig, IndexSection
from whetstone.eval.retrieval import exact_rankings
from whetstone.index.snapshot import latest_version, read_manifest
from whetstone.index.vector_chunks import iter_vector_chunks, read_vector_chunks
from whetstone.train.refresh import CorpusVectors, next_version, publish_index, vectors_uri


def batches(count: int = 700, dim: int = 16, batch: int = 128, seed: int = 0):
    """(ids, unit vectors) in batches of ``batch`` rows, and the whole corpus for reference."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc-{i}" for i in range(count)]
    stream = ((ids[s:s + batch], vectors[s:s + batch]) for s in range(0, count, batch))
    return stream, ids, vectors


def test_corpus_vectors_writes_chunks_as_batches_pass(tmp_path):
    stream, ids, vectors = batches()
    uri = vectors_uri(str(tmp_path / "index"), 1)
    assert uri == str(tmp_path / "index" / "vectors" / "v1")
    corpus = CorpusVectors(stream, uri)
    seen = [len(chunk_ids) for chunk_ids, _ in corpus]  # the batches come through unchanged
    assert seen == [128] * 5 + [60] and corpus.rows == 700 and corpus.dim == 16
    assert corpus.manifest is not None and corpus.manifest.count == 700
    assert read_vector_chunks(uri).count == 700
    back_ids, back_vectors = zip(*iter_vector_chunks(uri), strict=True)
    assert [i for chunk in back_ids for i in chunk] == ids
    np.testing.assert_array_equal(np.concatenate(back_vectors), vectors)


def test_corpus_vectors_without_a_uri_only_counts():
    stream, _, _ = batches(count=300)
    corpus = CorpusVectors(stream).drain()
    assert corpus.rows == 300 and corpus.manifest is None


def test_evaluation_from_stored_chunks_equals_the_arrays(tmp_path):
    stream, ids, vectors = batches(count=900, seed=4)
    uri = str(tmp_path / "vectors")
    CorpusVectors(stream, uri).drain()
    queries = vectors[:25] + 0.1
    query_ids = [f"q{i}" for i in range(25)]
    assert exact_rankings(query_ids, queries, iter_vector_chunks(uri), None, 20) == \
        exact_rankings(query_ids, queries, ids, vectors, 20)


def test_publish_builds_the_configured_shards_and_leaves_latest_to_the_swap(tmp_path):
    root = str(tmp_path / "index")
    assert next_version(root) == 1
    stream, ids, vectors = batches(count=500)
    CorpusVectors(stream, vectors_uri(root, 1)).drain()
    section = IndexSection(kind="flat", num_shards=3)
    manifest = publish_index(vectors_uri(root, 1), root, 1, "ckpt-1", section)  # v1: LATEST for the service to load
    assert (manifest.num_shards, manifest.count, manifest.kind) == (3, 500, "flat")
    assert sum(entry.count for entry in manifest.shards) == 500 and latest_version(root) == 1
    assert next_version(root) == 2
    # a refresh: published beside v1, LATEST left for the service's two-phase swap
    stream, _, _ = batches(count=500, seed=1)
    CorpusVectors(stream, vectors_uri(root, 2)).drain()
    build = section.model_dump(mode="json", include=set(IndexBuildConfig.model_fields))  # what the refresher gets
    second = publish_index(vectors_uri(root, 2), root, 2, "ckpt-2", build, set_latest=False, extra={"step": 5})
    assert latest_version(root) == 1 and read_manifest(root, 2).extra == {"step": 5}
    assert second.config["use_gpu"] is False and second.num_shards == 3
    # vectors left by a refresh that failed before publishing still claim their version
    stream, _, _ = batches(count=10)
    CorpusVectors(stream, vectors_uri(root, 3)).drain()
    assert next_version(root) == 4


def test_publish_refuses_a_build_config_with_serving_fields(tmp_path):
    with pytest.raises(ValueError, match="replicas_per_shard"):
        publish_index(str(tmp_path / "v"), str(tmp_path / "i"), 1, "c", {"kind": "flat", "replicas_per_shard": 2})


def test_refresh_job_keeps_the_served_layout(tmp_path):
    from jobs.refresh_index import RefreshIndexJobConfig, build_settings

    root = str(tmp_path / "index")
    stream, _, _ = batches(count=400)
    CorpusVectors(stream, vectors_uri(root, 1)).drain()
    publish_index(vectors_uri(root, 1), root, 1, "c", IndexBuildConfig(kind="hnsw", num_shards=2, ef_search=77))
    config = RefreshIndexJobConfig(checkpoint="m", store_uri="s", index_uri=root)
    kept = build_settings(config, latest_version(root))
    assert (kept.kind, kept.num_shards, kept.ef_search, kept.use_gpu) == ("hnsw", 2, 77, False)
    assert build_settings(config, None) == IndexBuildConfig()  # nothing published yet: flat, one shard
    given = RefreshIndexJobConfig(checkpoint="m", store_uri="s", index_uri=root, index={"kind": "ivf", "num_shards": 2})
    assert build_settings(given, 1).kind == "ivf"


def test_corpus_vectors_partitioned_by_shard_build_the_same_index(tmp_path):
    """Written with the index's shard count, each chunk holds one shard's rows (so a shard builder
    downloads only its own) and the published shards equal those built from unpartitioned chunks."""
    from whetstone.index.snapshot import shard_of
    from whetstone.index.vector_chunks import iter_vector_chunks

    root = str(tmp_path / "index")
    stream, ids, vectors = batches(count=600, seed=7)
    CorpusVectors(stream, vectors_uri(root, 1), num_shards=3).drain()
    written = read_vector_chunks(vectors_uri(root, 1))
    assert written.num_shards == 3 and written.count == 600
    for shard in range(3):
        for chunk_ids, _ in iter_vector_chunks(vectors_uri(root, 1), shard=shard):
            assert set(shard_of(chunk_ids, 3).tolist()) == {shard}
    stream, _, _ = batches(count=600, seed=7)
    CorpusVectors(stream, vectors_uri(root, 2)).drain()  # not partitioned: builders filter every chunk
    partitioned = publish_index(vectors_uri(root, 1), root, 1, "c", IndexBuildConfig(kind="flat", num_shards=3))
    filtered = publish_index(vectors_uri(root, 2), root, 2, "c", IndexBuildConfig(kind="flat", num_shards=3))
    assert [e.count for e in partitioned.shards] == [e.count for e in filtered.shards]
    assert sum(e.count for e in partitioned.shards) == len(ids)


def test_vectors_partitioned_for_more_shards_build_fewer_without_filtering(tmp_path):
    """Chunks written for 4 shards build 2 shards (and 1) from whole partitions: shard s of 2 is
    partitions s and s+2 of 4, the same rows that filtering by ``shard_of(id, 2)`` gives."""
    from whetstone.index.build import _partitions_of

    root = str(tmp_path / "index")
    stream, ids, _ = batches(count=800, seed=3)
    CorpusVectors(stream, vectors_uri(root, 1), num_shards=4).drain()
    written = read_vector_chunks(vectors_uri(root, 1))
    assert _partitions_of(written, 1, 2) == [1, 3] and _partitions_of(written, 0, 1) == [0, 1, 2, 3]
    assert _partitions_of(written, 0, 3) is None  # 4 is not a multiple of 3: filter every chunk
    for num_shards in (1, 2, 3):
        manifest = publish_index(vectors_uri(root, 1), root, num_shards, "c",
                                 IndexBuildConfig(kind="flat", num_shards=num_shards))
        from whetstone.index.snapshot import shard_of

        expected = np.bincount(shard_of(ids, num_shards), minlength=num_shards).tolist()
        assert [entry.count for entry in manifest.shards] == expected
