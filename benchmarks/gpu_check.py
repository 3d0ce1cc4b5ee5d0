"""GPU path, end to end, in a few minutes: run it whenever a GPU machine is at hand (``benchmarks/gpu_check.sh``).

What it does, on clustered synthetic unit vectors (``benchmarks.index_service.clustered_vectors``:
``--n`` documents, 384-d, 2,000 centres, spread 0.06, and ``--queries`` queries from the same mixture):

1. exact top-10 ground truth on the CPU by the evaluation's chunked search
   (``whetstone.eval.retrieval.RunningTopK``);
2. writes the vectors to storage in chunks (``VectorChunkWriter``), as a refresh does;
3. for each kind (flat, IVF-Flat): builds the sharded index (``build_sharded_index``, ``--shards``
   shards, CPU build tasks as in the job with ``index.use_gpu=true``), loads every shard back
   (``load_shard``) once onto the GPU and once on the CPU, and searches both in-process at batch
   64, merging the shards' top 10 as the service's router does;
4. serves the flat index with the service's ``use_gpu`` (each shard replica asks Ray for
   ``1/shards`` of the GPU), searches through the Serve handle at batch 64, and checks that every
   shard replica's process holds GPU memory (``nvidia-smi``) and that answers carry the version;
5. embeds a small corpus (``--embed-docs``) with MiniLM through the refresh's embedding actors
   (``embedded_batches(num_gpus=1)``, half precision) and on the CPU in float32.

Checks (exit 1 when one fails, 2 when this machine has no usable GPU FAISS): flat recall@10 vs
exact >= 0.99 on GPU in-process and through the service; IVF recall@10 on GPU within 0.03 of the
CPU-loaded shards' and >= ``--min-ivf-recall``; the service's recall within 0.01 of in-process GPU; every
shard replica on the GPU; the embedding actor on the GPU (holding GPU memory) and its vectors within
cosine 0.99 of the CPU's. Figures are printed as a table and written to ``--out`` as JSON.

Usage::

    benchmarks/gpu_check.sh                         # defaults: 500,000 vectors, 2 shards (~3 min on one H200)
    benchmarks/gpu_check.sh --n 2000000 --shards 4  # bigger
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 10
NO_GPU = 2  # exit status: this machine cannot run the check (no GPU, or FAISS without GPU support)


def preflight() -> int:
    """FAISS with GPU support and at least one visible GPU; else say why and exit NO_GPU."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        fail(f"FAISS {faiss.__version__} here has no GPU support: install the `gpu` extra "
             "(pip install '.[models,gpu]' or make install FAISS_EXTRA=gpu) in place of faiss-cpu", NO_GPU)
    gpus = faiss.get_num_gpus()
    if gpus < 1:
        fail("FAISS has GPU support but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)", NO_GPU)
    return gpus


