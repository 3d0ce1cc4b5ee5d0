"""Sharded builds from vector chunks (no Ray here: shards build one after another) and the top-k merge."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex, AnnInputError
from whetstone.index.build import build_shard, build_sharded_index
from whetstone.index.coarse import CoarseAssigner
from whetstone.index.faiss_kinds import auto_nlist
from whetstone.index.merge import merge_topk
from whetstone.index.shard_io import load_shard
from whetstone.index.snapshot import SnapshotConflict, latest_version, read_manifest, shard_of
from whetstone.index.vector_chunks import VectorChunkWriter

DIM = 24


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(count: int, seed: int = 0, clusters: int = 25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(np.random.default_rng(99).standard_normal((clusters, DIM)))
    return unit(centres[rng.integers(0, clusters, count)] + 0.15 * rng.standard_normal((count, DIM)))


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """2,500 clustered vectors written as chunks of 400 rows, in batches of 333."""
    docs = clustered(2500)
    ids = [f"d{i}" if i % 3 else f"文-{i}" for i in range(len(docs))]
    uri = str(tmp_path_factory.mktemp("vec") / "vectors" / "v1")
    with VectorChunkWriter(uri, DIM, rows_per_chunk=400) as writer:
        for start in range(0, len(docs), 333):
            writer.write(ids[start:start + 333], docs[start:start + 333])
    return uri, docs, ids


@pytest.fixture(scope="module")
def partitioned(vectors, tmp_path_factory):
    """The same vectors written partitioned for S = 2: each chunk holds one shard's rows."""
    _, docs, ids = vectors
    uri = str(tmp_path_factory.mktemp("vec2") / "vectors" / "v1")
    with VectorChunkWriter(uri, DIM, rows_per_chunk=400, num_shards=2) as writer:
        for start in range(0, len(docs), 333):
            writer.write(ids[start:start + 333], docs[start:start + 333])
    return uri, docs, ids


@pytest.mark.parametrize(("num_shards", "written_for"), [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_sharded_flat_equals_unsharded_flat(tmp_path, vectors, partitioned, num_shards, written_for):
    """Chunks written for S=1 or S=2; a build with another S reads every chunk and filters."""
    uri, docs, ids = vectors if written_for == 1 else partitioned
    root = str(tmp_path / "index")
    manifest = build_sharded_index(uri, root, 3, num_shards, AnnConfig(kind="flat"), "ckpt", extra={"step": 9},
                                   chunk_bytes=16384)
    assert (manifest.num_shards, manifest.count, manifest.extra) == (num_shards, len(ids), {"step": 9})
    assert latest_version(root) is None, "set_latest defaults to False: the service's swap moves LATEST"
    assert read_manifest(root, 3).sha256 == manifest.sha256
    shards = [load_shard(root, manifest, shard) for shard in range(num_shards)]
    # Every id on exactly one shard, the one shard_of names.
    held = {shard: shards[shard].idmap.ids_of(shards[shard].idmap.live_labels()) for shard in range(num_shards)}
    everything = [doc for shard in range(num_shards) for doc in held[shard]]
    assert sorted(everything) == sorted(ids) and len(everything) == len(set(everything))
    for shard, held_ids in held.items():
        assert (shard_of(held_ids, num_shards) == shard).all()
        assert manifest.shards[shard].count == len(held_ids)
    queries = np.concatenate([clustered(30, seed=5), docs[:3]])
    excluded = [[ids[i % 7], ids[(i + 1) % 7]] for i in range(len(queries))]
    whole = AnnIndex.build(docs, ids, AnnConfig(kind="flat"))
    for k, exclude in ((10, None), (25, excluded)):
        want_ids, want_scores = whole.search(queries, k, exclude_ids=exclude)
        got_ids, got_scores = merge_topk([shard.search(queries, k, exclude_ids=exclude) for shard in shards], k)
        assert got_ids == want_ids
        np.testing.assert_array_equal(got_scores, want_scores)


def test_ivf_shards_share_one_trained_index_and_merge_to_the_unsharded_result(tmp_path, vectors):
    """IVF is trained once per build (nlist for the whole corpus) and every shard starts from it: the
    shards hold the same cells, so the merged top-k at nprobe p is the one-shard index's at p."""
    uri, docs, ids = vectors
    config = AnnConfig(kind="ivf", nprobe=3)
    manifest = build_sharded_index(uri, str(tmp_path / "s3"), 1, 3, config, "ckpt", set_latest=True)
    whole_manifest = build_sharded_index(uri, str(tmp_path / "s1"), 1, 1, config, "ckpt")
    assert latest_version(str(tmp_path / "s3")) == 1 and manifest.config["nlist"] is None
    shards = [load_shard(str(tmp_path / "s3"), manifest, shard) for shard in range(3)]
    whole = load_shard(str(tmp_path / "s1"), whole_manifest, 0)
    centroids = [faiss.extract_index_ivf(s.faiss_index).quantizer.reconstruct_n(0, auto_nlist(len(ids)))
                 for s in (*shards, whole)]
    for other in centroids[1:]:
        np.testing.assert_array_equal(other, centroids[0])
    queries = clustered(40, seed=7)
    got_ids, got_scores = merge_topk([shard.search(queries, 10) for shard in shards], 10)
    want_ids, want_scores = whole.search(queries, 10)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)
    exact, _ = AnnIndex.build(docs, ids, AnnConfig(kind="flat")).search(queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got_ids, exact, strict=True)])
    assert 0.6 <= recall < 1.0, recall  # nprobe 3 of 50 cells: approximate, and close
    assert shards[0].scores_for(queries[:1], [[ids[0]]]) == [[None]], "IVF keeps no full vectors"


