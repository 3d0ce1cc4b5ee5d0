"""Partial refresh: which documents each refresh re-embeds, the index's age, and layered vector chunks."""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig
from whetstone.index.build import build_sharded_index
from whetstone.index.shard_io import load_shard
from whetstone.index.snapshot import read_manifest
from whetstone.index.vector_chunks import VectorChunkWriter, layered, read_vector_chunks
from whetstone.train.partial_refresh import PartialRefreshPolicy, slice_of, slices_for

IDS = [f"doc-{i}" for i in range(2000)]


def policy_for(fraction: float, served_share: float = 0.5) -> PartialRefreshPolicy:
    slices = slices_for(fraction)
    sizes = np.bincount(slice_of(IDS, slices), minlength=slices).tolist()
    return PartialRefreshPolicy(fraction, served_share, len(IDS), sizes)


@pytest.mark.parametrize("fraction", [0.25, 0.3, 0.5, 1.0])
def test_every_document_is_reembedded_within_ceil_one_over_f_refreshes(fraction):
    policy = policy_for(fraction)
    rounds = slices_for(fraction)
    assert rounds == int(np.ceil(1 / fraction))
    covered = np.zeros(len(IDS), dtype=bool)
    for _ in range(rounds):
        chosen = policy.next_plan().selects(IDS)
        assert abs(chosen.mean() - 1 / rounds) < 0.05  # about one slice (of f N) each
        covered |= chosen
    assert covered.all()
    # and again in the next round, whatever the served negatives add
    covered[:] = False
    for _ in range(rounds):
        policy.served.note(IDS[:10])
        covered |= policy.next_plan().selects(IDS)
    assert covered.all()


def test_recently_served_negatives_come_first_within_their_budget():
    policy = policy_for(0.25, served_share=0.5)  # budget 0.5 * 0.25 * 2000 = 250
    assert policy.served_budget == 250
    policy.served.note(IDS[:400])
    policy.served.note(IDS[:5])  # served again: now the newest
    plan = policy.next_plan()
    assert len(plan.served) == 250 and plan.served[:5] == IDS[4::-1]  # newest first
    chosen = plan.selects(IDS)
    assert chosen[[IDS.index(i) for i in plan.served]].all()
    assert len(policy.served) == 150  # the rest wait for the next refresh
    policy.abandon(plan)  # a failed refresh: same slice next, its served ids back in the queue
    again = policy.next_plan()
    assert (again.number, again.slice, len(again.served)) == (1, 0, 250) and again.served[:5] == IDS[4::-1]


def test_index_age_is_exact_per_step_and_oldest_step():
    policy = policy_for(0.5)  # two slices
    assert policy.age.summary()["share_by_step"] == {"0": 1.0}
    first = policy.next_plan()
    policy.done(first, step=10)
    size0 = policy.age.slice_docs[0] / len(IDS)
    assert policy.age.shares() == pytest.approx({0: 1 - size0, 10: size0})
    policy.served.note(["doc-1", "doc-2", "doc-3"])  # served; re-embedded with the next slice
    second = policy.next_plan()
    outside = [i for i in second.served if slice_of([i], 2)[0] != second.slice]
    policy.done(second, step=20)
    shares = policy.age.shares()
    assert sum(shares.values()) == pytest.approx(1.0) and min(shares) == 10
    assert shares[20] == pytest.approx(policy.age.slice_docs[1] / len(IDS) + len(outside) / len(IDS))
    third = policy.next_plan()  # slice 0 again: its served-at-20 documents are re-embedded at 30
    policy.done(third, step=30)
    summary = policy.age.summary()
    assert (summary["oldest_step"], summary["newest_step"]) == (20, 30)
    assert sum(summary["share_by_step"].values()) == pytest.approx(1.0, abs=1e-4)


def test_layered_chunks_build_the_newest_vector_of_every_document(tmp_path):
    """v1 holds every document; v2 re-embeds slice 0 and v3 slice 1 (R = 2) as layers: each build
    holds one vector per document, the newest, and v3's layers no longer reach v1's chunks."""
    rng = np.random.default_rng(0)
    ids = IDS[:600]
    old, new = rng.standard_normal((600, 8)).astype(np.float32), rng.standard_normal((600, 8)).astype(np.float32)
    root, index_root = tmp_path / "vectors", str(tmp_path / "index")
    with VectorChunkWriter(str(root / "v1"), 8, rows_per_chunk=128, num_shards=2, step=0, refresh=0) as writer:
        writer.write(ids, old)
    parts = slice_of(ids, 2)
    previous = str(root / "v1")
    for version, part in ((2, 0), (3, 1)):
        rows = np.flatnonzero(parts == part)
        writer = VectorChunkWriter(str(root / f"v{version}"), 8, rows_per_chunk=128, num_shards=2,
                                   step=version * 10, refresh=version - 1)
        writer.write([ids[r] for r in rows], new[rows])
        manifest = layered(writer.close(), str(root / f"v{version}"), read_vector_chunks(previous), previous,
                           keep_from=max(0, (version - 1) - 2 + 1))
        previous = str(root / f"v{version}")
        build_sharded_index(previous, index_root, version, 2, AnnConfig(kind="flat"), "ckpt")
        snapshot = read_manifest(index_root, version)
        assert snapshot.count == 600  # one vector per document, duplicates in the layers skipped
        stored: dict[str, np.ndarray] = {}
        for shard in range(2):
            index = load_shard(index_root, snapshot, shard)
            held = [doc_id for doc_id in ids if index.idmap.labels_of([doc_id])[0] >= 0]
            stored.update(zip(held, index.vectors_for(held), strict=True))
        assert len(stored) == 600
        for i, doc_id in enumerate(ids):  # slices re-embedded so far have the new vector
            want = new[i] if parts[i] <= part else old[i]
            np.testing.assert_allclose(stored[doc_id], want / np.linalg.norm(want), atol=1e-5)
        reused = {chunk.folder for chunk in manifest.chunks if chunk.folder}
        assert reused == ({"v1"} if version == 2 else {"v2"})  # after R = 2 refreshes v1 is not needed

