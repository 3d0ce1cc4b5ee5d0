"""Index service parts without Ray: config, grouping of batched requests, swaps and mutations."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.shard_io import save_shard
from whetstone.index.snapshot import (
    SnapshotError,
    SnapshotNotFound,
    publish_manifest,
    read_manifest,
    set_latest_version,
    set_slot_version,
    set_staged_version,
    shard_of,
)
from whetstone.index.wire import SearchRequest, UpsertRequest

from services.index.replica import SearchCoalescer, StatsRecorder, search_grouped
from services.index.routing import slot_holding
from services.index.shard_state import ShardHolder
from services.index.swap import target_set

REPO = Path(__file__).resolve().parents[2]
DIM = 16


def publish_sharded(root: str, version: int, vectors: np.ndarray, ids: list[str], num_shards: int,
                    config: AnnConfig | None = None, checkpoint: str = "c", set_latest: bool = True):
    """Build ``num_shards`` indexes (documents by ``shard_of``) and publish them as ``version``."""
    config = config or AnnConfig()
    shards = shard_of(ids, num_shards)
    entries = []
    for shard in range(num_shards):
        rows = np.flatnonzero(shards == shard)
        index = AnnIndex.build(vectors[rows], [ids[i] for i in rows], config)
        entries.append(save_shard(index, root, version, shard))
    return publish_manifest(root, version, entries, checkpoint=checkpoint, dim=vectors.shape[1], kind=config.kind,
                            config=config.model_dump(mode="json"), set_latest=set_latest)


def version_vectors(version: int, count: int = 60) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(version)
    return rng.standard_normal((count, DIM)).astype(np.float32), [f"v{version}-{i}" for i in range(count)]


def make_root(tmp_path, versions=(1, 2), num_shards: int = 2) -> str:
    root = str(tmp_path / "index")
    for version in versions:
        publish_sharded(root, version, *version_vectors(version), num_shards)
    return root


def test_serve_config_args_validate():
    from services.index.app import IndexServiceArgs

    config = yaml.safe_load((REPO / "services/index/serve_config.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "services.index.app:build_app" and app["route_prefix"] == "/index"
    args = IndexServiceArgs.model_validate(app["args"])
    assert args.index_uri and args.auth_token is None
    with pytest.raises(ValueError, match="index_ur"):
        IndexServiceArgs.model_validate({**app["args"], "index_ur": "x"})


def test_token_falls_back_to_environment(monkeypatch):
    from services.index.app import IndexServiceArgs, resolve_token

    monkeypatch.delenv("WHETSTONE_INDEX_TOKEN", raising=False)
    assert resolve_token(IndexServiceArgs(index_uri="x")) is None
    monkeypatch.setenv("WHETSTONE_INDEX_TOKEN", "env-token")
    assert resolve_token(IndexServiceArgs(index_uri="x")) == "env-token"
    assert resolve_token(IndexServiceArgs(index_uri="x", auth_token="cfg")) == "cfg"


def test_schemas_reject_bad_requests():
    with pytest.raises(ValueError, match="exactly one"):
        SearchRequest(k=3)
    with pytest.raises(ValueError, match="finite"):
        SearchRequest(vectors=[[float("nan")]], k=1)
    with pytest.raises(ValueError, match="2 lists for 1 queries"):
        SearchRequest(vectors=[[0.1]], k=1, exclude_ids=[[], []])
    with pytest.raises(ValueError, match="2 ids for 1 rows"):
        UpsertRequest(ids=["a", "b"], vectors=[[0.1]])


def test_grouped_batch_equals_separate_searches_and_keeps_versions_apart(tmp_path):
    root = make_root(tmp_path)
    holder = ShardHolder(root, None, shard=1, num_shards=2)
    assert holder.follow() == [2] and holder.latest == 2
    new = holder.get(2)
    old = holder.stage(1)
    rng = np.random.default_rng(9)
    items = [(old, rng.standard_normal((2, DIM)).astype(np.float32), 3, None),
             (new, rng.standard_normal((1, DIM)).astype(np.float32), 5, [["v2-0"]]),
             (old, rng.standard_normal((3, DIM)).astype(np.float32), 1, [["v1-1"], [], ["v1-2", "v1-3"]])]
    results = search_grouped(items)
    for (held, vectors, k, excludes), (version, ids, scores, extra) in zip(items, results, strict=True):
        assert extra is None  # excluded ids' scores only when asked
        want_ids, want_scores = held.index.search(vectors, k, exclude_ids=excludes)
        assert version == held.version and ids == want_ids and scores.shape == (len(vectors), k)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)
        assert all(doc.startswith(f"v{version}-") for row in ids for doc in row)
        assert set(shard_of([d for row in ids for d in row if d], 2)) <= {1}, "only this shard's documents"


def test_excluded_ids_scores_come_from_the_stored_vectors(tmp_path):
    root = make_root(tmp_path, num_shards=1)
    holder = ShardHolder(root, None, shard=0, num_shards=1)
    holder.follow()
    held = holder.get(2)
    queries = np.random.default_rng(4).standard_normal((2, DIM)).astype(np.float32)
    excludes = [["v2-1", "nope"], []]
    ((version, ids, _, extra),) = search_grouped([(held, queries, 4, excludes, True)])
    stored = held.index.vectors_for(["v2-1"])[0]
    assert extra[0][1] is None and extra[1] == []  # unknown id: no score, not an error
    unit = queries[0] / np.linalg.norm(queries[0])  # scored like search scores (cosine)
    np.testing.assert_allclose(extra[0][0], float(stored @ unit), atol=1e-5)
    assert "v2-1" not in ids[0]


def test_holder_follows_latest_and_staged_and_drops_after_the_grace(tmp_path):
    root = make_root(tmp_path, versions=(1, 2, 3))
    set_latest_version(root, 1)
    holder = ShardHolder(root, None, shard=0, num_shards=2, grace_s=0.3, keep_s=0.3)
    assert holder.follow() == [1]
    set_staged_version(root, 2)  # phase 1: held beside LATEST
    assert holder.follow() == [1, 2] and holder.latest == 1
    set_latest_version(root, 2)  # the flip; the previous LATEST stays for the grace
    set_staged_version(root, None)
    assert holder.follow() == [1, 2] and holder.latest == 2
    time.sleep(0.4)
    assert holder.follow() == [2]
    assert holder.stage(3).version == 3 and holder.versions() == [2, 3]  # asked directly: kept keep_s
    time.sleep(0.4)
    assert holder.follow() == [2], "a staged version nothing names any more is dropped"
    with pytest.raises(SnapshotNotFound, match="no snapshot v9"):
        holder.stage(9)
    with pytest.raises(SnapshotError, match="num_shards=3"):
        ShardHolder(root, None, shard=0, num_shards=3).follow()
    assert holder.versions() == [2], "a failed load leaves what is held alone"


def test_blue_green_sets_hold_only_their_slots_version(tmp_path):
    """swap_mode=blue_green: each replica set holds what its SLOT file names (set 0 serves LATEST
    until a swap names either), never STAGED beside it; a set moved to a mutation's version keeps
    LATEST until the flip."""
    root = make_root(tmp_path, versions=(1, 2, 3))
    set_latest_version(root, 1)
    blue, green = (ShardHolder(root, None, shard=0, num_shards=2, grace_s=0.3, slot=slot) for slot in (0, 1))
    assert (blue.follow(), green.follow()) == ([1], [])
    set_staged_version(root, 2)
    set_slot_version(root, 0, 1)
    set_slot_version(root, 1, 2)  # phase 1 of a swap into the idle set
    assert (blue.follow(), green.follow()) == ([1], [2]) and green.latest == 2
    set_latest_version(root, 2)
    set_slot_version(root, 0, None)  # the flip releases the old set: it drops v1 after the grace
    assert blue.follow() == [1] and blue.latest is None
    time.sleep(0.4)
    assert (blue.follow(), green.follow()) == ([], [2])
    set_slot_version(root, 1, 3)  # a mutation moves the serving set first: LATEST stays held
    assert green.follow() == [2, 3] and green.latest == 3
    set_latest_version(root, 3)
    assert green.follow() == [2, 3]  # the flip: v2 for the grace
    time.sleep(0.4)
    assert green.follow() == [3]
    assert slot_holding(SimpleNamespace(index_uri=root, storage=None), 3, 2) == 1
    assert slot_holding(SimpleNamespace(index_uri=root, storage=None), 2, 2) is None
    assert [target_set(2, current, in_place) for current, in_place in ((0, False), (1, False), (1, True), (None, False))] \
        == [1, 0, 1, 0]
    # a set that takes a swap while it still holds its old version (in the grace) drops it first
    set_slot_version(root, 0, 1)
    assert blue.follow() == [1]
    set_slot_version(root, 0, None)
    assert blue.follow() == [1], "released: kept for the grace"
    set_slot_version(root, 0, 2)
    assert blue.stage(2).version == 2 and blue.versions() == [2], "never two versions to load a third"


def test_holder_reuses_an_unchanged_shard_and_mutates_only_its_own(tmp_path):
    root = make_root(tmp_path, versions=(1,))
    holders = [ShardHolder(root, None, shard=s, num_shards=2) for s in range(2)]
    for holder in holders:
        holder.follow()
    new_id = next(f"new-{i}" for i in range(100) if shard_of([f"new-{i}"], 2)[0] == 0)
    result = holders[0].mutate(1, 2, "upsert", [new_id], np.ones((1, DIM), np.float32))
    base = read_manifest(root, 1)
    assert result["changed"] == 1 and result["entry"].prefix == "v2/shard-0000"
    assert result["count"] == base.shards[0].count + 1 and holders[0].versions() == [1, 2]
    publish_manifest(root, 2, [result["entry"], base.shards[1]], checkpoint="c", dim=DIM, kind="flat",
                     config=base.config)
    # Shard 1 was not touched: v2 names its v1 files, and the replica reuses the object it holds.
    assert holders[1].stage(2).index is holders[1].get(1).index
    assert new_id in holders[0].get(2).index and new_id not in holders[0].get(1).index
    unchanged = holders[0].mutate(2, 3, "delete", ["not-there"], None)
    assert unchanged["changed"] == 0 and unchanged["entry"].prefix == "v2/shard-0000"
    deleted = holders[0].mutate(2, 3, "delete", [new_id, "not-there"], None)
    assert deleted["changed"] == 1 and deleted["count"] == base.shards[0].count


def test_stats_recorder_percentiles_and_metrics():
    from services.index.metrics import IndexMetrics

    recorder = StatsRecorder(IndexMetrics())  # Ray's metrics record outside a replica too (no Serve labels)
    for latency in range(1, 101):
        recorder.searched(2, float(latency))
    recorder.error("/index/search", 422)
    summary = recorder.summary()
    assert summary["requests_total"] == 100 and summary["queries_total"] == 200 and summary["errors_total"] == 1
    assert summary["latency_ms_p50"] == pytest.approx(50.5) and summary["latency_ms_p99"] == pytest.approx(99.01)
    recorder.batched(3, 0.010)
    recorder.batched(1, 0.030)
    summary = recorder.summary()
    assert summary["faiss_calls_total"] == 2 and summary["requests_per_faiss_call"] == 2.0
    assert summary["faiss_ms_p50"] == pytest.approx(20.0)
    recorder.served(None, 0)
    recorder.served(7, 123)
    assert StatsRecorder().summary()["requests_total"] == 0  # without metrics: the counts only


def test_typed_app_builder_validates_key_value_args():
    """What `serve run services.index.app:build_app index_uri=... num_replicas=2` does."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.index.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"index_uri": "/tmp/x", "num_replicas": "2"})
    router = app._bound_deployment
    assert router.name == "IndexService" and router.num_replicas == 1
    (shard,) = router.init_args[1]  # one shard by default, num_replicas (old name) replicas of it
    assert shard._bound_deployment.name == "IndexService-shard-0" and shard._bound_deployment.num_replicas == 2
    with pytest.raises(ValueError, match="max_k"):
        call_user_app_builder_with_args_if_necessary(build_app, {"index_uri": "/tmp/x", "max_k": 0})
    # Three shard deployments, each replica asking for the custom resource of the shard worker group.
    app = call_user_app_builder_with_args_if_necessary(
        build_app, {"index_uri": "/tmp/x", "num_shards": "3", "shard_custom_resources": {"index": 1}})
    shards = [bound._bound_deployment for bound in app._bound_deployment.init_args[1]]
    assert [d.name for d in shards] == [f"IndexService-shard-{s}" for s in range(3)]
    assert all(d.ray_actor_options["resources"] == {"index": 1.0} for d in shards)
    assert "resources" not in app._bound_deployment.ray_actor_options  # the ingress holds no shard