def test_cells_assigned_once_give_each_shards_own_answer_and_a_foreign_quantizer_is_ignored(tmp_path, vectors):
    """The ingress finds each query's cells once (whetstone.index.coarse) and every shard scans the
    lists it names: the merged answer is the one the shards give alone. An assignment from another
    quantizer (another build's cells) must not be used: the shard assigns the queries itself."""
    uri, docs, ids = vectors
    for kind in ("ivf", "ivfpq"):
        config = AnnConfig(kind=kind, nprobe=3, pq_m=4, pq_nbits=6)
        manifest = build_sharded_index(uri, str(tmp_path / kind), 1, 3, config, "ckpt")
        shards = [load_shard(str(tmp_path / kind), manifest, shard) for shard in range(3)]
        assigners = [shard.coarse_assigner() for shard in shards]
        assert len({a.fingerprint for a in assigners}) == 1 and assigners[0].nprobe == 3
        queries = clustered(40, seed=11)
        before = queries.copy()
        assigned = assigners[0].assign(queries)
        np.testing.assert_array_equal(queries, before)  # the caller's rows are not normalised in place
        assert assigned.cells.shape == (40, 3) and assigned.cells.max() < assigners[0].nlist
        for shard in shards:
            want_ids, want_scores = shard.search(queries, 10)
            got_ids, got_scores = shard.search(queries, 10, assigned=assigned)
            assert got_ids == want_ids
            np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
        # The assignment sets how many cells are scanned: nprobe 12 from the ingress, 12 scanned.
        wide = CoarseAssigner(faiss.extract_index_ivf(shards[0].faiss_index).quantizer, 12, normalize=True,
                              owner=shards[0].faiss_index).assign(queries)
        shards[1].set_search_params(nprobe=12)
        want_ids, _ = shards[1].search(queries, 10)
        shards[1].set_search_params(nprobe=3)
        assert shards[1].search(queries, 10, assigned=wide)[0] == want_ids != shards[1].search(queries, 10)[0]
    # Another build with other cells: its assignment is ignored, not scanned.
    other = build_sharded_index(uri, str(tmp_path / "other"), 2, 3, AnnConfig(kind="ivf", nprobe=3, nlist=40),
                                "ckpt")
    foreign = load_shard(str(tmp_path / "other"), other, 0).coarse_assigner().assign(queries)
    ivf = build_sharded_index(uri, str(tmp_path / "ivf2"), 1, 3, AnnConfig(kind="ivf", nprobe=3), "ckpt")
    shard = load_shard(str(tmp_path / "ivf2"), ivf, 0)
    assert foreign.fingerprint != shard.coarse_assigner().fingerprint
    assert shard.search(queries, 10, assigned=foreign)[0] == shard.search(queries, 10)[0]
    flat = AnnIndex.build(docs[:50], ids[:50], AnnConfig(kind="flat"))
    assert flat.coarse_assigner() is None
    assert flat.search(queries, 5, assigned=foreign)[0] == flat.search(queries, 5)[0]


