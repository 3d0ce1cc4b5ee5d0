"""The index service's Prometheus metrics, recorded through Ray Serve's metrics API.

Every replica, the ingress (deployment ``IndexService``) and each shard (``IndexService-shard-{s}``),
records into Ray's metrics agent on its node. The agent exports them on the node's metrics port
(``ray start --metrics-export-port``; under KubeRay port 8080, named ``metrics``, on every Ray pod)
with the labels Serve adds, ``application``, ``deployment`` and ``replica``, so one Prometheus
scrape per node sees every replica on it and ``sum by (deployment)`` adds them up. Ray prefixes
the names with ``ray_`` and counters get ``_total``: ``whetstone_index_search_requests`` is scraped
as ``ray_whetstone_index_search_requests_total``. The agent exports what replicas recorded every
few seconds (Ray's ``metrics_report_interval_ms``), so a scrape lags the requests by that much.
Ray rebuilds a histogram's ``_sum`` from bucket midpoints (Ray 2.60): its ``_count`` and buckets are
exact, its ``_sum`` is not, hence the counter ``whetstone_index_batched_requests`` beside the batch
histogram (requests per FAISS call = its rate over ``whetstone_index_faiss_calls``'s).

``GET /metrics`` on the service itself answers 410 naming these addresses (:func:`metrics_moved`):
a route answered by one random replica could only ever show that replica's numbers.
"""

from __future__ import annotations

import asyncio

from ray.serve.metrics import Counter, Gauge, Histogram
from whetstone.index.wire import ErrorCode, IndexServiceError

LATENCY_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
_LISTED_NODES = 8  # exporter addresses the 410 message names


class IndexMetrics:
    """One replica's metrics (create it in the replica: Serve's labels come from its context)."""

    def __init__(self) -> None:
        self.requests = Counter("whetstone_index_search_requests", "search requests (ingress: one per "
                                "request; shard: one per fan-out to the shard)")
        self.queries = Counter("whetstone_index_search_queries", "query vectors searched")
        self.errors = Counter("whetstone_index_http_errors", "HTTP responses >= 400, by route and status",
                              tag_keys=("path", "status"))
        self.latency = Histogram("whetstone_index_search_latency_seconds", "search latency in the replica",
                                 boundaries=LATENCY_BUCKETS_S)
        self.faiss_calls = Counter("whetstone_index_faiss_calls", "FAISS searches (one per batch of requests)")
        self.batch = Histogram("whetstone_index_batch_requests", "search requests merged into one FAISS call",
                               boundaries=BATCH_BUCKETS)
        self.batched_requests = Counter("whetstone_index_batched_requests", "search requests served by FAISS "
                                        "calls (exact; the batch histogram's _sum is approximate)")
        self.version = Gauge("whetstone_index_version", "served index version (-1: none yet)")
        self.size = Gauge("whetstone_index_size", "documents in the served version (a shard: in its shard)")

    def searched(self, queries: int, latency_s: float) -> None:
        self.requests.inc()
        if queries > 0:  # Ray refuses inc(0)
            self.queries.inc(queries)
        self.latency.observe(latency_s)

    def batched(self, requests: int) -> None:
        self.faiss_calls.inc()
        self.batch.observe(requests)
        if requests > 0:
            self.batched_requests.inc(requests)

    def error(self, path: str, status: int) -> None:
        self.errors.inc(tags={"path": path, "status": str(status)})

    def served(self, version: int | None, size: int) -> None:
        self.version.set(-1 if version is None else version)
        self.size.set(size)


def metrics_addresses() -> tuple[str | None, list[str]]:
    """``(this node's exporter URL, every live node's)``: ``http://<node ip>:<metrics port>/metrics``."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    mine, urls = None, []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        urls.append(url)
        if node["NodeID"] == here:
            mine = url
    return mine, sorted(urls)


async def metrics_moved() -> IndexServiceError:
    """The 410 answer of ``GET /metrics``: where the service's metrics are scraped instead."""
    try:
        mine, urls = await asyncio.to_thread(metrics_addresses)
    except Exception:  # noqa: BLE001 - the answer still says where to look
        mine, urls = None, []
    listed = ", ".join(urls[:_LISTED_NODES]) + (f" and {len(urls) - _LISTED_NODES} more" if len(urls) >
                                                _LISTED_NODES else "")
    where = (f"; this replica's node exports at {mine}" if mine else "") + (
        f"; this cluster's nodes: {listed}" if listed else "")
    return IndexServiceError(
        ErrorCode.GONE,
        "the index service's metrics are exported by Ray's metrics agent on every node, for every replica "
        "(a route answered by one replica could show only its own): scrape each node's metrics port "
        "(--metrics-export-port; KubeRay: port 8080, named `metrics`, on every Ray pod), metric names "
        f"ray_whetstone_index_*, labels application/deployment/replica{where}")
