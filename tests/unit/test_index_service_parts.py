"""Index service parts without Ray: config, grouping of batched requests, swaps and mutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from whetstone.index.ann import AnnConfig, AnnIndex, SnapshotNotFound, latest_version
from whetstone.index.wire import SearchRequest, UpsertRequest

from services.index.replica import SearchCoalescer, SnapshotHolder, StatsRecorder, search_grouped

REPO = Path(__file__).resolve().parents[2]
DIM = 16


def make_root(tmp_path, versions=(1, 2)) -> str:
    root = str(tmp_path / "index")
    for version in versions:
        rng = np.random.default_rng(version)
        ids = [f"v{version}-{i}" for i in range(50)]
        AnnIndex.build(rng.standard_normal((50, DIM)).astype(np.float32), ids, AnnConfig()).save(root, version, "c")
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
    holder = SnapshotHolder(root, None)
    holder.load_latest_if_newer()
    old = holder.current
    holder.swap_to(1)
    new = holder.current
    assert (old.version, new.version, latest_version(root)) == (2, 1, 1)
    rng = np.random.default_rng(9)
    items = [(old, rng.standard_normal((2, DIM)).astype(np.float32), 3, None),
             (new, rng.standard_normal((1, DIM)).astype(np.float32), 5, [["v1-0"]]),
             (old, rng.standard_normal((3, DIM)).astype(np.float32), 1, [["v2-1"], [], ["v2-2", "v2-3"]])]
    results = search_grouped(items)
    for (snapshot, vectors, k, excludes), (version, ids, scores, extra) in zip(items, results, strict=True):
        assert extra is None  # excluded ids' scores only when asked
        want_ids, want_scores = snapshot.index.search(vectors, k, exclude_ids=excludes)
        assert version == snapshot.version and ids == want_ids and scores.shape == (len(vectors), k)
        np.testing.assert_allclose(scores, want_scores, atol=1e-6)
        assert all(doc.startswith(f"v{version}-") for row in ids for doc in row)


def test_excluded_ids_scores_come_from_the_stored_vectors(tmp_path):
    root = make_root(tmp_path)
    holder = SnapshotHolder(root, None)
    holder.load_latest_if_newer()
    snapshot = holder.current
    queries = np.random.default_rng(4).standard_normal((2, DIM)).astype(np.float32)
    excludes = [["v2-1", "nope"], []]
    ((version, ids, _, extra),) = search_grouped([(snapshot, queries, 4, excludes, True)])
    stored = snapshot.index.vectors_for(["v2-1"])[0]
    assert extra[0][1] is None and extra[1] == []  # unknown id: no score, not an error
    unit = queries[0] / np.linalg.norm(queries[0])  # scored like search scores (cosine)
    np.testing.assert_allclose(extra[0][0], float(stored @ unit), atol=1e-5)
    assert "v2-1" not in ids[0]


def test_mutations_publish_versions_and_start_from_latest(tmp_path):
    root = make_root(tmp_path)
    holder, other = SnapshotHolder(root, None), SnapshotHolder(root, None)
    holder.load_latest_if_newer()
    other.load_latest_if_newer()
    vector = np.ones((1, DIM), np.float32)
    assert holder.mutate("upsert", ["new"], vector) == {"version": 3, "previous_version": 2, "changed": 1,
                                                        "size": 51}
    # `other` is still at v2 locally; its mutation must build on v3 (no lost update).
    result = other.mutate("delete", ["v2-0", "missing"], None)
    assert result["version"] == 4 and result["previous_version"] == 3 and result["size"] == 50
    assert "new" in other.current.index and "v2-0" not in other.current.index
    assert other.mutate("delete", ["missing"], None)["changed"] == 0 and latest_version(root) == 4
    with pytest.raises(SnapshotNotFound, match="no snapshot v9"):
        holder.swap_to(9)
    assert holder.version == 3, "a failed swap leaves the serving version alone"


def test_stats_recorder_percentiles_and_prometheus():
    recorder = StatsRecorder("r1")
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
    body, _ = recorder.prometheus(7, 123)
    assert b'whetstone_index_version{replica="r1"} 7.0' in body and b'status="422"' in body
    assert b"whetstone_index_batch_requests_sum 4.0" in body


def test_typed_app_builder_validates_key_value_args():
    """What `serve run services.index.app:build_app index_uri=... num_replicas=2` does."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from services.index.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"index_uri": "/tmp/x", "num_replicas": "2"})
    deployment = app._bound_deployment
    assert deployment.name == "IndexService" and deployment.num_replicas == 2
    with pytest.raises(ValueError, match="max_k"):
        call_user_app_builder_with_args_if_necessary(build_app, {"index_uri": "/tmp/x", "max_k": 0})


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
