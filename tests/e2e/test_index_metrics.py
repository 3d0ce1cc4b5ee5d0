"""The index service's Prometheus metrics, aggregated across replicas, on a local Ray.

Two ingress replicas and two replicas of the (one) shard record through Ray Serve's metrics API;
Ray's metrics agent exports every replica's series on the node's metrics port, the address KubeRay
users scrape on each pod. The test reads it as Prometheus would (HTTP, text format), sums over
replicas and compares with what it sent. ``GET /metrics`` on the service answers 410 naming it.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from whetstone.index.ann import AnnConfig, AnnIndex

from tests.e2e.test_index_service import DIM, serve_root_url, version_docs, wait_for

pytestmark = pytest.mark.e2e

APP = "whetstone-index-metrics"
PREFIX = "/index-metrics"
SEARCHES = 40
QUERIES = 3  # query vectors per search
BAD = 3  # searches refused with 422


def exporter_urls(ray_cluster) -> list[str]:
    """Every live node's metrics endpoint, as Ray reports it (one node here; one per pod on KubeRay)."""
    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray_cluster.nodes() if node["Alive"] and node.get("MetricsExportPort")]


def scrape(urls: list[str]) -> list:
    """The samples of this app's whetstone metrics on every node (Prometheus text format)."""
    samples = []
    for url in urls:
        text = httpx.get(url, timeout=30).text
        mine = "\n".join(line for line in text.splitlines() if "whetstone_index_" in line)
        for family in text_string_to_metric_families(mine + "\n"):
            samples += [s for s in family.samples if s.labels.get("application") == APP]
    return samples


def per_replica(samples: list, name: str, deployment: str, **labels: str) -> dict[str, float]:
    """``{replica: value}`` of ``name`` in ``deployment`` (summed over other labels than ``labels``)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name and s.labels.get("deployment") == deployment and \
                all(s.labels.get(k) == v for k, v in labels.items()):
            out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


@pytest.fixture(scope="module")
def metrics_service(ray_cluster, tmp_path_factory):
    from ray import serve

    from services.index.app import IndexServiceArgs, deploy

    root = str(tmp_path_factory.mktemp("index-metrics") / "index")
    docs, ids = version_docs(3)
    AnnIndex.build(docs, ids, AnnConfig(kind="flat")).save(root, 3, checkpoint="no-encoder")
    base = serve_root_url(ray_cluster) + PREFIX
    args = IndexServiceArgs(index_uri=root, router_replicas=2, router_cpus=0.1, replicas_per_shard=2, num_cpus=0.1,
                            poll_interval_s=0.5, max_k=50)
    deploy(args, name=APP, route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            wait_for(lambda: http.get("/healthz").status_code == 200, what="the service serves v3")
            yield http
    finally:
        serve.delete(APP)


def expected_totals(samples: list) -> dict[str, float]:
    """What the test compares, each summed over the replicas of its deployment."""
    ingress, shard = "IndexService", "IndexService-shard-0"

    def total(name: str, deployment: str = ingress, **labels: str) -> float:
        return sum(per_replica(samples, name, deployment, **labels).values())

    return {
        "ingress requests": total("ray_whetstone_index_search_requests_total"),
        "ingress queries": total("ray_whetstone_index_search_queries_total"),
        "ingress latency count": total("ray_whetstone_index_search_latency_seconds_count"),
        "shard requests": total("ray_whetstone_index_search_requests_total", shard),
        "shard batched requests": total("ray_whetstone_index_batched_requests_total", shard),
        "422 on /search": total("ray_whetstone_index_http_errors_total", path="/search", status="422"),
        "404 elsewhere": total("ray_whetstone_index_http_errors_total", path="other", status="404"),
    }


def test_request_counts_add_up_across_replicas_on_rays_metrics_port(metrics_service, ray_cluster):
    http = metrics_service
    rng = np.random.default_rng(1)
    for _ in range(SEARCHES):
        r = http.post("/search", json={"vectors": rng.standard_normal((QUERIES, DIM)).tolist(), "k": 5})
        assert r.status_code == 200 and r.json()["version"] == 3, r.text
    for _ in range(BAD):
        assert http.post("/search", json={"vectors": [[0.1] * DIM], "k": 0}).status_code == 422
    assert http.get("/no-such-route").status_code == 404

    want = {"ingress requests": SEARCHES, "ingress queries": SEARCHES * QUERIES,
            "ingress latency count": SEARCHES, "shard requests": SEARCHES,  # one shard: one call per search
            "shard batched requests": SEARCHES, "422 on /search": BAD, "404 elsewhere": 1}
    urls = exporter_urls(ray_cluster)
    assert urls, "Ray reports no metrics export port"
    deadline = time.monotonic() + 90  # replicas report every few seconds; the agent exports what it has
    while True:
        samples = scrape(urls)
        got = expected_totals(samples)
        assert all(got[key] <= want[key] for key in want), f"counted more than was sent: {got}"
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert got == want, f"after 90 s Ray's exporter shows {got}, the test sent {want}"

    # every replica's series is there, each with its own share
    requests = per_replica(samples, "ray_whetstone_index_search_requests_total", "IndexService")
    assert len(requests) == 2 and all(v > 0 for v in requests.values()), requests
    shard_requests = per_replica(samples, "ray_whetstone_index_search_requests_total", "IndexService-shard-0")
    assert len(shard_requests) == 2, shard_requests
    faiss_calls = sum(per_replica(samples, "ray_whetstone_index_faiss_calls_total", "IndexService-shard-0").values())
    batches = sum(per_replica(samples, "ray_whetstone_index_batch_requests_count", "IndexService-shard-0").values())
    assert 1 <= faiss_calls == batches <= SEARCHES, (faiss_calls, batches)  # one observation per FAISS call
    for deployment in ("IndexService", "IndexService-shard-0"):
        versions = per_replica(samples, "ray_whetstone_index_version", deployment)
        assert versions == dict.fromkeys(requests if deployment == "IndexService" else shard_requests, 3.0), versions
        sizes = per_replica(samples, "ray_whetstone_index_size", deployment)
        assert set(sizes.values()) == {float(len(version_docs(3)[1]))}, sizes

    # the service's own route points there instead of showing one random replica's numbers
    moved = http.get("/metrics")
    assert moved.status_code == 410 and moved.json()["code"] == "gone", moved.text
    node_url = urls[0].replace("/metrics", "")
    assert node_url in moved.json()["detail"] and "ray_whetstone_index_" in moved.json()["detail"]
    assert "/metrics" not in http.get("/openapi.json").json()["paths"]
