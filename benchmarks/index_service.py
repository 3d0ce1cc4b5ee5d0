"""Index service benchmark: FAISS in-process vs the Serve handle vs HTTP, and ANN recall.

Two corpora:

* ``msmarco``: the 5,000 msmarco-dl19-subset passages embedded with all-MiniLM-L6-v2 (384-d,
  cached under ``.whetstone/cache/``), queried with its 50 TREC-DL-2019 queries;
* ``clustered``: 200,000 synthetic unit vectors (384-d) drawn from a mixture of Gaussians
  (2,000 centres, per-coordinate spread 0.06, then normalised), so that they have neighbours
  the way real embeddings do; 1,000 queries drawn from the same mixture.

For each: queries/s and per-call p50/p99 latency at batch 1 and 64 through (a) FAISS in-process,
(b) the Serve handle (``IndexClient.from_handle``, 1 and 8 callers in flight), (c) HTTP with 1 and
32 concurrent clients; recall@10 of HNSW and IVF against exact search, with their throughput.
All figures go to ``benchmarks/results/index_service.json``; a table is printed.

Usage::

    python -m benchmarks.index_service                 # everything (~10 min on 2 cores, cached)
    python -m benchmarks.index_service --synthetic-n 20000 --seconds 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
from whetstone.index.ann import AnnConfig, AnnIndex

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".whetstone" / "cache"
MSMARCO = REPO.parent / "shared" / "data" / "retrieval" / "msmarco-dl19-subset"
K = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ data
def msmarco_vectors() -> tuple[np.ndarray, list[str], np.ndarray]:
    """(5000, 384) passage and (50, 384) query embeddings from MiniLM, cached after the first run."""
    cache = CACHE / "msmarco-dl19-minilm.npz"
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        return data["docs"], [str(i) for i in data["ids"]], data["queries"]
    from whetstone.models.assets import minilm_path
    from whetstone.models.encoder import Encoder

    corpus = [json.loads(line) for line in (MSMARCO / "corpus.jsonl").open(encoding="utf-8") if line.strip()]
    queries = [json.loads(line) for line in (MSMARCO / "queries.jsonl").open(encoding="utf-8") if line.strip()]
    encoder = Encoder.load(minilm_path(), device="cpu")
    started = time.perf_counter()
    docs = encoder.encode([(d.get("title", "") + " " + d["text"]).strip() for d in corpus], max_length=256)
    print(f"encoded {len(docs)} passages in {time.perf_counter() - started:.0f}s", flush=True)
    query_vectors = encoder.encode([q["text"] for q in queries], max_length=256)
    ids = np.array([d["_id"] for d in corpus])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, docs=docs, ids=ids, queries=query_vectors)
    return docs, [str(i) for i in ids], query_vectors


def clustered_vectors(count: int, dim: int, clusters: int, spread: float, queries: int, seed: int = 0):
    """Unit vectors around ``clusters`` random unit centres, per-coordinate noise ``spread``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(n: int) -> np.ndarray:
        rows = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    docs = draw(count)
    return docs, [f"c{i}" for i in range(count)], draw(queries)


def cached_index(name: str, docs: np.ndarray, ids: list[str], config: AnnConfig) -> tuple[AnnIndex, str, float]:
    """Build (or load from the cache) an index saved as snapshot v1 under a bench root."""
    key = f"{name}-{len(docs)}-{config.kind}-m{config.hnsw_m}-efc{config.ef_construction}-nl{config.nlist}"
    root = str(CACHE / "bench-index" / key)
    started = time.perf_counter()
    try:
        index = AnnIndex.load(root)
        built = False
    except Exception:  # noqa: BLE001 - not cached yet
        index = AnnIndex.build(docs, ids, config)
        index.save(root, 1, checkpoint="benchmark", overwrite=True)
        built = True
    seconds = time.perf_counter() - started
    print(f"  {key}: {'built' if built else 'loaded'} in {seconds:.1f}s", flush=True)
    return index, root, seconds if built else float("nan")


# ------------------------------------------------------------------------------------ timing
def summarise(latencies_s: list[float], queries: int, wall_s: float) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {"qps": queries / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "calls": len(ms)}


