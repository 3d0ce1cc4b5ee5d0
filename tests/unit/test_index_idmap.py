"""IdMap: string ids <-> int64 labels over numpy arrays, at 10^5 ids, unicode, hash collisions."""

from __future__ import annotations

import numpy as np
import pytest
import whetstone.index.idmap as idmap_module
from whetstone.index.ann import AnnInputError
from whetstone.index.idmap import IdMap, hash_ids

COUNT = 120_000


def many_ids(count: int = COUNT) -> list[str]:
    """Ascii, accented, CJK, emoji and long ids: utf-8 lengths from 1 to 4 bytes per character."""
    kinds = ["doc-{}", "café-{}", "文档{}", "🦀{}🦀", "https://example.org/a/very/long/path/{}?q=1"]
    return [kinds[i % len(kinds)].format(i) for i in range(count)]


def test_add_lookup_remove_and_round_trip_at_scale():
    ids = many_ids()
    idmap = IdMap()
    first = idmap.add(ids[:50_000])
    second = idmap.add(ids[50_000:])
    assert first.tolist() == list(range(50_000)) and second[0] == 50_000 and second[-1] == COUNT - 1
    assert len(idmap) == COUNT and idmap.next_label == COUNT
    probe = np.random.default_rng(0).choice(COUNT, 5_000, replace=False)
    assert idmap.labels_of([ids[i] for i in probe]).tolist() == probe.tolist()
    assert idmap.ids_of(probe) == [ids[i] for i in probe]
    assert idmap.labels_of(["missing", "doc-1 ", "DOC-0"]).tolist() == [-1, -1, -1]

    gone = np.arange(0, COUNT, 3)
    idmap.remove_labels(np.concatenate([gone, gone[:10], [-1, COUNT + 5]]))  # repeats, -1, unknown: ignored
    assert len(idmap) == COUNT - gone.size and idmap.next_label == COUNT
    labels = idmap.labels_of(ids)
    assert (labels[gone] == -1).all() and (np.delete(labels, gone) == np.delete(np.arange(COUNT), gone)).all()
    assert idmap.ids_of(np.array([0, 1, -1, COUNT])) == ["", ids[1], "", ""]
    assert np.array_equal(idmap.live_labels(), np.delete(np.arange(COUNT), gone))
    assert np.array_equal(idmap.dead_labels(), gone)

    loaded = IdMap.from_bytes(idmap.to_bytes())
    assert len(loaded) == len(idmap) and loaded.next_label == COUNT
    assert np.array_equal(loaded.labels_of(ids), labels)
    assert loaded.ids_of(np.arange(COUNT)) == idmap.ids_of(np.arange(COUNT))
    # A re-added id gets a new label; its old one stays dead.
    assert loaded.add([ids[0]]).tolist() == [COUNT] and loaded.labels_of([ids[0]]).tolist() == [COUNT]


def test_upsert_retires_old_labels_and_copy_is_independent():
    idmap = IdMap()
    idmap.add(["a", "b", "c"])
    clone = idmap.copy()
    new, replaced = idmap.upsert(["b", "d"])
    assert new.tolist() == [3, 4] and replaced.tolist() == [1]
    assert idmap.labels_of(["a", "b", "c", "d"]).tolist() == [0, 3, 2, 4] and len(idmap) == 4
    assert clone.labels_of(["b", "d"]).tolist() == [1, -1] and len(clone) == 3


def test_compacted_relabels_live_ids_in_order():
    idmap = IdMap()
    idmap.add(["zero", "one", "двa", "three", "four"])
    idmap.remove_labels(np.array([1, 3]))
    compact = idmap.compacted()
    assert compact.next_label == 3 and len(compact) == 3
    assert compact.ids_of(np.arange(3)) == ["zero", "двa", "four"]
    assert compact.labels_of(["four", "one", "двa"]).tolist() == [2, -1, 1]


def test_bad_ids_are_refused_with_their_position():
    idmap = IdMap()
    idmap.add(["x"])
    with pytest.raises(AnnInputError, match=r"ids\[1\] must be a non-empty string, got ''"):
        idmap.add(["y", ""])
    with pytest.raises(AnnInputError, match=r"ids\[0\] must be a non-empty string, got 3"):
        idmap.add([3])
    with pytest.raises(AnnInputError, match="'z' appears more than once"):
        idmap.upsert(["z", "w", "z"])
    with pytest.raises(AnnInputError, match=r"ids\[1\]: 'x' is already in the map"):
        idmap.add(["v", "x"])
    assert len(idmap) == 1, "a refused call changes nothing"
    with pytest.raises(ValueError, match="bad magic"):
        IdMap.from_bytes(b"not an idmap at all")


def test_hash_is_stable_and_little_endian_blake2b():
    import hashlib

    want = int.from_bytes(hashlib.blake2b("café".encode(), digest_size=8).digest(), "little")
    assert hash_ids(["café".encode()]).tolist() == [want]


def test_hash_collisions_are_resolved_by_comparing_the_ids(monkeypatch):
    """Force collisions (only 251 distinct hash values): every answer must still be exact."""
    real = idmap_module.hash_ids
    monkeypatch.setattr(idmap_module, "hash_ids", lambda encoded: real(encoded) % np.uint64(251))
    ids = many_ids(3_000)
    idmap = IdMap()
    idmap.add(ids[:2_000])
    new, replaced = idmap.upsert(ids[1_500:])  # 500 of them collide with live ids *and* are live
    assert replaced.tolist() == list(range(1_500, 2_000)) and new[0] == 2_000
    want = np.concatenate([np.arange(1_500), np.arange(2_000, 3_500)])
    assert np.array_equal(idmap.labels_of(ids), want)
    with pytest.raises(AnnInputError, match="appears more than once"):
        idmap.add(["fresh", "other", "fresh"])
    idmap.remove_labels(np.arange(0, 3_500, 2))
    labels = idmap.labels_of(ids)
    assert np.array_equal(labels, np.where(want % 2 == 1, want, -1))
    loaded = IdMap.from_bytes(idmap.to_bytes())
    assert np.array_equal(loaded.labels_of(ids), labels)
    assert np.array_equal(idmap.compacted().labels_of(ids) >= 0, labels >= 0)