def test_ivf_training_sample_is_seeded_by_version_and_bounded(tmp_path, vectors, monkeypatch):
    """k-means gets at most 64 rows per cell from the whole corpus, the same rows for the same
    version, other rows for another (a swap between two builds of the same vectors loads new bytes)."""
    import whetstone.index.build as build_module

    seen = []
    real = build_module.make_faiss

    def spy(dim, config, train=None, count=None, **kwargs):
        seen.append((train.copy(), count))
        return real(dim, config, train, count, **kwargs)

    monkeypatch.setattr(build_module, "make_faiss", spy)
    uri, _, ids = vectors
    for version in (1, 1, 2):
        build_shard(uri, 1, 2, AnnConfig(kind="ivf", nlist=5), str(tmp_path / f"index{len(seen)}"), version)
    (first, count), (again, _), (other, _) = seen
    assert count == len(ids) and first.shape == (64 * 5, DIM)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_hnsw_shards_keep_tombstones_and_small_shards_are_refused(tmp_path, vectors):
    uri, docs, ids = vectors
    root = str(tmp_path / "index")
    manifest = build_sharded_index(uri, root, 1, 2, AnnConfig(kind="hnsw", hnsw_m=8), "ckpt")
    shard = load_shard(root, manifest, 0)
    gone = shard.idmap.ids_of(shard.idmap.live_labels()[:20])
    assert shard.remove(gone) == 20 and shard._tombstones.size == 20
    assert not set(gone) & {doc for row in shard.search(docs[:50], 10)[0] for doc in row}
    with pytest.raises(SnapshotConflict, match="already exists"):
        build_sharded_index(uri, root, 1, 2, AnnConfig(), "ckpt")
    with pytest.raises(AnnInputError, match=r"vectors/v1 \(\d+ rows\): .*nlist=5000 needs at least 5000"):
        build_sharded_index(uri, root, 2, 4, AnnConfig(kind="ivf", nlist=5000), "ckpt")


def test_merge_topk_is_stable_and_pads():
    a = ([["a1", "a2"], ["", ""]], np.array([[0.9, 0.5], [-np.inf, -np.inf]], np.float32))
    b = ([["b1", ""], ["b2", ""]], np.array([[0.5, -np.inf], [0.3, -np.inf]], np.float32))
    ids, scores = merge_topk([a, b], 3)
    assert ids == [["a1", "a2", "b1"], ["b2", "", ""]]  # tie at 0.5: the lower shard first
    np.testing.assert_array_equal(scores[1], np.array([0.3, -np.inf, -np.inf], np.float32))
    assert merge_topk([a], 4)[0][0] == ["a1", "a2", "", ""]
    with pytest.raises(ValueError, match="shard 1 answered 1 id rows"):
        merge_topk([a, ([["x"]], np.zeros((1, 1)))], 2)


def test_training_rows_are_capped_in_bytes_but_not_below_39_per_cell():
    from whetstone.index.faiss_kinds import train_rows

    assert train_rows(100, 384) == 6_400  # 64 per cell
    assert train_rows(8_944, 384) == 512 * 2**20 // (4 * 384)  # 5M x 384 in one shard: 349,525 rows, not 572k
    assert train_rows(20_000, 384) == 39 * 20_000  # the floor wins over the byte cap


def test_a_partitioned_writer_puts_each_shard_in_its_own_chunks(partitioned, monkeypatch):
    from whetstone.index import build as build_module
    from whetstone.index.vector_chunks import iter_vector_chunks, read_vector_chunks

    uri, _, ids = partitioned
    manifest = read_vector_chunks(uri)
    owner = shard_of(ids, 2)
    assert manifest.num_shards == 2 and manifest.count == len(ids)
    for shard in range(2):
        assert sum(c.rows for c in manifest.chunks if c.shard == shard) == int((owner == shard).sum())
        held = [doc for chunk_ids, _ in iter_vector_chunks(uri, shard=shard) for doc in chunk_ids]
        assert held == [doc for doc, s in zip(ids, owner, strict=True) if s == shard]  # order kept
    assert all(c.rows == 400 for c in manifest.chunks[:-2])
    read = []
    monkeypatch.setattr(build_module, "iter_vector_chunks",
                        lambda *args, **kwargs: read.append(kwargs.get("shard")) or iter_vector_chunks(*args, **kwargs))
    list(build_module._shard_chunks(uri, manifest, 1, 2, None))
    assert read == [[1]], "a builder with the writer's S reads only its own partition"