def test_app_builder_takes_the_shard_count_of_the_published_snapshot(tmp_path):
    """`serve run ... index_uri=<root>` with no num_shards serves the published version's shards;
    an explicit num_shards is kept (the replicas then refuse a snapshot that disagrees)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.index.app import build_app

    def shard_count(args: dict) -> int:
        return len(call_user_app_builder_with_args_if_necessary(build_app, args)._bound_deployment.init_args[1])

    root = str(tmp_path / "index")
    assert shard_count({"index_uri": root}) == 1  # nothing published yet
    make_root(tmp_path, versions=(1,), num_shards=3)
    assert shard_count({"index_uri": root}) == 3
    assert shard_count({"index_uri": root, "num_shards": "2"}) == 2


def test_start_serve_retries_while_a_shutting_down_serve_is_in_the_way(monkeypatch):
    from ray.exceptions import ActorDiedError

    from services.index import app

    calls: list[dict] = []

    def start(http_options: dict) -> None:
        calls.append(http_options)
        if len(calls) < 3:
            raise ActorDiedError()

    monkeypatch.setattr(app.serve, "start", start)
    monkeypatch.setattr(app.time, "sleep", lambda seconds: None)
    app.start_serve("127.0.0.1", 8123)
    assert calls == [{"host": "127.0.0.1", "port": 8123}] * 3

    def always_dying(http_options: dict) -> None:
        calls.append(http_options)
        raise ActorDiedError()

    calls.clear()
    monkeypatch.setattr(app.serve, "start", always_dying)
    with pytest.raises(ActorDiedError):  # four failures: give up
        app.start_serve("127.0.0.1", 8123)
    assert len(calls) == 4


def test_coalescer_merges_what_queues_behind_a_running_call():
    import asyncio
    import threading

    release = threading.Event()
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        if items == ["a"]:
            assert release.wait(10)
        return [item.upper() for item in items]

    async def scenario():
        coalescer = SearchCoalescer(run, max_requests=3)
        first = coalescer.submit(["a"])
        await asyncio.sleep(0.05)  # "a" is running; these queue behind it
        queued = [coalescer.submit([x]) for x in ("b", "c", "d", "e")]
        queued[1][0].cancel()  # a caller that gave up is skipped, not searched
        release.set()
        results = await asyncio.gather(*first, *(f[0] for i, f in enumerate(queued) if i != 1))
        coalescer.shutdown()
        return results

    assert asyncio.run(scenario()) == ["A", "B", "D", "E"]
    assert calls == [["a"], ["b", "d"], ["e"]]  # max_requests=3 were taken (one cancelled), then the rest


def test_coalescer_runs_calls_in_parallel_with_faiss_threads_set_in_the_search_thread():
    import asyncio
    import threading

    import faiss

    barrier = threading.Barrier(2, timeout=10)

    def run(items: list[int]) -> list[tuple[int, int]]:
        barrier.wait()  # both calls must be running at once to pass
        return [(item, faiss.omp_get_max_threads()) for item in items]

    def failing(items):
        raise ValueError("bad batch")

    async def scenario():
        coalescer = SearchCoalescer(run, max_requests=1, threads=1, workers=2)
        results = await asyncio.gather(*coalescer.submit([1, 2]))
        coalescer.shutdown()
        broken = SearchCoalescer(failing, max_requests=8)
        outcomes = await asyncio.gather(*broken.submit([1, 2]), return_exceptions=True)
        broken.shutdown()
        return results, outcomes

    results, outcomes = asyncio.run(scenario())
    assert results == [(1, 1), (2, 1)]
    assert [str(o) for o in outcomes] == ["bad batch", "bad batch"]
