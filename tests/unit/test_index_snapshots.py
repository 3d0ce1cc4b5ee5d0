"""Format-2 snapshots: shards stream through checksummed chunks; manifests, pointers, vector chunks."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex, AnnInputError
from whetstone.index.shard_io import load_shard, save_shard
from whetstone.index.snapshot import (
    SnapshotConflict,
    SnapshotError,
    SnapshotNotFound,
    latest_version,
    publish_manifest,
    read_manifest,
    set_staged_version,
    shard_of,
    staged_version,
)
from whetstone.index.vector_chunks import VectorChunkWriter, iter_vector_chunks, read_vector_chunks

DIM = 16
CONFIG = {"flat": AnnConfig(kind="flat"), "hnsw": AnnConfig(kind="hnsw", hnsw_m=8),
          "ivf": AnnConfig(kind="ivf", nlist=8, nprobe=8), "ivfpq": AnnConfig(kind="ivfpq", nlist=4, pq_m=4)}


def corpus(count: int = 600, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, DIM)).astype(np.float32), [f"doc-{i}-é" for i in range(count)]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_shard_round_trips_through_many_small_chunks(tmp_path, kind):
    docs, ids = corpus()
    root = str(tmp_path / "index")
    index = AnnIndex.build(docs, ids, CONFIG[kind])
    index.remove(ids[:40])  # hnsw: tombstones; others: removed from FAISS
    entry = save_shard(index, root, 1, 0, chunk_bytes=4096)
    faiss_chunks = entry.files["index.faiss"].chunks
    assert len(faiss_chunks) > 3 and all(c.bytes <= 4096 for c in faiss_chunks)
    assert sum(c.bytes for c in faiss_chunks) == entry.files["index.faiss"].bytes
    assert (tmp_path / "index" / "v1" / "shard-0000" / faiss_chunks[-1].name).stat().st_size == faiss_chunks[-1].bytes
    manifest = publish_manifest(root, 1, [entry], checkpoint="ck", dim=DIM, kind=kind,
                                config=CONFIG[kind].model_dump(mode="json"), extra={"step": 3})
    assert (manifest.count, manifest.num_shards, latest_version(root)) == (560, 1, 1)
    loaded = load_shard(root, read_manifest(root, 1), 0)
    assert (loaded.size, loaded.kind, loaded.version, loaded.checkpoint, loaded.extra) == (560, kind, 1, "ck", {"step": 3})
    queries = corpus(20, seed=1)[0]
    want_ids, want_scores = index.search(queries, 8)
    got_ids, got_scores = loaded.search(queries, 8)
    assert got_ids == want_ids and np.array_equal(got_scores, want_scores)
    assert not {doc for row in got_ids for doc in row} & set(ids[:40])
    if kind == "hnsw":
        assert np.array_equal(loaded._tombstones, np.arange(40)), "tombstones survive the round trip"
    # Same bytes in, same fingerprint out; AnnIndex.load reads the same 1-shard snapshot.
    assert save_shard(loaded, root, 2, 0, chunk_bytes=4096).fingerprint == entry.fingerprint
    assert AnnIndex.load(root).search(queries, 8)[0] == want_ids


@pytest.mark.parametrize("file", ["index.faiss", "ids"])
def test_a_flipped_byte_names_the_corrupt_chunk(tmp_path, file):
    docs, ids = corpus()
    root = str(tmp_path / "index")
    AnnIndex.build(docs, ids, AnnConfig()).save(root, 4, "ck", chunk_bytes=2048)
    chunk = tmp_path / "index" / "v4" / "shard-0000" / f"{file}.00002"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=rf"checksum mismatch for .*/v4/shard-0000/{file}\.00002\b"):
        AnnIndex.load(root)
    chunk.unlink()
    with pytest.raises(SnapshotError, match=rf"snapshot chunk .*/v4/shard-0000/{file}\.00002 is missing"):
        AnnIndex.load(root, 4)


def test_manifest_reusing_an_older_versions_shard_prefix_loads(tmp_path):
    """v2 rewrites shard 1 only; its shard 0 entry points at v1's files (same fingerprint)."""
    docs, ids = corpus()
    root = str(tmp_path / "index")
    owner = shard_of(ids, 2)
    entries = []
    for shard in range(2):
        rows = np.flatnonzero(owner == shard)
        part = AnnIndex.build(docs[rows], [ids[r] for r in rows], AnnConfig())
        entries.append(save_shard(part, root, 1, shard, chunk_bytes=8192))
    config = AnnConfig().model_dump(mode="json")
    v1 = publish_manifest(root, 1, entries, checkpoint="a", dim=DIM, kind="flat", config=config)
    shard1 = load_shard(root, v1, 1)
    new_id = next(f"new-{i}" for i in range(100) if shard_of([f"new-{i}"], 2)[0] == 1)
    shard1.add(-docs[:1], [new_id])
    v2 = publish_manifest(root, 2, [v1.shards[0], save_shard(shard1, root, 2, 1)], checkpoint="b", dim=DIM,
                          kind="flat", config=config)
    again = read_manifest(root, 2)
    assert again.shards[0].prefix == "v1/shard-0000" and again.shards[1].prefix == "v2/shard-0001"
    assert again.shards[0].fingerprint == v1.shards[0].fingerprint != again.shards[1].fingerprint
    assert again.count == v1.count + 1 == v2.count and not (tmp_path / "index" / "v2" / "shard-0000").exists()
    loaded = [load_shard(root, again, shard) for shard in range(2)]
    assert loaded[0].version == 2 and loaded[1].search(-docs[:1], 1)[0] == [[new_id]]
    with pytest.raises(AnnInputError, match="has 2 shards: .*load_shard"):
        AnnIndex.load(root, 2)
    with pytest.raises(SnapshotConflict, match="already published"):
        save_shard(shard1, root, 2, 1)
    with pytest.raises(SnapshotConflict, match="already exists"):
        publish_manifest(root, 2, again.shards, checkpoint="c", dim=DIM, kind="flat", config=config)
    with pytest.raises(SnapshotError, match=r"shards must be 0..1 in order, got \[0, 0\]"):
        publish_manifest(root, 3, [again.shards[0], again.shards[0]], checkpoint="c", dim=DIM, kind="flat",
                         config=config)