def fail(message: str, status: int = 1) -> None:
    print(f"gpu_check: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def recall(found: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(f[:K]) & set(e[:K])) / K for f, e in zip(found, exact, strict=True)]))


def agreement(a: list[list[str]], b: list[list[str]]) -> float:
    """Share of top-10 ids two rankings have in common (order aside)."""
    return recall(a, b)


def exact_top(queries: np.ndarray, docs: np.ndarray, ids: list[str]) -> tuple[list[list[str]], float]:
    from whetstone.eval.retrieval import RunningTopK, doc_chunks

    started = time.monotonic()
    top = RunningTopK(queries, K)
    for chunk_ids, chunk in doc_chunks(ids, docs):
        top.add(chunk_ids, chunk)
    return [list(row) for row in top.ids], time.monotonic() - started


def write_vectors(root: str, docs: np.ndarray, ids: list[str]) -> tuple[str, float]:
    from whetstone.index.vector_chunks import VectorChunkWriter

    started = time.monotonic()
    uri = os.path.join(root, "vectors", "v1")
    writer = VectorChunkWriter(uri, docs.shape[1])
    for start in range(0, len(ids), 65536):
        writer.write(ids[start:start + 65536], docs[start:start + 65536])
    writer.close()
    return uri, time.monotonic() - started


def sharded_search(index_root: str, version: int, queries: np.ndarray, gpu: bool) -> tuple[list[list[str]], float, float]:
    """Load every shard of ``version`` (onto the GPU or kept on the CPU) and search them in-process
    at batch 64, merged by score as the service's router merges them.

    Returns (ids per query, load seconds, queries per second)."""
    from whetstone.index.merge import merge_topk
    from whetstone.index.shard_io import load_shard
    from whetstone.index.snapshot import read_manifest

    started = time.monotonic()
    manifest = read_manifest(index_root, version)
    shards = [load_shard(index_root, manifest, shard, use_gpu=gpu) for shard in range(manifest.num_shards)]
    loaded = time.monotonic() - started
    started = time.monotonic()
    found: list[list[str]] = []
    for start in range(0, len(queries), 64):
        batch = queries[start:start + 64]
        found.extend(merge_topk([shard.search(batch, K) for shard in shards], K)[0])
    qps = len(queries) / (time.monotonic() - started)
    return found, loaded, qps


def build(vectors_uri: str, root: str, version: int, kind: str, args, gpu: bool) -> float:
    """Build the sharded index as the job does (its shard builders run on CPU; ``gpu`` is the job's
    ``index.use_gpu``, recorded in the manifest for whoever loads the shards)."""
    from whetstone.config.contrastive import IndexBuildConfig
    from whetstone.index.build import build_sharded_index

    settings = IndexBuildConfig(kind=kind, nlist=args.nlist if kind != "flat" else None,
                                nprobe=args.nprobe if kind != "flat" else None, num_shards=args.shards,
                                use_gpu=gpu)
    config = settings.ann_config()  # what the job builds with: use_gpu "auto" (GPU when one is visible) or False
    started = time.monotonic()
    build_sharded_index(vectors_uri, root, version, args.shards, config, "gpu-check", set_latest=True)
    return time.monotonic() - started


def gpu_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return {int(line) for line in out.split() if line.strip().isdigit()}


def serve_check(index_root: str, version: int, queries: np.ndarray, args) -> dict:
    """Deploy the service with use_gpu on ``index_root`` and search it through the handle."""
    import ray
    from ray import serve
    from whetstone.index.client import IndexClient

    from services.index.app import IndexServiceArgs, deploy, start_serve

    gpu = not args.plumbing_on_cpu
    ray.init(num_cpus=max(4, os.cpu_count() or 4), num_gpus=int(gpu), include_dashboard=False, log_to_driver=False)
    try:
        start_serve("127.0.0.1", args.port)
        started = time.monotonic()
        deploy(IndexServiceArgs(index_uri=index_root, num_shards=args.shards, use_gpu=gpu,
                                gpus_per_replica=round(1.0 / args.shards, 4), num_cpus=1.0))
        deploy_s = time.monotonic() - started
        client = IndexClient.from_handle(timeout_s=60.0)
        found, versions = [], set()
        started = time.monotonic()
        for start in range(0, len(queries), 64):
            result = client.search(queries[start:start + 64], k=K)
            versions.add(result.version)
            found.extend(result.ids)
        qps = len(queries) / (time.monotonic() - started)
        stats = client.stats()
        replica_pids = [replica["pid"] for shard in stats.get("shards", []) for replica in shard.get("replicas", [])]
        on_gpu = gpu_pids() if gpu and shutil.which("nvidia-smi") else set()
        return {"found": found, "versions": sorted(versions), "deploy_s": deploy_s, "qps_b64_one_caller": qps,
                "replica_pids": replica_pids, "replicas_on_gpu": [pid in on_gpu for pid in replica_pids]}
    finally:
        serve.shutdown()
        ray.shutdown()


def embed_check(root: str, args) -> dict:
    """The refresh's embedding actors on the GPU: ``embedded_batches`` with ``num_gpus=1`` (half
    precision) over a small corpus with MiniLM, against the same actors on the CPU in float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from whetstone.models.assets import resolve_model_path
    from whetstone.train.refresh import embedded_batches

    gpu = not args.plumbing_on_cpu
    store = os.path.join(root, "embed-store")
    os.makedirs(os.path.join(store, "corpus"), exist_ok=True)
    rng = np.random.default_rng(0)
    words = [f"term{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words, size=40)) for _ in range(args.embed_docs)]
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "title": [""] * len(texts),
                             "text": texts}), os.path.join(store, "corpus", "part-0.parquet"))
    model = resolve_model_path("all-MiniLM-L6-v2")
    ray.init(num_cpus=max(4, os.cpu_count() or 4), num_gpus=int(gpu), include_dashboard=False, log_to_driver=False)
    try:
        out: dict = {"docs": len(texts)}
        vectors: dict[str, dict[str, np.ndarray]] = {}
        for place, num_gpus in (("gpu", 1.0 if gpu else 0.0), ("cpu", 0.0)):
            started, pids, got = time.monotonic(), set(), {}
            for ids, batch in embedded_batches(store, model, batch_size=128, max_length=128, concurrency=1,
                                               num_gpus=num_gpus):
                got.update(zip(ids, batch, strict=True))
                if place == "gpu" and gpu and not pids and shutil.which("nvidia-smi"):
                    pids = gpu_pids()  # the embedding actor holds GPU memory while it runs
            out[f"{place}_docs_per_s"] = round(len(got) / (time.monotonic() - started), 1)
            out[f"{place}_process_on_gpu"] = bool(pids)
            vectors[place] = got
        cosines = [float(vectors["gpu"][i] @ vectors["cpu"][i]) for i in vectors["cpu"]]
        out["min_cosine_gpu_fp16_vs_cpu_fp32"] = round(min(cosines), 6)
        out["rows_match"] = sorted(vectors["gpu"]) == sorted(vectors["cpu"])
        return out
    finally:
        ray.shutdown()


def run(args) -> tuple[dict, list[str]]:
    from benchmarks.index_service import clustered_vectors

    gpus = 0 if args.plumbing_on_cpu else preflight()
    figures: dict = {"n": args.n, "dim": args.dim, "shards": args.shards, "queries": args.queries, "gpus": gpus}
    failures: list[str] = []
    t = time.monotonic()
    docs, ids, queries = clustered_vectors(args.n, args.dim, 2000, 0.06, args.queries, seed=0)
    figures["generate_s"] = round(time.monotonic() - t, 1)
    exact, figures["exact_cpu_s"] = exact_top(queries, docs, ids)
    root = args.workdir or tempfile.mkdtemp(prefix="whetstone-gpu-check-")
    vectors_uri, figures["write_vectors_s"] = write_vectors(root, docs, ids)
    del docs  # from here on only the chunks in storage, as in a refresh
    for kind in ("flat", "ivf"):
        index_root = os.path.join(root, kind)
        row: dict = {"build_s": build(vectors_uri, index_root, 1, kind, args, not args.plumbing_on_cpu)}
        for place, gpu in (("gpu", not args.plumbing_on_cpu), ("cpu", False)):
            found, row[f"load_{place}_s"], row[f"inprocess_qps_b64_{place}"] = sharded_search(index_root, 1, queries, gpu)
            row[f"recall10_{place}"] = recall(found, exact)
            row[f"found_{place}"] = found
        row["gpu_vs_cpu_top10_agreement"] = agreement(row.pop("found_gpu"), row.pop("found_cpu"))
        figures[kind] = row
    flat, ivf = figures["flat"], figures["ivf"]
    if flat["recall10_gpu"] < 0.99:
        failures.append(f"flat on GPU: recall@10 {flat['recall10_gpu']:.4f} < 0.99 against exact search")
    if abs(ivf["recall10_gpu"] - ivf["recall10_cpu"]) > 0.03:
        failures.append(f"ivf: GPU recall@10 {ivf['recall10_gpu']:.4f} vs CPU {ivf['recall10_cpu']:.4f} (> 0.03 apart)")
    if ivf["recall10_gpu"] < args.min_ivf_recall:
        failures.append(f"ivf on GPU: recall@10 {ivf['recall10_gpu']:.4f} < {args.min_ivf_recall}")
    served = serve_check(os.path.join(root, "flat"), 1, queries, args)
    served_recall = recall(served.pop("found"), exact)
    figures["service_flat"] = {**served, "recall10": served_recall}
    if served_recall < 0.99 or served_recall < flat["recall10_gpu"] - 0.01:
        failures.append(f"service (use_gpu) flat recall@10 {served_recall:.4f}, in-process GPU {flat['recall10_gpu']:.4f}")
    if served["versions"] != [1]:
        failures.append(f"service answered versions {served['versions']}, expected [1]")
    if len(served["replica_pids"]) < args.shards:
        failures.append(f"/stats lists {len(served['replica_pids'])} shard replicas for {args.shards} shards")
    if not args.plumbing_on_cpu and shutil.which("nvidia-smi") and not all(served["replicas_on_gpu"]):
        failures.append(f"shard replicas {served['replica_pids']} on the GPU: {served['replicas_on_gpu']} "
                        "(a replica without GPU memory kept its shard on the CPU)")
    embed = figures["embed"] = embed_check(root, args)
    if not embed["rows_match"] or embed["min_cosine_gpu_fp16_vs_cpu_fp32"] < 0.99:
        failures.append(f"embedding on the GPU: rows match {embed['rows_match']}, min cosine to CPU float32 "
                        f"{embed['min_cosine_gpu_fp16_vs_cpu_fp32']} (< 0.99)")
    if not args.plumbing_on_cpu and shutil.which("nvidia-smi") and not embed["gpu_process_on_gpu"]:
        failures.append("the embedding actor that asked Ray for a GPU held no GPU memory (it embedded on the CPU)")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return figures, failures


def print_table(figures: dict) -> None:
    print(f"\nGPU check: {figures['n']:,} x {figures['dim']} clustered vectors, {figures['shards']} shards, "
          f"{figures['queries']} queries, {figures['gpus']} GPU(s)")
    print(f"{'kind':6} {'build s':>8} {'load gpu s':>11} {'load cpu s':>11} {'q/s gpu':>10} {'q/s cpu':>10} "
          f"{'R@10 gpu':>9} {'R@10 cpu':>9} {'agree':>7}")
    for kind in ("flat", "ivf"):
        r = figures[kind]
        print(f"{kind:6} {r['build_s']:8.1f} {r['load_gpu_s']:11.1f} {r['load_cpu_s']:11.1f} "
              f"{r['inprocess_qps_b64_gpu']:10.0f} "
              f"{r['inprocess_qps_b64_cpu']:10.0f} {r['recall10_gpu']:9.4f} {r['recall10_cpu']:9.4f} "
              f"{r['gpu_vs_cpu_top10_agreement']:7.4f}")
    s = figures["service_flat"]
    print(f"service (flat, use_gpu): deploy {s['deploy_s']:.1f} s, {s['qps_b64_one_caller']:.0f} q/s at batch 64 "
          f"(one caller), recall@10 {s['recall10']:.4f}, replicas on GPU {s['replicas_on_gpu']}")
    e = figures["embed"]
    print(f"embedding actors (MiniLM, {e['docs']} docs): GPU fp16 {e['gpu_docs_per_s']} docs/s (on GPU: "
          f"{e['gpu_process_on_gpu']}), CPU fp32 {e['cpu_docs_per_s']} docs/s, min cosine {e['min_cosine_gpu_fp16_vs_cpu_fp32']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500_000, help="documents")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--nlist", type=int, default=1024, help="IVF cells per shard")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--min-ivf-recall", type=float, default=0.9)
    parser.add_argument("--embed-docs", type=int, default=4000, help="corpus of the embedding actors' check")
    parser.add_argument("--port", type=int, default=8123, help="Serve HTTP port")
    parser.add_argument("--workdir", default=None, help="keep the vectors and indexes here (default: a temp dir)")
    parser.add_argument("--plumbing-on-cpu", action="store_true",
                        help="test this script without a GPU: every 'gpu' step runs on CPU, GPU checks skipped")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_check.json"))
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures, failures = run(args)
    figures["total_s"] = round(time.monotonic() - started, 1)
    figures["failures"] = failures
    print_table(figures)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2, default=float))
    print(f"figures: {args.out} ({figures['total_s']} s)")
    for failure in failures:
        print(f"gpu_check: FAIL: {failure}", file=sys.stderr)
    print("gpu_check: OK" if not failures else f"gpu_check: {len(failures)} check(s) failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
