"""The index service over real HTTP on loopback (and its Serve handle), on a local Ray.

One application (one shard, 2 replicas of it, LATEST polled every 0.5 s) serves three snapshots
whose document ids carry their version (``v2-doc-17``), so a response mixing versions would show
in its ids. The sharded cases are in ``test_index_shards``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import threading
import time

import faiss
import httpx
import numpy as np
import pytest
from whetstone.index.ann import AnnConfig, AnnIndex, latest_version
from whetstone.index.client import IndexClient, IndexRequestError, IndexUnavailable
from whetstone.index.wire import ErrorCode

from tests.conftest import free_port

pytestmark = pytest.mark.e2e

DIM = 32
DOCS = 400
TOKEN = "test-token-123"
APP = "whetstone-index-e2e"
PREFIX = "/index-e2e"


def version_docs(version: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(100 + version)
    return rng.standard_normal((DOCS, DIM)).astype(np.float32), [f"v{version}-doc-{i}" for i in range(DOCS)]


@contextlib.contextmanager
def searching(base: str, body: dict, clients: int = 2):
    """``clients`` threads POST ``body`` to ``{base}/search`` until the block ends; yields
    ``(seen, failures)``: ``(version, ids)`` of every 200, a line for every other answer."""
    stop, seen, failures = threading.Event(), [], []

    def search():
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                r = http.post("/search", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    seen.append((r.json()["version"], r.json()["ids"]))

    threads = [threading.Thread(target=search) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield seen, failures
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def search_until_503(http: httpx.Client, body: dict, within_s: float = 10.0) -> httpx.Response:
    """Search until the ingress notices a killed shard and answers 503 (before that: 200s only)."""
    started = time.monotonic()
    while True:
        r = http.post("/search", json=body)
        if r.status_code == 503:
            return r
        assert r.status_code == 200 and time.monotonic() - started < within_s, r.text


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def serve_root_url(ray_cluster) -> str:
    """Start Serve on a free loopback port (or reuse the running proxy) and return its root URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    config = ray_cluster.get(_get_global_client()._controller.get_http_config.remote())
    return f"http://127.0.0.1:{config.port}"


@pytest.fixture(scope="module")
def index_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("index-service") / "index")
    for version in (1, 2, 3):
        docs, ids = version_docs(version)
        AnnIndex.build(docs, ids, AnnConfig(kind="flat")).save(root, version, checkpoint="no-encoder")
    return root  # LATEST = 3


@pytest.fixture(scope="module")
def service(ray_cluster, index_root):
    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    root_url = serve_root_url(ray_cluster)
    args = IndexServiceArgs(index_uri=index_root, auth_token=TOKEN, num_replicas=2, num_cpus=0.1,
                            poll_interval_s=0.5, max_k=50, max_queries_per_request=64, max_request_bytes=1024**2)
    deploy(args, name=APP, route_prefix=PREFIX)
    base = root_url + PREFIX
    with httpx.Client(base_url=base, timeout=30) as http:
        wait_for(lambda: len(shard_replicas(http)) == 2, what="two replicas report")
        yield {"base": base, "http": http, "root": index_root}
    serve.delete(APP)


