"""The sharded index service's routing rules without Ray: ids to shards, excluded ids split and
joined back, shard top-k lists merged as the ingress merges them; the app's deployments and arguments."""

from __future__ import annotations

import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.merge import merge_topk
from whetstone.index.snapshot import shard_of

from services.index.routing import (
    gather_vectors,
    group_by_shard,
    join_excluded_scores,
    split_excludes,
)

DIM = 8


def test_group_by_shard_covers_every_id_once_in_its_shard():
    ids = [f"doc-{i}" for i in range(200)]
    groups = group_by_shard(ids, 3)
    assert sorted(groups) == [0, 1, 2]
    positions = np.sort(np.concatenate(list(groups.values())))
    np.testing.assert_array_equal(positions, np.arange(200))
    shards = shard_of(ids, 3)
    for shard, where in groups.items():
        assert (shards[where] == shard).all()
        assert list(where) == sorted(where), "positions keep the caller's order within a shard"
    assert group_by_shard([], 3) == {}
    assert list(group_by_shard(["only"], 4)) == [int(shard_of(["only"], 4)[0])]


def test_split_and_join_excludes_round_trip_in_the_callers_order():
    excludes = [[f"x{i}" for i in range(7)], [], ["x3", "y1"]]
    split = split_excludes(excludes, 3, 3)
    shards = shard_of([doc for row in excludes for doc in row], 3).tolist()
    flat_shard = iter(shards)
    for q, row in enumerate(excludes):
        for doc in row:
            shard = next(flat_shard)
            assert doc in split.per_shard[shard][q]
            assert all(doc not in (split.per_shard[s] or [[]] * 3)[q] for s in range(3) if s != shard)
    # Each shard scores the ids it was given; joined, every id gets its own shard's score back.
    answers = [None if rows is None else [[f"{doc}@{s}" for doc in row] for row in rows]
               for s, rows in enumerate(split.per_shard)]
    joined = join_excluded_scores(split, answers)
    flat_shard = iter(shards)
    assert joined == [[f"{doc}@{next(flat_shard)}" for doc in row] for row in excludes]
    nothing = split_excludes(None, 2, 3)
    assert nothing.per_shard == [None, None, None] and join_excluded_scores(nothing, [None] * 3) == [[], []]
    assert split_excludes([[], []], 2, 3).per_shard == [None, None, None]


def test_merged_shard_topk_equals_one_flat_index():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((300, DIM)).astype(np.float32)
    ids = [f"d{i}" for i in range(300)]
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    whole = AnnIndex.build(docs, ids, AnnConfig(kind="flat"))
    want_ids, want_scores = whole.search(queries, 10)
    shards = shard_of(ids, 3)
    per_ids, per_scores = [], []
    for shard in range(3):
        rows = np.flatnonzero(shards == shard)
        part = AnnIndex.build(docs[rows], [ids[i] for i in rows], AnnConfig(kind="flat"))
        got_ids, got_scores = part.search(queries, 10)
        per_ids.append(got_ids)
        per_scores.append(got_scores)
    merged_ids, merged_scores = merge_topk(list(zip(per_ids, per_scores, strict=True)), 10)
    assert merged_ids == want_ids
    np.testing.assert_allclose(merged_scores, want_scores, atol=1e-6)
    assert merged_scores.dtype == np.float32 and merged_scores.shape == (5, 10)


def test_gather_vectors_restores_the_callers_order():
    ids = [f"v{i}" for i in range(10)]
    groups = group_by_shard(ids, 3)
    answers = {s: np.full((len(p), 2), float(s), np.float32) + p[:, None] for s, p in groups.items()}
    out = gather_vectors(groups, answers, 10, 2)
    shards = shard_of(ids, 3)
    np.testing.assert_array_equal(out[:, 0], shards + np.arange(10))


def test_args_accept_the_old_replicas_name_and_build_one_deployment_per_shard():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.index.app import IndexServiceArgs, build_app

    assert IndexServiceArgs(index_uri="x", num_replicas=3).replicas_per_shard == 3
    assert IndexServiceArgs(index_uri="x", replicas_per_shard=2).num_replicas == 2
    with pytest.raises(ValueError, match="give one"):
        IndexServiceArgs(index_uri="x", num_replicas=3, replicas_per_shard=2)
    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"index_uri": "/tmp/x", "num_shards": "3", "replicas_per_shard": "2", "use_gpu": "true",
                    "gpus_per_replica": "0.5", "router_replicas": "2"})
    router = app._bound_deployment
    assert router.name == "IndexService" and router.num_replicas == 2
    shards = router.init_args[1]
    assert [s._bound_deployment.name for s in shards] == [f"IndexService-shard-{s}" for s in range(3)]
    for number, shard in enumerate(shards):
        deployment = shard._bound_deployment
        assert deployment.num_replicas == 2 and deployment.init_args[1] == number
        assert deployment.ray_actor_options["num_gpus"] == 0.5
    assert "num_gpus" not in router.ray_actor_options
