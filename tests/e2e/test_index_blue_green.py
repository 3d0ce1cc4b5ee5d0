"""The index service with ``swap_mode=blue_green`` over real HTTP on loopback, on a local Ray.

Two shard deployments per shard (``IndexService-shard-{s}`` and ``-b``), one replica each. A swap
loads the new version into the idle set and flips, so no shard process ever holds two versions
(the bound a large shard needs: docs/scale.md); a mutation stays in the serving set; a killed
serving replica comes back at the version its set's SLOT file names.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig
from whetstone.index.snapshot import latest_version, set_latest_version, slot_version, staged_version
from whetstone.index.wire import ErrorCode

from tests.e2e.test_index_service import search_until_503, searching, serve_root_url, wait_for
from tests.unit.test_index_service_parts import publish_sharded

pytestmark = pytest.mark.e2e

DIM = 12
DOCS = 200
SHARDS = 2
TOKEN = "blue-green-token"
APP = "whetstone-index-blue-green"
PREFIX = "/index-bg"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def version_docs(version: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(700 + version)
    return rng.standard_normal((DOCS, DIM)).astype(np.float32), [f"v{version}-doc-{i}" for i in range(DOCS)]


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    root = str(tmp_path_factory.mktemp("index-bg") / "index")
    for version in (1, 2, 3, 5):
        publish_sharded(root, version, *version_docs(version), SHARDS, AnnConfig(kind="flat"),
                        checkpoint="no-encoder", set_latest=version == 1)
    args = IndexServiceArgs(index_uri=root, auth_token=TOKEN, num_shards=SHARDS, replicas_per_shard=1,
                            swap_mode="blue_green", num_cpus=0.1, router_cpus=0.1, poll_interval_s=0.5,
                            shard_timeout_s=3.0, swap_timeout_s=60.0)
    deploy(args, name=APP, route_prefix=PREFIX)
    base = serve_root_url(ray_cluster) + PREFIX
    with httpx.Client(base_url=base, timeout=30) as http:
        wait_for(lambda: http.get("/stats").json()["version"] == 1, what="the service at v1")
        yield {"base": base, "http": http, "root": root}
    serve.delete(APP)


def held(stats: dict) -> dict[str, list[int]]:
    """Every shard replica of both sets: ``{"IndexService-shard-0-b[pid]": versions}``."""
    return {f"{shard['deployment']}[{r['pid']}]": r["versions"]
            for shard in stats["shards"] + stats["idle_shards"] for r in shard["replicas"]}


def swap(http, version: int) -> dict:
    response = http.post("/swap", json={"version": version}, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_swaps_load_the_idle_set_and_no_replica_ever_holds_two_versions(service):
    http, root = service["http"], service["root"]
    stats = http.get("/stats").json()
    assert stats["swap_mode"] == "blue_green" and len(stats["idle_shards"]) == SHARDS
    assert [s["deployment"] for s in stats["shards"]] == ["IndexService-shard-0", "IndexService-shard-1"]
    assert all(v == [1] for v in held({**stats, "idle_shards": []}).values())
    assert all(r["versions"] == [] for s in stats["idle_shards"] for r in s["replicas"]), "an idle set holds nothing"

    queries = np.random.default_rng(4).standard_normal((3, DIM)).tolist()
    stop, holdings = threading.Event(), []

    def watch():  # what every shard replica holds, sampled through the swaps
        with httpx.Client(base_url=service["base"], timeout=30) as client:
            while not stop.is_set():
                holdings.append(held(client.get("/stats").json()))
                time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with searching(service["base"], {"vectors": queries, "k": 6}) as (seen, failures):
            for version, serving in ((2, "-b"), (3, ""), (2, "-b")):
                assert swap(http, version)["version"] == version
                stats = http.get("/stats").json()
                assert stats["version"] == version
                assert [s["deployment"] for s in stats["shards"]] == [f"IndexService-shard-{s}{serving}"
                                                                      for s in (0, 1)]
                assert slot_version(root, 1 if serving else 0) == version
                assert slot_version(root, 0 if serving else 1) is None, "the old set is released after the flip"
                time.sleep(1.2)  # past the old set's grace: it drops the old version
            # a LATEST a job wrote without /swap: the ingress stages it into the idle set itself
            set_latest_version(root, 5)
            wait_for(lambda: seen and seen[-1][0] == 5, timeout_s=30, what="searches at v5")
            time.sleep(1.0)
    finally:
        stop.set()
        watcher.join()
    assert not failures, failures[:3]
    assert {v for v, _ in seen} == {1, 2, 3, 5}
    for version, ids in seen:
        assert {doc.split("-")[0] for row in ids for doc in row} == {f"v{version}"}, "one version per answer"
    assert len(holdings) > 20
    most = max(len(versions) for sample in holdings for versions in sample.values())
    assert most == 1, [s for s in holdings if max(map(len, s.values())) > 1][:2]
    assert slot_version(root, 0) == 5 and latest_version(root) == 5 and staged_version(root) is None
    wait_for(lambda: all(r["versions"] == [] for s in http.get("/stats").json()["idle_shards"]
                         for r in s["replicas"]), timeout_s=20, what="the idle set to drop v2")


def test_a_mutation_stays_in_the_serving_set_and_a_killed_replica_comes_back_at_it(service):
    http, root = service["http"], service["root"]
    before = http.get("/stats").json()
    serving = [s["deployment"] for s in before["shards"]]
    vector = np.full((1, DIM), 0.3, np.float32)
    r = http.post("/upsert", json={"ids": ["new-doc"], "vectors": vector.tolist()}, headers=AUTH)
    assert r.status_code == 200, r.text
    mutated = r.json()["version"]
    assert mutated > before["version"] and r.json()["changed"] == 1
    after = http.get("/stats").json()
    assert after["version"] == mutated and [s["deployment"] for s in after["shards"]] == serving
    assert slot_version(root, 0 if serving[0].endswith("shard-0") else 1) == mutated
    query = {"vectors": vector.tolist(), "k": 1}
    assert http.post("/search", json=query).json()["ids"] == [["new-doc"]]

    victim = after["shards"][1]["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    r = search_until_503(http, query)  # once the ingress notices (at most the shard timeout)
    assert r.json()["code"] == ErrorCode.SHARD_UNAVAILABLE.value
    assert f"shard 1 of 2 ({serving[1]})" in r.json()["detail"]

    def back():
        answer = http.post("/search", json=query)
        return answer.status_code == 200 and answer.json()

    answer = wait_for(back, timeout_s=120, interval_s=0.5, what="shard 1 back")
    assert answer["version"] == mutated and answer["ids"] == [["new-doc"]]
    replicas = wait_for(lambda: [r for r in http.get("/stats").json()["shards"][1]["replicas"]
                                 if r["pid"] != victim["pid"]], timeout_s=60, what="the new replica listed")
    assert replicas[0]["versions"] == [mutated], "the replacement loads what its set's SLOT file names"
