"""AnnIndex against brute-force numpy: search, exclusions, mutation, snapshots (no Ray)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from pydantic import ValidationError
from whetstone.index.ann import (
    AnnConfig,
    AnnIndex,
    AnnInputError,
    SnapshotConflict,
    SnapshotError,
    SnapshotNotFound,
    latest_version,
    list_versions,
)

DIM = 32


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(count: int, dim: int = DIM, clusters: int = 20, spread: float = 0.1, seed: int = 0):
    """Unit vectors around random centres: neighbours exist, so approximate recall means something."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    rows = centres[rng.integers(0, clusters, count)] + spread * rng.standard_normal((count, dim))
    return unit(rows)


def brute_force(docs: np.ndarray, ids: list[str], queries: np.ndarray, k: int, excluded=None):
    """Exact cosine top-k in numpy: the reference every index kind is checked against."""
    scores = unit(queries) @ unit(docs).T  # (Q, N)
    out_ids, out_scores = [], []
    for row in range(len(queries)):
        order = [j for j in np.argsort(-scores[row], kind="stable") if not excluded or ids[j] not in excluded[row]]
        out_ids.append([ids[j] for j in order[:k]])
        out_scores.append(scores[row, order[:k]])
    return out_ids, np.array(out_scores, dtype=np.float32)


@pytest.fixture()
def corpus():
    docs = np.random.default_rng(1).standard_normal((300, DIM)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(len(docs))]
    queries = np.random.default_rng(2).standard_normal((12, DIM)).astype(np.float32)
    return docs, ids, queries


def test_flat_search_equals_brute_force(corpus):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig(kind="flat"))
    got_ids, got_scores = index.search(queries, 7)
    want_ids, want_scores = brute_force(docs, ids, queries, 7)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert got_scores.shape == (12, 7) and got_scores.dtype == np.float32
    assert (index.dim, index.size, index.kind) == (DIM, 300, "flat")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_batched_search_equals_one_by_one(corpus, kind):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig(kind=kind, nlist=4, nprobe=4))
    batched_ids, batched_scores = index.search(queries, 5)
    for row, query in enumerate(queries):
        single_ids, single_scores = index.search(query[None, :], 5)
        assert single_ids[0] == batched_ids[row]
        np.testing.assert_allclose(single_scores[0], batched_scores[row], atol=1e-5)


def test_excluded_ids_never_returned_and_rows_stay_full(corpus):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig(kind="flat"))
    top_ids, _ = index.search(queries, 5)
    # Exclude each query's own top 3 (the case that matters: positives sit at the top).
    excluded = [row[:3] for row in top_ids]
    got_ids, got_scores = index.search(queries, 5, exclude_ids=excluded)
    want_ids, want_scores = brute_force(docs, ids, queries, 5, excluded)
    assert got_ids == want_ids
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    for row, banned in zip(got_ids, excluded, strict=True):
        assert not set(row) & set(banned) and "" not in row


def test_pads_only_when_index_is_smaller_than_k():
    docs = np.eye(3, DIM, dtype=np.float32)
    index = AnnIndex.build(docs, ["a", "b", "c"], AnnConfig())
    got_ids, got_scores = index.search(docs[:1], 5, exclude_ids=[["b"]])
    assert got_ids[0][:2] == ["a", "c"] and got_ids[0][2:] == ["", "", ""]
    assert np.isneginf(got_scores[0, 2:]).all() and np.isfinite(got_scores[0, :2]).all()
    empty = AnnIndex.build(np.zeros((0, DIM), np.float32), [], AnnConfig(kind="hnsw"))
    assert empty.search(docs[:2], 2)[0] == [["", ""], ["", ""]]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_remove_and_upsert(corpus, kind):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig(kind=kind, nlist=4, nprobe=4))
    top_ids, _ = index.search(queries, 3)
    gone = sorted({row[0] for row in top_ids})
    assert index.remove(gone + ["never-added"]) == len(gone)
    assert index.size == 300 - len(gone)
    assert index.remove(gone) == 0
    after_ids, _ = index.search(queries, 3)
    assert not {doc for row in after_ids for doc in row} & set(gone)
    # Upsert: re-adding an existing id moves it; the query's nearest is now that id.
    index.add(queries[:1], ["doc-5"])
    assert index.size == 300 - len(gone) + (1 if "doc-5" in gone else 0)
    assert index.search(queries[:1], 1)[0][0] == ["doc-5"]


def test_hnsw_rebuilds_after_many_removals_and_stays_correct():
    docs = clustered(400)
    ids = [f"d{i}" for i in range(400)]
    index = AnnIndex.build(docs, ids, AnnConfig(kind="hnsw", hnsw_m=16, ef_search=200))
    removed = ids[:150]  # > 25% -> the graph is rebuilt from the live vectors
    assert index.remove(removed) == 150
    assert index._tombstones.size == 0 and index.idmap.next_label == 250, "the rebuild clears tombstones"
    queries = clustered(20, seed=5)
    got_ids, _ = index.search(queries, 10)
    want_ids, _ = brute_force(docs[150:], ids[150:], queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got_ids, want_ids, strict=True)])
    assert recall >= 0.95
    assert not {doc for row in got_ids for doc in row} & set(removed)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_kinds_recall_on_clustered_data(kind):
    docs = clustered(2000, clusters=30)
    ids = [str(i) for i in range(2000)]
    queries = clustered(50, clusters=30, seed=9)
    config = AnnConfig(kind=kind, nprobe=8, pq_m=8)
    index = AnnIndex.build(docs, ids, config)
    got_ids, _ = index.search(queries, 10)
    want_ids, _ = brute_force(docs, ids, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got_ids, want_ids, strict=True)])
    assert recall >= {"hnsw": 0.95, "ivf": 0.8, "ivfpq": 0.3}[kind], recall