def closed_loop(call, pool: np.ndarray, batch: int, seconds: float, concurrency: int = 1) -> dict:
    """``concurrency`` threads each calling ``call(batch_of_queries)`` back to back for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    call(pool[:batch])  # warm-up

    def worker(offset: int) -> None:
        position, mine = offset * batch, []
        while time.perf_counter() < deadline:
            start = position % (len(pool) - batch + 1)
            t0 = time.perf_counter()
            call(pool[start : start + batch])
            mine.append(time.perf_counter() - t0)
            position += batch * concurrency
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarise(latencies, len(latencies) * batch, time.perf_counter() - started)


def http_loop(url: str, pool: np.ndarray, batch: int, seconds: float, concurrency: int) -> dict:
    """``concurrency`` aiohttp clients posting pre-serialised /search bodies back to back."""
    import aiohttp

    bodies = [json.dumps({"vectors": pool[s : s + batch].tolist(), "k": K}).encode()
              for s in range(0, min(len(pool) - batch + 1, 64 * batch), batch)]

    async def run() -> dict:
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=concurrency + 4)
        async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as http:
            async with http.post(url, data=bodies[0]) as warm:
                await warm.read()
            deadline = time.perf_counter() + seconds

            async def client(offset: int) -> None:
                nonlocal errors
                i = offset
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    async with http.post(url, data=bodies[i % len(bodies)]) as response:
                        await response.read()
                        errors += response.status != 200
                    latencies.append(time.perf_counter() - t0)
                    i += concurrency

            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(concurrency)))
            out = summarise(latencies, len(latencies) * batch, time.perf_counter() - started)
            out["errors"] = errors
            return out

    return asyncio.run(run())


def recall_at_k(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


# ------------------------------------------------------------------------------------ suites
def ann_suite(name: str, docs, ids, queries, pool, seconds: float, hnsw_efs, ivf_probes) -> dict:
    """In-process FAISS (raw index.search) for flat/HNSW/IVF: throughput, latency, recall@10."""
    out: dict = {}
    flat, _, _ = cached_index(name, docs, ids, AnnConfig(kind="flat"))
    exact_ids, _ = flat.search(queries, K)
    hnsw, hnsw_root, hnsw_build_s = cached_index(name, docs, ids, AnnConfig(kind="hnsw", hnsw_m=32, ef_construction=200))
    ivf, _, _ = cached_index(name, docs, ids, AnnConfig(kind="ivf", nlist=max(16, min(1024, len(docs) // 64))))
    out["hnsw_build_s"] = hnsw_build_s

    def raw(index: AnnIndex, params=None):
        return lambda q: index._index.search(q, K, params=params) if params is not None else index._index.search(q, K)

    for batch in (1, 64):
        out[f"faiss_flat_b{batch}"] = closed_loop(raw(flat), pool, batch, seconds)
        out[f"wrapper_flat_b{batch}"] = closed_loop(lambda q: flat.search(q, K), pool, batch, seconds)
    for ef in hnsw_efs:
        hnsw.set_search_params(ef_search=ef)
        out[f"hnsw_ef{ef}_recall10"] = recall_at_k(hnsw.search(queries, K)[0], exact_ids)
        for batch in (1, 64):
            out[f"faiss_hnsw_ef{ef}_b{batch}"] = closed_loop(raw(hnsw, hnsw._search_params(K)), pool, batch, seconds)
    for nprobe in ivf_probes:
        ivf.set_search_params(nprobe=nprobe)
        out[f"ivf_nprobe{nprobe}_recall10"] = recall_at_k(ivf.search(queries, K)[0], exact_ids)
        out[f"faiss_ivf_nprobe{nprobe}_b64"] = closed_loop(raw(ivf, ivf._search_params(K)), pool, 64, seconds)
    return out, flat, hnsw_root


def service_suite(index_root: str, root_url: str, pool: np.ndarray, seconds: float, tag: str) -> dict:
    """Deploy the service on ``index_root`` and measure the handle and HTTP paths."""
    from ray import serve
    from whetstone.index.client import IndexClient

    from services.index.app import IndexServiceArgs, deploy

    app, prefix = f"bench-{tag}", f"/bench-{tag}"
    # The replica's FAISS gets the same OpenMP threads as the in-process baseline (all cores).
    deploy(IndexServiceArgs(index_uri=index_root, num_cpus=1, batch_max_size=32, batch_wait_timeout_s=0.001,
                            max_ongoing_requests=256, search_threads=os.cpu_count()), name=app, route_prefix=prefix)
    out: dict = {}
    try:
        client = IndexClient.from_handle(app_name=app, timeout_s=60)
        for batch in (1, 64):
            for callers in (1, 8):
                out[f"handle_b{batch}_c{callers}"] = closed_loop(lambda q: client.search(q, K), pool, batch,
                                                                 seconds, callers)
        for batch in (1, 64):
            for clients in (1, 32):
                out[f"http_b{batch}_c{clients}"] = http_loop(root_url + prefix + "/search", pool, batch,
                                                             seconds, clients)
    finally:
        serve.delete(app)
    return out


def print_table(results: dict) -> None:
    print(f"\n{'dataset':10} {'path':28} {'qps':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for dataset, figures in results["datasets"].items():
        for key, value in figures.items():
            if isinstance(value, dict) and "qps" in value:
                print(f"{dataset:10} {key:28} {value['qps']:10.0f} {value['p50_ms']:8.2f} {value['p99_ms']:8.2f}")
            elif isinstance(value, float):
                print(f"{dataset:10} {key:28} {value:10.3f}")
    print("\nsummary:")
    for key, value in results["summary"].items():
        print(f"  {key:40} {value:.3f}" if isinstance(value, float) else f"  {key:40} {value}")


def summary(results: dict, goals_ef: int) -> dict:
    """Headline figures named after the issue's goals."""
    out: dict = {}
    ms, cl = results["datasets"].get("msmarco", {}), results["datasets"].get("clustered", {})
    if ms:
        best_handle = max(ms["handle_b64_c1"]["qps"], ms["handle_b64_c8"]["qps"])
        out["handle_vs_faiss_ratio_b64"] = best_handle / ms["faiss_flat_b64"]["qps"]
        out["handle_vs_faiss_ratio_b64_c1"] = ms["handle_b64_c1"]["qps"] / ms["faiss_flat_b64"]["qps"]
        out["http_p99_ms_c32"] = ms["http_b1_c32"]["p99_ms"]
        out["http_p99_ms_c32_b64"] = ms["http_b64_c32"]["p99_ms"]
        out["faiss_flat_qps_b64_msmarco"] = ms["faiss_flat_b64"]["qps"]
        out["faiss_hnsw_ef64_qps_b64_msmarco"] = ms["faiss_hnsw_ef64_b64"]["qps"]
        out["hnsw_recall10_msmarco"] = ms[f"hnsw_ef{goals_ef}_recall10"]
    if cl:
        out["hnsw_recall10_clustered"] = cl[f"hnsw_ef{goals_ef}_recall10"]
        out["hnsw_vs_flat_qps_ratio_clustered"] = cl[f"faiss_hnsw_ef{goals_ef}_b64"]["qps"] / cl["faiss_flat_b64"]["qps"]
        if "handle_b64_c8" in cl:
            best = max(cl["handle_b64_c1"]["qps"], cl["handle_b64_c8"]["qps"])
            out["handle_vs_faiss_ratio_b64_clustered_hnsw"] = best / cl[f"faiss_hnsw_ef{goals_ef}_b64"]["qps"]
            out["http_p99_ms_c32_clustered"] = cl["http_b1_c32"]["p99_ms"]
    out["goal_handle_ratio_ge_0.5"] = out.get("handle_vs_faiss_ratio_b64", 0) >= 0.5
    out["goal_http_p99_lt_50ms"] = out.get("http_p99_ms_c32", 1e9) < 50
    out["goal_hnsw_recall_ge_0.98_at_10x"] = (out.get("hnsw_recall10_clustered", 0) >= 0.98
                                              and out.get("hnsw_vs_flat_qps_ratio_clustered", 0) >= 10)
    return out


