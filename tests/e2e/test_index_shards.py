"""The sharded index service over real HTTP on loopback (and its Serve handle), on a local Ray.

One application with 3 shard deployments (one replica each, so killing one takes its shard down)
serves versions whose document ids carry their version (``v2-doc-17``) and whose vectors differ,
so a response merging two versions would show in its ids.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex
from whetstone.index.build import build_sharded_index
from whetstone.index.client import IndexClient, IndexRequestError, IndexUnavailable
from whetstone.index.merge import merge_topk
from whetstone.index.shard_io import load_shard
from whetstone.index.snapshot import latest_version, read_manifest, shard_of, staged_version
from whetstone.index.vector_chunks import VectorChunkWriter
from whetstone.index.wire import ErrorCode

from tests.e2e.test_index_service import search_until_503, searching, serve_root_url, wait_for
from tests.unit.test_index_service_parts import publish_sharded

pytestmark = pytest.mark.e2e

DIM = 16
DOCS = 300
SHARDS = 3
TOKEN = "shard-token"
APP = "whetstone-index-shards"
PREFIX = "/index-shards"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IVF_SHARED = AnnConfig(kind="ivf", nlist=6, nprobe=2)


def version_docs(version: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(500 + version)
    return rng.standard_normal((DOCS, DIM)).astype(np.float32), [f"v{version}-doc-{i}" for i in range(DOCS)]


@pytest.fixture(scope="module")
def index_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("index-shards") / "index")
    for version in (1, 2, 3):
        publish_sharded(root, version, *version_docs(version), SHARDS, AnnConfig(kind="flat"),
                        checkpoint="no-encoder", set_latest=version == 1)
    # The same documents as v3, as IVF (no full vectors), and a 2-shard snapshot that cannot be served here.
    publish_sharded(root, 7, *version_docs(3), SHARDS, AnnConfig(kind="ivf", nlist=4), set_latest=False)
    publish_sharded(root, 8, *version_docs(3), 2, AnnConfig(kind="flat"), set_latest=False)
    # v9: IVF built the system's way (from vector chunks, trained once for every shard).
    vectors, ids = version_docs(9)
    with VectorChunkWriter(f"{root}/vectors/v9", DIM, rows_per_chunk=128) as writer:
        writer.write(ids, vectors)
    build_sharded_index(f"{root}/vectors/v9", root, 9, SHARDS, IVF_SHARED, "no-encoder")
    return root


@pytest.fixture(scope="module")
def service(ray_cluster, index_root):
    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    root_url = serve_root_url(ray_cluster)
    args = IndexServiceArgs(index_uri=index_root, auth_token=TOKEN, num_shards=SHARDS, replicas_per_shard=1,
                            num_cpus=0.1, router_cpus=0.1, poll_interval_s=0.5, shard_timeout_s=3.0,
                            swap_timeout_s=60.0, max_k=50)
    deploy(args, name=APP, route_prefix=PREFIX)
    base = root_url + PREFIX
    with httpx.Client(base_url=base, timeout=30) as http:
        wait_for(lambda: all(s["available"] and s["replicas"] for s in http.get("/stats").json()["shards"]),
                 what="every shard reports")
        yield {"base": base, "http": http, "root": index_root}
    serve.delete(APP)


def swap(service, version: int) -> dict:
    response = service["http"].post("/swap", json={"version": version}, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def shard_replicas(service) -> list[list[dict]]:
    return [shard["replicas"] for shard in service["http"].get("/stats").json()["shards"]]


def test_sharded_flat_equals_one_unsharded_flat_index(service):
    swap(service, 1)
    docs, ids = version_docs(1)
    whole = AnnIndex.build(docs, ids, AnnConfig(kind="flat"))  # in process, unsharded
    queries = np.random.default_rng(7).standard_normal((6, DIM)).astype(np.float32)
    excluded = [[ids[0], ids[5], ids[9]]] * 6
    want_ids, want_scores = whole.search(queries, 12, exclude_ids=excluded)
    want_excluded = whole.scores_for(queries, excluded)
    assert len(set(shard_of(excluded[0], SHARDS).tolist())) > 1, "excluded ids live in several shards"
    body = service["http"].post("/search", json={"vectors": queries.tolist(), "k": 12, "exclude_ids": excluded,
                                                 "score_excluded": True}).json()
    assert body["version"] == 1 and body["ids"] == want_ids
    np.testing.assert_allclose(body["scores"], want_scores, atol=1e-6)
    np.testing.assert_allclose(body["excluded_scores"], want_excluded, atol=1e-6)
    # Results come from every shard (the merge is doing something).
    assert set(shard_of([d for row in body["ids"] for d in row], SHARDS).tolist()) == set(range(SHARDS))

    client = IndexClient.from_handle(app_name=APP, timeout_s=30)
    result = client.search(queries, 12, exclude_ids=excluded, score_excluded=True)
    assert result.version == 1 and result.ids == want_ids
    np.testing.assert_allclose(result.scores, want_scores, atol=1e-6)
    np.testing.assert_allclose(result.excluded_scores, want_excluded, atol=1e-6)
    # Stored vectors gathered from their shards, in the order asked.
    asked = [ids[17], ids[3], ids[250], ids[3]]
    version, stored = client.vectors(asked)
    assert version == 1
    np.testing.assert_allclose(stored, whole.vectors_for(asked), atol=1e-6)
    with pytest.raises(IndexRequestError, match="not in the index"):
        client.vectors(["no-such-doc"])
    # k beyond a shard's documents: padded like the unsharded index.
    big = service["http"].post("/search", json={"vectors": queries[:1].tolist(), "k": 50}).json()
    assert big["ids"] == whole.search(queries[:1], 50)[0]


def test_stats_name_every_shard_replica_and_its_versions(service):
    stats = service["http"].get("/stats").json()
    assert stats["num_shards"] == SHARDS and stats["size"] == DOCS and stats["kind"] == "flat"
    assert [s["deployment"] for s in stats["shards"]] == [f"IndexService-shard-{s}" for s in range(SHARDS)]
    assert sum(s["count"] for s in stats["shards"]) == DOCS
    for shard in stats["shards"]:
        (replica,) = shard["replicas"]
        assert replica["shard"] == shard["shard"] and replica["pid"] > 0
        assert stats["version"] in replica["versions"] and replica["size"] == shard["count"]
    assert stats["replicas"][0]["version"] == stats["version"]  # the ingress replica
    # FAISS runs in the shards: the ingress adds up their calls (the previous test searched).
    assert stats["faiss_calls_total"] >= SHARDS and stats["faiss_ms_p50"] > 0
    assert all(r["faiss_calls_total"] >= 1 for s in stats["shards"] for r in s["replicas"])


def test_concurrent_swaps_and_searches_never_merge_two_versions(service):
    swap(service, 1)
    queries = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    stop = threading.Event()
    seen: list[tuple[int, list]] = []
    failures: list[str] = []

    def over_http():
        with httpx.Client(base_url=service["base"], timeout=30) as http:
            while not stop.is_set():
                r = http.post("/search", json={"vectors": queries.tolist(), "k": 8})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                seen.append((r.json()["version"], r.json()["ids"]))

    def over_handle():
        client = IndexClient.from_handle(app_name=APP, timeout_s=30, retry_after_s=0)
        while not stop.is_set():
            try:
                result = client.search(queries, 8)
            except (IndexUnavailable, IndexRequestError) as err:
                failures.append(repr(err))
                continue
            seen.append((result.version, result.ids))

    threads = [threading.Thread(target=over_http) for _ in range(3)] + [threading.Thread(target=over_handle)]
    for thread in threads:
        thread.start()
    try:
        for version in (2, 3, 1, 3, 2):
            time.sleep(0.3)
            assert swap(service, version)["version"] == version
        time.sleep(1.5)  # searches continue while replicas drop the versions they no longer need
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert len(seen) > 30
    for version, ids in seen:
        prefixes = {doc.split("-")[0] for row in ids for doc in row}
        assert prefixes == {f"v{version}"}, f"a response of v{version} holds ids of {prefixes}"
    assert {v for v, _ in seen} >= {1, 2, 3}, "searches saw every swapped-in version"
    assert latest_version(service["root"]) == 2 and staged_version(service["root"]) is None
    # Once the grace is over every shard replica holds only the served version.
    wait_for(lambda: all(r["versions"] == [2] for rs in shard_replicas(service) for r in rs),
             timeout_s=20, what="replicas dropping the old versions")


def test_a_latest_written_without_a_swap_is_followed_without_failed_searches(service, ray_cluster):
    """A job that publishes with set_latest=True bypasses /swap: the ingress flips only once every
    shard replica holds the version, and a shard never answers for a version it does not hold."""
    from ray import serve
    from whetstone.index.wire import IndexServiceError

    swap(service, 1)
    queries = np.random.default_rng(8).standard_normal((3, DIM)).astype(np.float32)
    shard0 = serve.get_deployment_handle("IndexService-shard-0", APP)
    with pytest.raises(IndexServiceError, match="does not hold v99") as err:
        shard0.search_arrays.remote(99, queries, 3).result()
    assert err.value.code == ErrorCode.VERSION_UNAVAILABLE
    with searching(service["base"], {"vectors": queries.tolist(), "k": 6}) as (seen, failures):
        time.sleep(0.3)
        publish_sharded(service["root"], 20, *version_docs(20), SHARDS, AnnConfig(kind="flat"),
                        checkpoint="no-encoder", set_latest=True)
        wait_for(lambda: seen and seen[-1][0] == 20, timeout_s=30, what="searches at v20")
        time.sleep(1.0)
    assert not failures, failures[:3]
    assert {v for v, _ in seen} == {1, 20}
    for version, ids in seen:
        assert {doc.split("-")[0] for row in ids for doc in row} == {f"v{version}"}


def test_killed_shard_replica_gives_503_naming_it_then_serves_the_current_version(service):
    swap(service, 3)
    http = service["http"]
    victim = shard_replicas(service)[1][0]
    query = {"vectors": np.random.default_rng(1).standard_normal((2, DIM)).tolist(), "k": 5}
    os.kill(victim["pid"], signal.SIGKILL)
    body = search_until_503(http, query).json()  # once the ingress notices (at most the shard timeout)
    assert body["code"] == ErrorCode.SHARD_UNAVAILABLE.value, body
    assert "shard 1 of 3 (IndexService-shard-1)" in body["detail"], body
    # While it is down the training client falls back (IndexUnavailable naming the shard), and 503s
    # come fast. Serve replaces the replica within seconds, so either call may already find it back:
    # then it must answer in full (checked by the next search), not fail some other way.
    try:
        answer = IndexClient.from_http(service["base"], timeout_s=10).search(np.ones((1, DIM), np.float32), 3)
        client_saw_outage = False
        assert answer.version == 3 and len(answer.ids[0]) == 3  # the replacement already served it whole
    except IndexUnavailable as err:
        assert "shard 1 of 3" in str(err)
        client_saw_outage = True
    t0 = time.monotonic()
    r = http.post("/search", json=query)
    if r.status_code == 503:
        assert time.monotonic() - t0 < 1.0 and "shard 1 of 3" in r.json()["detail"]
    else:  # back already: a full answer, not another error
        assert r.status_code == 200, r.text
    print(f"training client saw the outage: {client_saw_outage}")

    def back():
        r = http.post("/search", json=query)
        return r.status_code == 200 and r.json()

    answer = wait_for(back, timeout_s=120, interval_s=0.5, what="shard 1 back")
    assert answer["version"] == 3 and {d.split("-")[0] for row in answer["ids"] for d in row} == {"v3"}
    docs, ids = version_docs(3)
    want_ids, _ = AnnIndex.build(docs, ids, AnnConfig(kind="flat")).search(np.asarray(query["vectors"]), 5)
    assert answer["ids"] == want_ids, "the replacement serves its shard of the current version"
    (replica,) = wait_for(lambda: [rs for rs in [shard_replicas(service)[1]] if len(rs) == 1
                                   and rs[0]["pid"] != victim["pid"]], timeout_s=60, what="new replica listed")[0]
    assert replica["versions"] == [3] and replica["replica_id"] != victim["replica_id"]
    assert http.get("/healthz").status_code == 200


def test_mutations_touch_only_the_shards_their_ids_hash_to(service):
    swap(service, 2)
    http, root = service["http"], service["root"]
    base = read_manifest(root, latest_version(root))
    new_ids = [f"fresh-{i}" for i in range(40) if shard_of([f"fresh-{i}"], SHARDS)[0] == 0][:2]
    vectors = np.random.default_rng(11).standard_normal((2, DIM)).astype(np.float32)
    r = http.post("/upsert", json={"ids": new_ids, "vectors": vectors.tolist()}, headers=AUTH)
    assert r.status_code == 200, r.text
    upserted = r.json()
    assert upserted["previous_version"] == base.version and upserted["size"] == DOCS + 2
    manifest = read_manifest(root, upserted["version"])
    assert latest_version(root) == upserted["version"] and staged_version(root) is None
    assert manifest.shards[0].prefix == f"v{upserted['version']}/shard-0000"
    for shard in (1, 2):  # untouched: the new version names the previous files
        assert manifest.shards[shard].prefix == base.shards[shard].prefix
        assert manifest.shards[shard].fingerprint == base.shards[shard].fingerprint
    body = http.post("/search", json={"vectors": vectors.tolist(), "k": 1}).json()
    assert body["version"] == upserted["version"] and body["ids"] == [[new_ids[0]], [new_ids[1]]]

    victim = [d for d in version_docs(2)[1] if shard_of([d], SHARDS)[0] == 2][0]
    r = http.post("/delete", json={"ids": [new_ids[0], victim, "never-there"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["changed"] == 2 and r.json()["size"] == DOCS, r.text
    after = read_manifest(root, r.json()["version"])
    assert after.shards[1].prefix == base.shards[1].prefix and after.extra["parent_version"] == upserted["version"]
    assert {after.shards[0].prefix, after.shards[2].prefix} == {f"v{r.json()['version']}/shard-0000",
                                                                f"v{r.json()['version']}/shard-0002"}
    body = http.post("/search", json={"vectors": vectors.tolist(), "k": 1}).json()
    assert body["ids"][0] != [new_ids[0]] and body["ids"][1] == [new_ids[1]]
    nothing = http.post("/delete", json={"ids": ["never-there"]}, headers=AUTH).json()
    assert nothing["changed"] == 0 and nothing["version"] == r.json()["version"]


def test_ivf_refuses_scores_and_vectors_and_a_foreign_shard_count_is_refused(service):
    http = service["http"]
    swap(service, 7)  # IVF: no full vectors
    queries = np.random.default_rng(2).standard_normal((2, DIM)).tolist()
    r = http.post("/search", json={"vectors": queries, "k": 3, "exclude_ids": [["v3-doc-1"], []],
                                   "score_excluded": True})
    assert r.status_code == 422 and r.json()["code"] == "bad_input", r.text
    assert "score_excluded" in r.json()["detail"] and "keeps no full vectors" in r.json()["detail"]
    client = IndexClient.from_handle(app_name=APP, timeout_s=30)
    with pytest.raises(IndexRequestError, match="keeps no full vectors") as err:
        client.vectors(["v3-doc-1"])
    assert err.value.code == ErrorCode.BAD_INPUT
    with pytest.raises(IndexRequestError, match="score_excluded"):
        client.search(np.asarray(queries, np.float32), 3, exclude_ids=[["v3-doc-1"], []], score_excluded=True)
    r = http.post("/search", json={"vectors": queries, "k": 3})
    assert r.status_code == 200 and r.json()["version"] == 7
    time.sleep(1.0)  # the ingress asked the shards for their quantizers: each trained its own
    assert http.get("/stats").json()["cells_assigned_at_ingress"] is False

    r = http.post("/swap", json={"version": 8}, headers=AUTH)
    assert r.status_code == 409 and r.json()["code"] == "snapshot_invalid", r.text
    assert "2 shards" in r.json()["detail"] and "num_shards=3" in r.json()["detail"]
    assert latest_version(service["root"]) == 7 and staged_version(service["root"]) is None
    swap(service, 1)


def test_ivf_shards_trained_together_get_their_cells_from_the_ingress(service):
    """IVF shards that share one quantizer: the ingress finds each query's cells once and every
    shard scans those; the answer is the one the shards give alone, merged."""
    http, root = service["http"], service["root"]
    swap(service, 9)
    queries = np.random.default_rng(9).standard_normal((12, DIM)).astype(np.float32)
    manifest = read_manifest(root, 9)
    shards = [load_shard(root, manifest, shard) for shard in range(SHARDS)]
    want_ids, want_scores = merge_topk([shard.search(queries, 8) for shard in shards], 8)

    def assigned() -> bool:
        assert http.post("/search", json={"vectors": queries.tolist(), "k": 8}).status_code == 200
        return http.get("/stats").json()["cells_assigned_at_ingress"]

    wait_for(assigned, timeout_s=30, what="the ingress to hold v9's quantizer")
    body = http.post("/search", json={"vectors": queries.tolist(), "k": 8}).json()
    assert body["version"] == 9 and body["ids"] == want_ids
    np.testing.assert_allclose(np.asarray(body["scores"], np.float32), want_scores, rtol=1e-5, atol=1e-6)
    got = IndexClient.from_handle(app_name=APP, timeout_s=30).search(queries, 8)
    assert got.ids == want_ids
    swap(service, 1)