def swap_everywhere(service, version: int) -> None:
    """POST /swap and wait until every replica reports the version."""
    response = service["http"].post("/swap", json={"version": version}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    wait_converged(service, version)


def shard_replicas(http) -> list[dict]:
    """The replicas of the (only) shard, as ``/stats`` lists them."""
    (shard,) = http.get("/stats").json()["shards"]
    return shard["replicas"]


def wait_converged(service, version: int) -> None:
    """Every shard replica follows LATEST within a poll (the swap made them load it already)."""

    def converged():
        replicas = shard_replicas(service["http"])
        return len(replicas) == 2 and all(r["version"] == version for r in replicas)

    wait_for(converged, what=f"all replicas at v{version}")


def stats_per_replica(http, timeout_s: float = 30.0) -> dict[str, dict]:
    """Each ingress replica's own ``/stats`` (counters are per replica; Serve picks the replica that
    answers, at random between idle ones, so ask until every listed replica has answered)."""
    listed = {r["replica_id"] for r in http.get("/stats").json()["replicas"]}
    answers: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while not listed <= set(answers):
        assert time.monotonic() < deadline, f"replicas {listed - set(answers)} never answered /stats"
        stats = http.get("/stats").json()
        answers[stats["replica_id"]] = stats
    return {replica: answers[replica] for replica in listed}


def test_search_equals_direct_faiss(service):
    swap_everywhere(service, 2)
    docs, ids = version_docs(2)
    queries = np.random.default_rng(7).standard_normal((5, DIM)).astype(np.float32)
    excluded = [[ids[0], ids[1]]] * 5
    response = service["http"].post("/search", json={"vectors": queries.tolist(), "k": 8, "exclude_ids": excluded})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 2
    # The reference: FAISS directly on the same unit vectors (exact inner product).
    flat = faiss.IndexFlatIP(DIM)
    unit_docs, unit_queries = docs.copy(), queries.copy()
    faiss.normalize_L2(unit_docs)
    faiss.normalize_L2(unit_queries)
    flat.add(unit_docs)
    scores, labels = flat.search(unit_queries, 10)
    for row in range(5):
        want = [(ids[j], s) for j, s in zip(labels[row], scores[row], strict=True) if ids[j] not in excluded[row]][:8]
        assert body["ids"][row] == [doc for doc, _ in want]
        np.testing.assert_allclose(body["scores"][row], [s for _, s in want], atol=1e-5)
    # The handle path (what training workers use) returns the same.
    from ray import serve

    result = serve.get_deployment_handle("IndexService", APP).search_arrays.remote(queries, 8, excluded).result()
    assert result["version"] == 2 and result["ids"] == body["ids"]
    # HTTP answers valid vector searches on a fast path (pydantic parse and dump, no FastAPI
    # route); the FastAPI route's own answer, called through the handle, must be the same.
    from whetstone.index.wire import SearchRequest

    routed = serve.get_deployment_handle("IndexService", APP).search.remote(
        SearchRequest(vectors=queries.tolist(), k=8, exclude_ids=excluded)).result()
    assert routed.version == body["version"] and routed.ids == body["ids"]
    assert routed.scores == body["scores"] and set(body) == set(routed.model_dump())
    # What FastAPI would not read as JSON is not searched on the fast path either.
    raw = json.dumps({"vectors": queries.tolist(), "k": 8})
    assert service["http"].post("/search", content=raw, headers={"Content-Type": "text/plain"}).status_code == 422
    plus_json = service["http"].post("/search", content=raw, headers={"Content-Type": "application/vnd.x+json"})
    plain = service["http"].post("/search", content=raw, headers={"Content-Type": "application/json"})
    assert plus_json.status_code == 200 and plus_json.json()["ids"] == plain.json()["ids"]
    # The excluded ids' scores (what training asks for its positives' false-negative margin).
    response = service["http"].post("/search", json={"vectors": queries.tolist(), "k": 8, "exclude_ids": excluded,
                                                     "score_excluded": True})
    assert response.status_code == 200, response.text
    want = unit_queries @ unit_docs[:2].T  # (5, 2): ids[0], ids[1]
    np.testing.assert_allclose(response.json()["excluded_scores"], want, atol=1e-5)
    assert response.json()["ids"] == body["ids"]


def test_swap_under_concurrent_searches_never_mixes(service):
    swap_everywhere(service, 1)
    queries = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32).tolist()
    stop = threading.Event()
    seen: list[tuple[int, int, list]] = []
    failures: list[str] = []

    def hammer():
        with httpx.Client(base_url=service["base"], timeout=30) as http:
            while not stop.is_set():
                r = http.post("/search", json={"vectors": queries, "k": 5})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                seen.append((body["version"], len(body["ids"]), body["ids"]))

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for version in (2, 3, 1, 3, 2):
            time.sleep(0.4)
            r = service["http"].post("/swap", json={"version": version},
                                     headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
        time.sleep(1.5)  # let the other replica follow LATEST while searches continue
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert len(seen) > 50
    for version, rows, ids in seen:
        assert rows == 4
        prefixes = {doc.split("-")[0] for row in ids for doc in row}
        assert prefixes == {f"v{version}"}, f"response v{version} holds ids of {prefixes}"
    assert {v for v, _, _ in seen} >= {1, 2, 3}, "searches saw every swapped-in version"
    assert latest_version(service["root"]) == 2


def test_bad_inputs_get_4xx_naming_the_field(service):
    http = service["http"]
    good = np.full((2, DIM), 0.1).tolist()
    cases = [
        ({"vectors": np.zeros((2, DIM - 1)).tolist(), "k": 3}, 422, "dimension 31"),
        # NaN/Infinity literals are not JSON; as strings or overflowing numbers they parse to floats.
        ('{"vectors": [[NaN' + ", 0.1" * (DIM - 1) + '], [0.2' + ", 0.1" * (DIM - 1) + ']], "k": 3}', 422, '"vectors",0,0'),
        ('{"vectors": [[0.1, "NaN"' + ", 0.1" * (DIM - 2) + ']], "k": 3}', 422, '"vectors",0,1'),
        ('{"vectors": [[1e999' + ", 0.1" * (DIM - 1) + ']], "k": 3}', 422, "finite"),
        ({"vectors": good, "k": 0}, 422, "k"),
        ({"vectors": good, "k": 51}, 422, "k: 51 is out of range"),
        ({"vectors": np.zeros((65, DIM)).tolist(), "k": 3}, 413, "max_queries_per_request"),
        ({"vectors": good, "k": 3, "exclude_ids": [["a"]]}, 422, "exclude_ids"),
        ({"vectors": good, "texts": ["x", "y"], "k": 3}, 422, "exactly one"),
        ({"vectors": [], "k": 3}, 422, "at least one"),
        ({"vectors": good, "k": 3, "colour": "red"}, 422, "colour"),
        ('{"vectors": [[0.1, ', 422, "JSON"),
        ({"vectors": [["a"] * DIM], "k": 3}, 422, "vectors"),
        # strict types: nothing is coerced
        ({"vectors": good, "k": "5"}, 422, '"k"'),
        ({"vectors": good, "k": 5.0}, 422, '"k"'),
        ({"vectors": [[True] + [0.1] * (DIM - 1)], "k": 3}, 422, '"vectors",0,0'),
        # cosine of nothing
        ({"vectors": [[0.1] * DIM, [0.0] * DIM], "k": 3}, 422, "vectors[1] is all zeros"),
        # nesting too deep for any parser: the answer says where it gave up
        ('{"vectors": ' + "[" * 5000 + "]" * 5000 + ', "k": 3}', 422, "recursion limit exceeded at line 1 column"),
        # larger than max_request_bytes (1 MiB here): refused before it is parsed
        ({"vectors": np.full((40, DIM), 0.123456789).tolist(), "texts": ["x" * 1024**2]}, 413, "max_request_bytes"),
    ]
    before = stats_per_replica(http)
    errors = 0  # error answers sent: each replica counts the ones it gave
    for body, status, needle in cases:
        if isinstance(body, str):
            r = http.post("/search", content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post("/search", json=body)
        assert r.status_code == status, (body if isinstance(body, str) else list(body), r.status_code, r.text)
        assert needle.lower().replace(" ", "") in r.text.lower().replace(" ", ""), (needle, r.text)
        expected = {422: "bad_input", 413: "request_too_large" if "bytes" in needle else "too_many_queries"}
        assert r.json()["code"] == expected[status], r.text
        errors += 1
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = http.post("/swap", json={"version": 99}, headers=auth)
    assert r.status_code == 404 and "no snapshot v99" in r.json()["detail"]
    assert r.json()["code"] == "snapshot_not_found"
    r = http.post("/swap", json={"version": -1}, headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "bad_input"
    r = http.post("/upsert", json={"ids": ["a", "b"], "vectors": [[0.0] * DIM]}, headers=auth)
    assert r.status_code == 422 and "2 ids for 1 rows" in r.text
    r = http.post("/upsert", json={"ids": ["a"], "vectors": [[0.0] * 3]}, headers=auth)
    assert r.status_code == 422 and "dimension 3" in r.text and r.json()["code"] == "bad_input"
    r = http.post("/upsert", json={"ids": ["a"], "vectors": [[0.0] * DIM]}, headers=auth)
    assert r.status_code == 422 and "vectors[0] is all zeros" in r.text and r.json()["code"] == "bad_input"
    r = http.post("/upsert", json={"ids": ["a"], "texts": ["x" * 40_000]}, headers=auth)
    assert r.status_code == 422 and "32768" in r.text and r.json()["code"] == "bad_input"
    errors += 6
    after = stats_per_replica(http)
    assert set(after) == set(before), "the same replicas answered before and after"
    assert all(stats["version"] is not None for stats in after.values()) and http.get("/healthz").status_code == 200
    grown = sum(after[replica]["errors_total"] - before[replica]["errors_total"] for replica in after)
    assert grown == errors, f"{errors} error answers sent, the replicas counted {grown}"


def test_mutations_need_the_token_and_reads_can_be_protected(service, ray_cluster, index_root):
    http = service["http"]
    for path, body in (("/swap", {"version": 1}), ("/upsert", {"ids": ["x"], "vectors": [[0.1] * DIM]}),
                       ("/delete", {"ids": ["x"]})):
        r = http.post(path, json=body)
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer", (path, r.text)
        r = http.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 403, (path, r.text)
    assert http.post("/search", json={"vectors": [[0.1] * DIM], "k": 1}).status_code == 200

    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    # A second app: reads protected; the token comes from the environment variable.
    os.environ["WHETSTONE_INDEX_TOKEN"] = "from-env"
    try:
        args = IndexServiceArgs(index_uri=index_root, protect_reads=True, num_cpus=0.1)
        assert args.auth_token is None
        # Replicas read the env var in their own process: pass it as the config would.
        args = args.model_copy(update={"auth_token": os.environ["WHETSTONE_INDEX_TOKEN"]})
        deploy(args, name=APP + "-protected", route_prefix=PREFIX + "-protected")
        base = service["base"] + "-protected"
        body = {"vectors": [[0.1] * DIM], "k": 1}
        assert httpx.post(base + "/search", json=body).status_code == 401
        assert httpx.get(base + "/stats").status_code == 401
        assert httpx.post(base + "/search", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
        r = httpx.post(base + "/search", json=body, headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200 and r.json()["version"] == latest_version(index_root)
        assert httpx.get(base + "/healthz").status_code == 200  # liveness stays open
        spec = httpx.get(base + "/openapi.json").json()  # here reads need the token, and the document says so
        assert spec["paths"]["/search"]["post"]["security"] and spec["paths"]["/stats"]["get"]["security"]
        assert "security" not in spec["paths"]["/healthz"]["get"]
    finally:
        del os.environ["WHETSTONE_INDEX_TOKEN"]
        serve.delete(APP + "-protected")


def test_upsert_and_delete_publish_new_versions(service):
    swap_everywhere(service, 3)
    http, auth = service["http"], {"Authorization": f"Bearer {TOKEN}"}
    query = np.random.default_rng(11).standard_normal((1, DIM)).astype(np.float32)
    r = http.post("/upsert", json={"ids": ["fresh-doc"], "vectors": query.tolist()}, headers=auth)
    assert r.status_code == 200, r.text
    upserted = r.json()
    assert upserted["previous_version"] == 3 and upserted["version"] == 4 and upserted["size"] == DOCS + 1
    wait_converged(service, 4)
    body = http.post("/search", json={"vectors": query.tolist(), "k": 1}).json()
    assert body == {**body, "version": 4, "ids": [["fresh-doc"]]}
    r = http.post("/delete", json={"ids": ["fresh-doc", "never-there"]}, headers=auth)
    assert r.status_code == 200 and r.json()["version"] == 5 and r.json()["changed"] == 1
    wait_converged(service, 5)
    assert http.post("/search", json={"vectors": query.tolist(), "k": 1}).json()["ids"] != [["fresh-doc"]]
    stored = AnnIndex.load(service["root"])
    assert (stored.version, stored.size, "fresh-doc" in stored) == (5, DOCS, False)
    assert stored.extra["parent_version"] == 4


def test_killed_replica_comes_back_with_the_latest_version(service):
    swap_everywhere(service, 2)
    victim = shard_replicas(service["http"])[0]
    os.kill(victim["pid"], signal.SIGKILL)

    # Searches keep working on the survivor meanwhile: Serve's router reserves a slot on a replica
    # before it sends a request there, and a dead replica fails that reservation, so the request
    # goes to the survivor (the ingress retries a failed shard call once). At worst (no replica can
    # take it for a moment) the answer is 503: retry that briefly; a 500 is a failure.
    deadline = time.monotonic() + 5.0
    while True:
        r = service["http"].post("/search", json={"vectors": [[0.3] * DIM], "k": 2})
        assert r.status_code in (200, 503), (r.status_code, r.text[:300])
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["version"] == 2, (r.status_code, r.text[:300])

    def replaced():
        now = shard_replicas(service["http"])
        fresh = [x for x in now if x["replica_id"] != victim["replica_id"] and x["pid"] != victim["pid"]]
        return len(now) == 2 and all(x["version"] == 2 for x in now) and len(fresh) == 2 and now

    now = wait_for(replaced, timeout_s=90, interval_s=0.5, what="a replacement replica at v2")
    assert victim["replica_id"] not in {x["replica_id"] for x in now}
    for _ in range(6):  # both replicas answer from v2
        assert service["http"].post("/search", json={"vectors": [[0.3] * DIM], "k": 2}).json()["version"] == 2


def test_client_handle_http_pickling_and_fallback(service, ray_cluster):
    swap_everywhere(service, 1)
    queries = np.random.default_rng(5).standard_normal((3, DIM)).astype(np.float32)
    via_http = IndexClient.from_http(service["base"], token=TOKEN).search(queries, 4, exclude_ids=[["v1-doc-0"]] * 3)
    handle_client = IndexClient.from_handle(app_name=APP, timeout_s=10)
    via_handle = handle_client.search(queries, 4, exclude_ids=[["v1-doc-0"]] * 3)
    assert via_http.version == via_handle.version == 1 and via_http.ids == via_handle.ids
    np.testing.assert_allclose(via_http.scores, via_handle.scores, atol=1e-5)
    assert via_handle.scores.shape == (3, 4)

    # Built on the driver, used in another Ray worker (as a Train worker would).
    @ray_cluster.remote(num_cpus=0.1)
    def in_worker(client, vectors):
        return client.search(vectors, 4).ids

    assert ray_cluster.get(in_worker.remote(pickle.loads(pickle.dumps(handle_client)), queries)) == \
        handle_client.search(queries, 4).ids

    # Stored vectors (cached negatives): the index's unit vectors of the ids, from the live version.
    docs, ids = version_docs(1)
    version, stored = handle_client.vectors([ids[3], ids[0]])
    unit = docs[[3, 0]] / np.linalg.norm(docs[[3, 0]], axis=1, keepdims=True)
    assert version == 1 and stored.dtype == np.float32
    np.testing.assert_allclose(stored, unit, atol=1e-6)
    with pytest.raises(IndexRequestError, match="not in the index"):
        handle_client.vectors(["no-such-doc"])
    with pytest.raises(IndexRequestError, match="only the Serve handle"):
        IndexClient.from_http(service["base"]).vectors(ids[:1])

    with pytest.raises(IndexRequestError, match="dimension"):
        handle_client.search(queries[:, :5], 4)
    nan_queries = queries.copy()
    nan_queries[1, 2] = np.nan
    with pytest.raises(IndexRequestError, match=r"vectors\[1\]\[2\] is nan"):
        handle_client.search(nan_queries, 4)
    with pytest.raises(IndexRequestError, match="k: 0 is out of range"):
        handle_client.search(queries, 0)
    with pytest.raises(IndexRequestError) as err:
        IndexClient.from_http(service["base"]).swap(1)
    assert (err.value.status, err.value.code) == (401, ErrorCode.UNAUTHORIZED)
    with pytest.raises(IndexRequestError) as err:
        handle_client.swap(99)
    assert (err.value.status, err.value.code) == (404, ErrorCode.SNAPSHOT_NOT_FOUND)
    assert IndexClient.from_http(service["base"], token=TOKEN).swap(1)["version"] == 1
    assert handle_client.stats()["version"] == 1

    # Down, missing or slow: IndexUnavailable, and the breaker then fails fast.
    down = IndexClient.from_http(f"http://127.0.0.1:{free_port()}/index", timeout_s=1, retry_after_s=30)
    with pytest.raises(IndexUnavailable):
        down.search(queries, 2)
    started = time.monotonic()
    with pytest.raises(IndexUnavailable, match="not retrying"):
        down.search(queries, 2)
    assert time.monotonic() - started < 0.1 and down.unavailable_count == 2
    with pytest.raises(IndexUnavailable):
        IndexClient.from_handle(app_name="no-such-app", timeout_s=2).search(queries, 2)
    with pytest.raises(IndexUnavailable, match="timed out"):
        IndexClient.from_handle(app_name=APP).search(queries, 2, timeout_s=1e-4)
    with pytest.raises(IndexUnavailable):
        IndexClient.from_http(service["base"].replace(PREFIX, "/nothing-here")).search(queries, 2)


def test_health_metrics_and_openapi(service):
    http = service["http"]
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    for _ in range(20):  # enough that every replica serves some (Serve picks at random between idle ones)
        assert http.post("/search", json={"vectors": [[0.2] * DIM], "k": 3}).status_code == 200
    moved = http.get("/metrics")  # Ray's metrics port has them, for every replica (test_index_metrics.py)
    assert moved.status_code == 410 and moved.json()["code"] == "gone", moved.text
    spec = http.get("/openapi.json").json()
    assert {"/search", "/swap", "/upsert", "/delete", "/stats", "/healthz"} <= set(spec["paths"])
    # the document tells the truth about tokens: reads are open here, mutations are not
    assert all("security" not in spec["paths"][path][method] for path, method in
               (("/search", "post"), ("/stats", "get"), ("/healthz", "get")))
    assert all(spec["paths"][path]["post"]["security"] for path in ("/swap", "/upsert", "/delete"))
    for replica, stats in stats_per_replica(http).items():
        assert stats["kind"] == "flat" and stats["dim"] == DIM and stats["checkpoint"] == "no-encoder"
        assert stats["queries_total"] >= 1, (replica, stats)
        assert isinstance(stats["latency_ms_p99"], float) and stats["latency_ms_p99"] > 0, (replica, stats)
        assert json.loads(json.dumps(stats))["replica_id"] == replica


def test_text_queries_use_the_snapshots_encoder(service, tiny_encoder_dir, tmp_path):
    from whetstone.models.encoder import Encoder

    encoder = Encoder.load(tiny_encoder_dir, device="cpu")
    texts = [f"passage number {i} about topic {i % 7}" for i in range(60)]
    doc_vectors = encoder.encode(texts)
    index = AnnIndex.build(doc_vectors, [f"t{i}" for i in range(60)], AnnConfig())
    index.save(service["root"], 10, checkpoint=str(tiny_encoder_dir), set_latest=False)
    swap_everywhere(service, 10)
    queries = ["topic 3 passage", "number 12"]
    # the first text query loads the encoder inside the replica (imports transformers): give it time
    r = service["http"].post("/search", json={"texts": queries, "k": 5}, timeout=180)
    assert r.status_code == 200, r.text
    want_ids, want_scores = index.search(encoder.encode(queries), 5)
    assert r.json()["version"] == 10 and r.json()["ids"] == want_ids
    np.testing.assert_allclose(r.json()["scores"], want_scores, atol=1e-4)
    via_handle = IndexClient.from_handle(app_name=APP, timeout_s=30).search_texts(queries, 5)
    assert via_handle.version == 10 and via_handle.ids == want_ids
    # A version whose checkpoint is not an encoder refuses texts with a 409, still takes vectors.
    swap_everywhere(service, 1)
    r = service["http"].post("/search", json={"texts": queries, "k": 5})
    assert r.status_code == 409 and "no-encoder" in r.json()["detail"] and r.json()["code"] == "texts_unsupported"


def test_mutations_keep_only_the_newest_versions_on_storage(service, tmp_path):
    """keep_versions=2 on a deployment of its own: after five upserts the root holds the newest
    two versions (plus the shard folders they reuse), searches answer from the newest, and the
    space of the removed versions is freed."""
    import shutil

    from ray import serve
    from whetstone.index.snapshot import list_versions

    from services.index.app import IndexServiceArgs, deploy

    root = str(tmp_path / "index")
    shutil.copytree(service["root"], root)
    before = sum(p.stat().st_size for p in (tmp_path / "index").rglob("*") if p.is_file())
    args = IndexServiceArgs(index_uri=root, auth_token=TOKEN, num_cpus=0.1, poll_interval_s=0.5, keep_versions=2)
    deploy(args, name=APP + "-retention", route_prefix=PREFIX + "-retention")
    try:
        base, auth = service["base"] + "-retention", {"Authorization": f"Bearer {TOKEN}"}
        rng = np.random.default_rng(5)
        for i in range(5):
            vector = rng.standard_normal((1, DIM)).tolist()
            r = httpx.post(base + "/upsert", json={"ids": [f"kept-{i}"], "vectors": vector}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
        newest = r.json()["version"]
        assert list_versions(root) == [newest - 1, newest]
        body = httpx.post(base + "/search", json={"vectors": vector, "k": 1}).json()
        assert body["version"] == newest and body["ids"] == [["kept-4"]]
        after = sum(p.stat().st_size for p in (tmp_path / "index").rglob("*") if p.is_file())
        assert after < before, (before, after)  # five full snapshots were published, three-plus removed
    finally:
        serve.delete(APP + "-retention")


def test_fuzzed_requests_get_no_server_errors(service, tmp_path):
    """A bounded schemathesis run (positive and negative cases for every operation of the
    service's own OpenAPI document, with the write token, so mutations and swaps are exercised)
    on a deployment of its own: no 5xx, and the service still answers a plain search after it."""
    import shutil

    from ray import serve

    from services.index.app import IndexServiceArgs, deploy
    from tests.fuzz_http import fuzz_openapi

    root = str(tmp_path / "index")
    shutil.copytree(service["root"], root)
    args = IndexServiceArgs(index_uri=root, auth_token=TOKEN, num_cpus=0.1, poll_interval_s=0.5, max_k=50,
                            max_queries_per_request=64, keep_versions=3)
    deploy(args, name=APP + "-fuzz", route_prefix=PREFIX + "-fuzz")
    try:
        base = service["base"] + "-fuzz"
        result = fuzz_openapi(base, examples=25, headers={"Authorization": f"Bearer {TOKEN}"})
        assert result.cases >= 200 and not result.server_errors, (result.cases, result.server_errors[:5])
        assert sum(n for status, n in result.statuses.items() if 400 <= status < 500) > 0  # refusals were sent
        r = httpx.post(base + "/search", json={"vectors": [[0.1] * DIM], "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["ids"][0]) == 3
    finally:
        serve.delete(APP + "-fuzz")