def write_results(results: dict, opts: argparse.Namespace) -> None:
    results["summary"] = summary(results, opts.ef)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2, default=float))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--synthetic-n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=0.06)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--ef", type=int, default=128, help="HNSW efSearch used for the goals")
    parser.add_argument("--skip", choices=["msmarco", "clustered"], action="append", default=[])
    parser.add_argument("--no-service", action="store_true", help="in-process figures only")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "index_service.json"))
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: dict = {"machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                                 "python": sys.version.split()[0], "platform": platform.platform(),
                                 "load_avg_at_start": os.getloadavg()},
                     "settings": vars(opts) | {"k": K}, "datasets": {}}
    root_url = None
    if not opts.no_service:
        import ray
        from ray import serve

        ray.init(address="local", num_cpus=8, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        root_url = f"http://127.0.0.1:{port}"
    try:
        datasets = []
        if "msmarco" not in opts.skip:
            docs, ids, queries = msmarco_vectors()
            datasets.append(("msmarco", docs, ids, queries, (64, 128, 256), (4, 8, 16, 32)))
        if "clustered" not in opts.skip:
            docs, ids, queries = clustered_vectors(opts.synthetic_n, opts.dim, opts.clusters, opts.spread, 1000)
            datasets.append(("clustered", docs, ids, queries, (64, 128, 256), (8, 16, 32, 64)))
        for name, docs, ids, queries, efs, probes in datasets:
            print(f"[{name}] {docs.shape[0]} x {docs.shape[1]}", flush=True)
            pool = np.ascontiguousarray(np.tile(queries, (max(1, 2048 // len(queries)) + 1, 1))[:2048])
            figures, flat, hnsw_root = ann_suite(name, docs, ids, queries, pool, opts.seconds, efs, probes)
            if root_url is not None:
                # The service serves what a deployment would: flat for the 5k corpus, HNSW at 200k.
                served = str(CACHE / "bench-index" / f"{name}-{len(docs)}-flat-m32-efc200-nlNone") \
                    if name == "msmarco" else hnsw_root
                figures |= service_suite(served, root_url, pool, opts.seconds, name)
            results["datasets"][name] = figures
            write_results(results, opts)  # partial results survive an interrupted run
    finally:
        if root_url is not None:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    write_results(results, opts)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