def test_bad_inputs_name_the_argument(corpus):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig())
    with pytest.raises(AnnInputError, match="dimension 16 does not match the index dimension 32"):
        index.search(queries[:, :16], 3)
    bad = queries.copy()
    bad[2, 7] = np.nan
    with pytest.raises(AnnInputError, match=r"queries\[2\]\[7\] is nan"):
        index.search(bad, 3)
    with pytest.raises(AnnInputError, match="k: must be a positive integer"):
        index.search(queries, 0)
    with pytest.raises(AnnInputError, match="exclude_ids: 1 lists for 12 queries"):
        index.search(queries, 3, exclude_ids=[["doc-1"]])
    with pytest.raises(AnnInputError, match="'x' appears more than once"):
        index.add(docs[:2], ["x", "x"])
    with pytest.raises(AnnInputError, match=r"ids\[1\] must be a non-empty string"):
        index.add(docs[:2], ["y", ""])
    with pytest.raises(AnnInputError, match="needs at least 256 training vectors"):
        AnnIndex.build(docs[:100], ids[:100], AnnConfig(kind="ivfpq", nlist=2))
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        AnnConfig(kind="flat", efsearch=3)
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        with pytest.raises(AnnInputError, match="use_gpu"):
            AnnIndex.build(docs, ids, AnnConfig(use_gpu=True))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_snapshot_round_trip(tmp_path, corpus, kind):
    docs, ids, queries = corpus
    root = str(tmp_path / "index")
    index = AnnIndex.build(docs, ids, AnnConfig(kind=kind, nlist=4, nprobe=4))
    index.remove(["doc-1", "doc-2"])  # tombstones (hnsw) and gaps (flat, ivf) must survive
    assert latest_version(root) is None
    uri = index.save(root, 3, checkpoint="ckpt/step-10", extra={"step": 10})
    assert uri.endswith("/v3") and (index.version, index.checkpoint) == (3, "ckpt/step-10")
    loaded = AnnIndex.load(root)
    assert (loaded.version, loaded.checkpoint, loaded.kind, loaded.size) == (3, "ckpt/step-10", kind, 298)
    assert loaded.built_at == index.built_at and loaded.extra == {"step": 10}
    assert loaded.search(queries, 5)[0] == index.search(queries, 5)[0]
    manifest = json.loads((tmp_path / "index" / "v3" / "manifest.json").read_text())
    assert manifest["count"] == 298 and manifest["dim"] == DIM and len(manifest["sha256"]) == 64
    assert latest_version(root) == 3 and list_versions(root) == [3]


def test_snapshot_versions_latest_and_errors(tmp_path, corpus):
    docs, ids, _ = corpus
    root = str(tmp_path / "index")
    index = AnnIndex.build(docs, ids, AnnConfig())
    index.save(root, 1, checkpoint="a")
    index.save(root, 2, checkpoint="b")
    index.save(root, 7, checkpoint="c", set_latest=False)
    assert latest_version(root) == 2 and list_versions(root) == [1, 2, 7]
    assert AnnIndex.load(root).checkpoint == "b" and AnnIndex.load(root, 1).checkpoint == "a"
    with pytest.raises(SnapshotNotFound, match=r"no snapshot v5 under .*available versions: \[1, 2, 7\]"):
        AnnIndex.load(root, 5)
    with pytest.raises(SnapshotConflict, match="already exists"):
        index.save(root, 2, checkpoint="again")
    index.save(root, 2, checkpoint="again", overwrite=True)
    # Corrupt one byte of the index file: the checksum check names the chunk.
    path = tmp_path / "index" / "v1" / "shard-0000" / "index.faiss.00000"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"checksum mismatch for .*v1/shard-0000/index.faiss.00000") as err:
        AnnIndex.load(root, 1)
    assert not isinstance(err.value, SnapshotNotFound), "there but broken is not 'not found'"
    with pytest.raises(SnapshotNotFound, match="LATEST is missing"):
        AnnIndex.load(str(tmp_path / "empty"))
    (tmp_path / "index" / "LATEST").write_text("7\n")
    (tmp_path / "index" / "v7" / "manifest.json").unlink()  # LATEST names a version that is gone
    with pytest.raises(SnapshotNotFound, match="no snapshot v7"):
        AnnIndex.load(root)


def test_copy_is_independent(corpus):
    docs, ids, queries = corpus
    index = AnnIndex.build(docs, ids, AnnConfig(kind="hnsw"))
    before = index.search(queries, 4)[0]
    clone = index.copy()
    clone.remove([row[0] for row in before])
    clone.add(docs[:1] * -1, ["new"])
    assert index.search(queries, 4)[0] == before and "new" not in index and "new" in clone