def test_manifest_checks_and_pointers(tmp_path):
    docs, ids = corpus(100)
    root = tmp_path / "index"
    AnnIndex.build(docs, ids, AnnConfig()).save(str(root), 1, "ck", extra={"step": 7})
    manifest = read_manifest(str(root), 1)
    assert manifest["checkpoint"] == "ck" and manifest.get("extra") == {"step": 7}  # dict-style access kept
    raw = json.loads((root / "v1" / "manifest.json").read_text())
    assert raw["format"] == 2 and raw["assignment"] == "crc32" and raw["shards"][0]["prefix"] == "v1/shard-0000"
    raw["shards"][0]["count"] = 99
    (root / "v1" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SnapshotError, match="count 100 != the sum of the shard counts"):
        read_manifest(str(root), 1)
    (root / "v5").mkdir()
    (root / "v5" / "manifest.json").write_text(json.dumps({"format": 1, "files": {}}))
    with pytest.raises(SnapshotError, match=r"v5/manifest.json: .*format 1: rebuild the index"):
        AnnIndex.load(str(root), 5)
    with pytest.raises(SnapshotNotFound, match=r"no snapshot v9 .*available versions: \[1, 5\]"):
        read_manifest(str(root), 9)
    assert staged_version(str(root)) is None
    set_staged_version(str(root), 3)
    assert staged_version(str(root)) == 3 and latest_version(str(root)) == 1
    set_staged_version(str(root), None)
    set_staged_version(str(root), None)  # removing twice is fine
    assert staged_version(str(root)) is None


def test_shard_of_is_crc32_mod_s_and_spreads_evenly():
    ids = [f"doc-{i}" for i in range(20_000)] + ["café", "文档"]
    shards = shard_of(ids, 4)
    assert shards.dtype == np.int64
    assert shards[-2:].tolist() == [zlib.crc32("café".encode()) % 4, zlib.crc32("文档".encode()) % 4]
    counts = np.bincount(shards, minlength=4)
    assert counts.min() > 0.95 * len(ids) / 4, counts
    assert np.array_equal(shard_of(ids, 1), np.zeros(len(ids), np.int64))
    with pytest.raises(ValueError, match="num_shards"):
        shard_of(ids, 0)


def test_vector_chunks_round_trip_and_name_a_corrupt_chunk(tmp_path):
    docs, ids = corpus(1000)
    uri = str(tmp_path / "vectors" / "v1")
    with VectorChunkWriter(uri, DIM, rows_per_chunk=300) as writer:
        for start in range(0, 1000, 170):  # batches that straddle chunk borders
            writer.write(ids[start:start + 170], docs[start:start + 170])
    manifest = read_vector_chunks(uri)
    assert [c.rows for c in manifest.chunks] == [300, 300, 300, 100] and manifest.count == 1000
    got = list(iter_vector_chunks(uri))
    assert [doc for chunk_ids, _ in got for doc in chunk_ids] == ids
    assert np.array_equal(np.concatenate([vectors for _, vectors in got]), docs)
    chunk = tmp_path / "vectors" / "v1" / "chunk-00001.bin"
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"checksum mismatch for .*vectors/v1/chunk-00001.bin"):
        list(iter_vector_chunks(uri))
    with pytest.raises(SnapshotNotFound, match="no vector chunks at .*nowhere"):
        read_vector_chunks(str(tmp_path / "nowhere"))
    with pytest.raises(AnnInputError, match="dimension 8 does not match"):
        VectorChunkWriter(str(tmp_path / "x"), DIM).write(["a"], np.ones((1, 8), np.float32))
