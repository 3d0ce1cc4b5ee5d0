"""Index version retention: the newest K, pointers and pins stay; files a kept version reuses stay."""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.retention import pin_version, pinned_versions, retain_versions, unpin_version
from whetstone.index.snapshot import (
    latest_version,
    list_versions,
    publish_manifest,
    read_manifest,
    set_staged_version,
)
from whetstone.index.vector_chunks import VectorChunkWriter, layered, read_vector_chunks

DIM = 8


def _snapshot(root: str, version: int) -> None:
    rng = np.random.default_rng(version)
    AnnIndex.build(rng.normal(size=(20, DIM)).astype(np.float32), [f"d{i}" for i in range(20)],
                   AnnConfig(kind="flat")).save(root, version, checkpoint="none")


def _mutation(root: str, version: int, parent: int) -> None:
    """A mutation's manifest: it reuses every shard folder of its parent (nothing new written)."""
    base = read_manifest(root, parent)
    publish_manifest(root, version, list(base.shards), checkpoint="none", dim=base.dim, kind=base.kind,
                     config=base.config)


def test_the_newest_pointed_and_pinned_versions_stay_and_reused_files_survive(tmp_path):
    root = str(tmp_path / "index")
    for version in (1, 2, 3):
        _snapshot(root, version)
    _mutation(root, 4, parent=1)  # v4 names v1's shard folder: v1 goes, its files stay
    _snapshot(root, 5)
    for version in (6, 7):
        _snapshot(root, version)
    set_staged_version(root, 2)  # a version being loaded
    pin_version(root, "eval-job", 3)
    assert pinned_versions(root) == {"eval-job": 3}

    report = retain_versions(root, keep=2)
    assert report.kept == [2, 3, 6, 7] and sorted(report.removed) == [1, 4, 5] and report.freed_bytes > 0
    assert list_versions(root) == [2, 3, 6, 7] and latest_version(root) == 7
    for version in (2, 3, 6, 7):  # every kept version still loads and searches
        assert len(AnnIndex.load(root, version).search(np.ones((1, DIM), np.float32), k=3)[0][0]) == 3

    _mutation(root, 8, parent=6)
    unpin_version(root, "eval-job")
    set_staged_version(root, None)
    report = retain_versions(root, keep=1)
    assert report.kept == [8] and sorted(report.removed) == [2, 3, 6, 7]
    assert list_versions(root) == [8] and (tmp_path / "index" / "v6").exists()  # v8's shard files live there
    assert not (tmp_path / "index" / "v6" / "manifest.json").exists()
    assert not (tmp_path / "index" / "v7").exists() and not (tmp_path / "index" / "v2").exists()
    assert len(AnnIndex.load(root, 8).search(np.ones((1, DIM), np.float32), k=3)[0][0]) == 3
    with pytest.raises(ValueError, match="keep_versions"):
        retain_versions(root, keep=0)


def test_vector_folders_reused_by_a_layered_refresh_or_being_written_stay(tmp_path):
    root = str(tmp_path / "index")
    rng = np.random.default_rng(0)
    for version in (1, 2, 3):
        _snapshot(root, version)

    def vectors(version: int, refresh: int):
        writer = VectorChunkWriter(f"{root}/vectors/v{version}", DIM, refresh=refresh)
        writer.write([f"d{i}" for i in range(5)], rng.normal(size=(5, DIM)).astype(np.float32))
        return writer.close()

    vectors(1, 0)
    vectors(2, 1)
    new = vectors(3, 2)
    layered(new, f"{root}/vectors/v3", read_vector_chunks(f"{root}/vectors/v2"), f"{root}/vectors/v2", keep_from=1)
    (tmp_path / "index" / "vectors" / "v4").mkdir()  # a refresh writing v4 now: no manifest yet, no snapshot

    report = retain_versions(root, keep=1)
    assert report.kept == [3] and report.removed_vectors == [1]
    assert sorted(p.name for p in (tmp_path / "index" / "vectors").iterdir()) == ["v2", "v3", "v4"]
    assert read_vector_chunks(f"{root}/vectors/v3").count == 10  # its own 5 rows and v2's 5
