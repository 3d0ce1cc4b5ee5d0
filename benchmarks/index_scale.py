"""Index at scale: a sharded index built from vector chunks in storage and served by shard replicas,
against one unsharded in-process FAISS index of the same kind and settings (issue 22).

Data. Clustered synthetic unit vectors (dim 384), N per ``--sizes``, generated batch by batch from
seeds and written to storage in chunks with ``VectorChunkWriter``, as a refresh writes what it
embedded (under ``--run-dir``, default ``.whetstone/bench/index_scale/``; reused by later runs,
never committed). The mixture is harder than the issue's (2,000 clusters, spread 0.06: IVF recall
1.000 at nprobe 8): 5,000 clusters, spread 0.065 by default (in-process IVF recall@10 at nprobe 8
measured 0.74 at 1M, 0.93 at 2M, but 0.995 at 5M, where nlist 4,096 gives about a cell per
cluster; ``--clusters 20000 --spread 0.07`` is far harder); how hard is measured and reported at every N (in-process IVF-Flat recall@10 at nprobe 8, mean gap between the exact 10th and 11th
scores), beside the issue's set at the smallest N. 1,000 held-out queries from the same mixture.
Exact ground truth: the library's chunked exact search over the chunks (``RunningTopK``, the
evaluation path), in its own process, whose peak RSS is ``eval_peak_rss_gib_1m_1000q``.

Per N and kind, in its own process before any Ray starts: the in-process baseline, one unsharded
``AnnIndex`` built from the chunks (the only process that holds all N vectors), its q/s at batch
64 through raw FAISS and its recall@10; for IVF kinds it sweeps nprobe and picks the smallest
reaching ``--target-recall`` (the sharded system then uses the same nlist and nprobe; its IVF is
trained once for all shards, so its shards hold the baseline's kind of cells, nlist for all N).

Per N, kind and S, on a fresh local Ray cluster: ``build_sharded_index`` (one Ray task per shard),
the index service with ``num_shards=S`` (deploy time = the replicas loading their shards), recall@10
through the handle, handle q/s at batch 64 with 8 callers (8 threads of the driver, and 4 caller
processes x 2 threads, as training workers call), flat sharded vs unsharded top-10 agreement, and
the peak RSS of every process of the system by role (``benchmarks.index_scale_memory``). At the
largest N, a refresh's swap under the same sampler: v2 built from the same vectors (a new IVF
training sample, so no shard file is reused), swapped in through the handle (every replica
holds v1 and v2 until all flip), searched again. After the cluster is gone, one shard's snapshot is loaded and written again in a process of its own:
the streaming load and write times of a shard.

Usage::

    python -m benchmarks.index_scale --quick          # 50k vectors, end to end in a few minutes
    python -m benchmarks.index_scale                  # 1M (flat, ivf, ivfpq; S=1,2,4); 2M and 5M (ivf, S=4,8)
    python -m benchmarks.index_scale --sizes 1000000,5000000 --large-shards 4 --no-swap --seconds 10

Results go to ``benchmarks/results/index_scale.json`` (``--out``); a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from whetstone.index.faiss_kinds import AnnConfig

from benchmarks import index_scale_data as data
from benchmarks.index_scale_data import GIB, K, in_subprocess, positions_of, recall10

REPO = Path(__file__).resolve().parents[1]
ISSUE_SET = {"clusters": 2000, "spread": 0.06}
BATCH = 64


# ------------------------------------------------------------------------------------ plan
def plan(sizes: list[int], kinds: list[str], shards: list[int], large_kinds: list[str], large_shards: list[int],
         pq_all_shards: bool) -> list[tuple[int, str, list[int]]]:
    """(N, kind, shard counts) to run: every kind and S at the smallest N (IVF-PQ at the largest S
    only unless ``pq_all_shards``: it is there for the bytes-per-vector table), only ``large_kinds``
    at ``large_shards`` above it (a 2-core machine cannot afford the full grid at 5M)."""
    out = []
    for n in sorted(sizes):
        smallest = n == min(sizes)
        for kind in kinds:
            if not smallest and kind not in large_kinds:
                continue
            if smallest:
                counts = sorted(shards) if kind != "ivfpq" or pq_all_shards else [max(shards)]
            else:
                counts = sorted(large_shards)
            out.append((n, kind, counts))
    return out


def ann_config(kind: str, n: int, nprobe: int | None = None, opts: argparse.Namespace | None = None) -> AnnConfig:
    """The same settings for the baseline and for every shard: nlist by ``nlist_for_size(N)``
    (per shard), nprobe from the baseline's sweep, PQ with D/8 sub-quantisers of 8 bits."""
    if kind == "flat":
        return AnnConfig(kind="flat", use_gpu=False)
    nlist = (opts.nlist if opts and opts.nlist else None) or data.nlist_for_size(n)
    return AnnConfig(kind=kind, nlist=nlist, nprobe=nprobe, use_gpu=False)


# ------------------------------------------------------------------------------------ sharded system
def search_all(client, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Every query through the handle in batches of 64: (positions (Q, 10), scores (Q, 10), versions)."""
    positions, scores, versions = [], [], set()
    for start in range(0, len(queries), BATCH):
        result = client.search(queries[start: start + BATCH], K)
        positions += [positions_of(row) for row in result.ids]
        scores.append(result.scores)
        versions.add(result.version)
    return np.stack(positions), np.concatenate(scores), versions


def flat_agreement(found: np.ndarray, found_scores: np.ndarray, unsharded: dict) -> dict:
    """Sharded vs unsharded flat top-10: shared ids, identical ordered lists, largest score gap."""
    ref, ref_scores = unsharded["top10_positions"], unsharded["top10_scores"]
    return {"top10_agreement": recall10(found, ref),
            "ordered_identical_share": float(np.mean([np.array_equal(a, b) for a, b in zip(found, ref, strict=True)])),
            "max_abs_score_diff": float(np.max(np.abs(found_scores - ref_scores)))}


def measure_service(app: str, queries: np.ndarray, truth: np.ndarray, seconds: float) -> dict:
    """Recall@10 through the handle and q/s at batch 64 with 8 callers, two ways."""
    from whetstone.index.client import IndexClient

    from benchmarks.index_service import caller_processes, closed_loop

    client = IndexClient.from_handle(app_name=app, timeout_s=120)
    out: dict = {}
    started = time.perf_counter()
    found, scores, versions = search_all(client, queries)
    out["recall_pass_s"] = time.perf_counter() - started
    out["recall10"] = recall10(found, truth)
    out["versions_seen"] = sorted(versions)
    # IVF over several shards: the ingress fetches the shared quantizer after its first search and
    # from then on finds each query's cells once for every shard; measure throughput with it
    first = client.stats()
    shares_cells = first.get("kind") in ("ivf", "ivfpq") and (first.get("num_shards") or 1) > 1
    deadline = time.monotonic() + 60
    while shares_cells and not client.stats().get("cells_assigned_at_ingress") and time.monotonic() < deadline:
        client.search(queries[:BATCH], K)
        time.sleep(0.5)
    pool = np.ascontiguousarray(np.tile(queries, (3, 1))[:2048])
    out["handle_b64_c8"] = closed_loop(lambda q: client.search(q, K), pool, BATCH, seconds, 8)
    out["handle_b64_workers4x2"] = caller_processes(app, pool, BATCH, seconds, processes=4, threads=2)
    out["handle_qps_b64"] = max(out["handle_b64_c8"]["qps"], out["handle_b64_workers4x2"]["qps"])
    stats = client.stats()
    out["served"] = {"version": stats.get("version"), "size": stats.get("size"), "num_shards": stats.get("num_shards"),
                     "cells_assigned_at_ingress": stats.get("cells_assigned_at_ingress")}
    return out | {"_found": found, "_scores": scores}


def shard_bounds(manifest) -> dict[int, float]:
    """Per shard: the issue's memory bound, 1.5 x (index + id map bytes) + 1 GiB."""
    return {e.shard: 1.5 * sum(f.bytes for f in e.files.values()) + GIB for e in manifest.shards}


def memory_figures(report: dict, bounds: dict[int, float]) -> dict:
    """Peak RSS vs the bound for shard replicas (their own shard), builders and the IVF trainer (the
    smallest shard's bound: a builder's title does not say its shard); the largest process of the system."""
    ratios = {}
    for row in report["processes"]:
        role = row["role"]
        if role.startswith("shard_replica:"):
            ratios[f"{role}[{row['pid']}]"] = row["peak_gib"] * GIB / bounds[int(role.split(":")[1])]
        elif role in ("shard_builder", "index_trainer"):
            ratios[f"{role}[{row['pid']}]"] = row["peak_gib"] * GIB / min(bounds.values())
    system = [r for r in report["processes"] if r["role"] != "caller"]
    return {"shard_peak_rss_vs_bound": max(ratios.values(), default=float("nan")), "shard_ratios": ratios,
            "max_process_peak_rss_gib": max((r["peak_gib"] for r in system), default=float("nan")),
            "max_process_role": system[0]["role"] if system else None,
            "bound_gib": {s: b / GIB for s, b in bounds.items()}}


def replica_peaks(report: dict) -> dict[str, float]:
    return {f"{row['role']}[{row['pid']}]": row["peak_gib"] for row in report["processes"]
            if row["role"].startswith("shard_replica:")}


def measure_swap(app: str, vectors_uri: str, index_root: Path, shards: int, config: AnnConfig,
                 queries: np.ndarray, truth: np.ndarray, sampler) -> dict:
    """A refresh's swap under the sampler: build v2 of the same vectors (its IVF training sample is
    drawn for v2, so every shard file differs from v1's and no replica can keep what it holds),
    swap to it through the handle (``--swap-mode blue_green``: the idle replica set loads v2, then
    the ingress flips and the old set drops v1; ``beside``: every replica loads v2 beside v1), then
    search it. Replica peaks before and after show what the swap costs each process."""
    from whetstone.index.build import build_sharded_index
    from whetstone.index.client import IndexClient
    from whetstone.index.snapshot import read_manifest

    before = replica_peaks(sampler.report())
    started = time.perf_counter()
    manifest = build_sharded_index(vectors_uri, str(index_root), 2, shards, config, checkpoint="benchmark-v2",
                                   set_latest=False, task_cpus=1.0)
    out: dict = {"rebuild_s": time.perf_counter() - started}
    v1 = {e.shard: e.fingerprint for e in read_manifest(str(index_root), 1).shards}
    out["shards_with_new_bytes"] = sum(e.fingerprint != v1[e.shard] for e in manifest.shards)
    client = IndexClient.from_handle(app_name=app, timeout_s=900)
    started = time.perf_counter()
    out["answer"] = client.swap(2)
    out["swap_s"] = time.perf_counter() - started
    found, _, versions = search_all(client, queries)
    out |= {"versions_after": sorted(versions), "recall10_after": recall10(found, truth)}
    after = replica_peaks(sampler.report())
    out["replica_peak_gib_before"], out["replica_peak_gib_after"] = before, after
    out["replica_peak_growth_gib"] = max(after[k] - before.get(k, 0.0) for k in after) if after else None
    return out


def sharded_suite(n: int, kind: str, shards: int, config: AnnConfig, vectors_uri: str, index_root: Path,
                  queries: np.ndarray, truth: np.ndarray, unsharded: dict | None, opts, swap: bool = False) -> dict:
    """Build, deploy and measure one (N, kind, S) on a fresh local Ray cluster (with ``swap``, then a
    swap to a second build under load-free conditions); then the shard round trip."""
    from ray import serve
    from whetstone.index.build import build_sharded_index
    from whetstone.index.wire import DEPLOYMENT_NAME

    from benchmarks.index_scale_memory import RolePeakSampler
    from benchmarks.index_service import serve_cluster
    from services.index.app import IndexServiceArgs, deploy

    shutil.rmtree(index_root, ignore_errors=True)
    app = f"scale-{kind}-s{shards}"
    out: dict = {"n": n, "kind": kind, "shards": shards, "config": config.model_dump(mode="json")}
    with serve_cluster("proxy"), RolePeakSampler(DEPLOYMENT_NAME, opts.sample_interval_s) as sampler:
        started = time.perf_counter()
        manifest = build_sharded_index(vectors_uri, str(index_root), 1, shards, config, checkpoint="benchmark",
                                       set_latest=True, task_cpus=1.0)
        out["build_s"] = time.perf_counter() - started
        out["build_roles"] = sampler.report()["roles"]
        out["shard_counts"] = [e.count for e in manifest.shards]
        out["shard_build_s"] = [e.build_s for e in manifest.shards]  # train / add / save, per shard
        out["shard_bytes"] = [{name: f.bytes for name, f in e.files.items()} for e in manifest.shards]
        index_bytes = sum(f.bytes for e in manifest.shards for f in e.files.values())
        out["bytes_per_vector"] = index_bytes / manifest.count
        started = time.perf_counter()
        # the local cluster has 8 logical CPUs: the router takes 1, the shard replicas share at most 6
        # (with 1 each, 8 shards could never all be placed and the deploy would wait forever); a
        # blue/green service has two replica sets
        sets = 2 if opts.swap_mode == "blue_green" else 1
        deploy(IndexServiceArgs(index_uri=str(index_root), num_shards=shards, replicas_per_shard=1,
                                swap_mode=opts.swap_mode, num_cpus=min(1.0, 6.0 / (shards * sets)),
                                router_cpus=1, search_threads=1, search_workers=os.cpu_count() or 1,
                                batch_max_size=32, max_ongoing_requests=256, shard_timeout_s=120,
                                swap_timeout_s=900),
               name=app, route_prefix=f"/{app}")
        out["deploy_s"] = time.perf_counter() - started  # replicas start and load their shards
        try:
            out |= measure_service(app, queries, truth, opts.seconds)
            if swap:
                out["swap"] = measure_swap(app, vectors_uri, index_root, shards, config, queries, truth, sampler)
        finally:
            serve.delete(app)
    found, scores = out.pop("_found"), out.pop("_scores")
    if unsharded is not None:
        out["flat_vs_unsharded"] = flat_agreement(found, scores, unsharded)
    out["memory"] = sampler.report()
    out |= memory_figures(out["memory"], shard_bounds(manifest))
    out["roundtrip_shard0"] = in_subprocess(data.shard_roundtrip, str(index_root), 1, 0)
    if not opts.keep_indexes:
        shutil.rmtree(index_root, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ one size
def run_size(n: int, kinds: list[tuple[str, list[int]]], opts, results: dict) -> None:
    """Data, ground truth, then per kind the baseline and every shard count, for N = ``n``
    (configurations a resumed run kept are skipped; their baselines are reused)."""
    kinds = [(kind, [s for s in counts if f"{n}/{kind}/S{s}" not in results["configs"]]) for kind, counts in kinds]
    if not any(counts for _, counts in kinds):
        print(f"[N={n:,}] every configuration kept from the earlier run", flush=True)
        return
    folder = Path(opts.run_dir) / f"n{n}-k{opts.clusters}-s{opts.spread}-seed{opts.seed}"
    vectors_uri = str(folder / "vectors")
    print(f"[N={n:,}] writing vectors to {vectors_uri}", flush=True)
    partitions = max((s for _, counts in kinds for s in counts), default=1)  # as a refresh for the largest S writes
    dataset: dict = results["datasets"].get(str(n), {}) | {"corpus": data.write_corpus(vectors_uri, n, opts.dim, opts.clusters, opts.spread, opts.seed,
                                                 partitions)}
    queries = np.load(folder / "queries.npy")
    print(f"[N={n:,}] exact ground truth (chunked, own process)", flush=True)
    truth = in_subprocess(data.ground_truth, vectors_uri, queries)
    dataset["ground_truth"] = {k: v for k, v in truth.items() if k not in ("positions", "scores")}
    results["datasets"][str(n)] = dataset
    for kind, shard_counts in kinds:
        if not shard_counts:
            continue
        config = ann_config(kind, n, opts=opts)
        base = results["baselines"].get(f"{n}/{kind}") if kind != "flat" else None
        unsharded: dict = {}
        if base is None:
            print(f"[N={n:,} {kind}] in-process baseline (own process)", flush=True)
            base = in_subprocess(data.baseline, vectors_uri, config.model_dump(mode="json"), queries,
                                 truth["positions"], opts.seconds, opts.repeats, opts.target_recall)
            unsharded = {k: base.pop(k) for k in ("top10_positions", "top10_scores") if k in base}
        results["baselines"][f"{n}/{kind}"] = base
        if kind == "ivf":  # how hard the set is at this N, as the issue measured its own
            dataset["hardness"] = {"ivf_nlist": base["config"]["nlist"], "ivf_recall10_nprobe8": base["recall10_nprobe8"],
                                   "gap_10_11_mean": truth["gap_10_11_mean"]}
        if kind != "flat":
            config = ann_config(kind, n, base["chosen_nprobe"], opts)
        write_results(results, opts)
        for shards in shard_counts:
            name = f"{n}/{kind}/S{shards}"
            print(f"[{name}] build, deploy, measure", flush=True)
            try:
                figures = sharded_suite(n, kind, shards, config, vectors_uri, folder / f"index-{kind}-s{shards}",
                                        queries, truth["positions"], unsharded if kind == "flat" else None, opts,
                                        swap=opts.swap and n == max(opts.sizes))
            except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
                results["failures"][name] = f"{type(err).__name__}: {err}"[:4000]
                print(f"[{name}] FAILED: {results['failures'][name][:500]}", flush=True)
                continue
            figures["handle_vs_inprocess_ratio_b64"] = figures["handle_qps_b64"] / base["faiss_b64"]["qps"]
            results["configs"][name] = figures
            write_results(results, opts)
    if not opts.keep_data:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ summary
ISSUE_SHARDS = (1, 2, 4)  # the issue's grid; larger S are measured too and reported beside it


def headline(results: dict) -> tuple[int, dict | None, dict | None]:
    """N max and, at it, the configuration the headline figures come from: IVF (else the first
    kind) at the largest S of the issue's grid (``ISSUE_SHARDS``; the largest S measured when none
    is), with its baseline."""
    configs = results["configs"]
    if not configs:
        return 0, None, None
    n_max = max(c["n"] for c in configs.values())
    at_max = [c for c in configs.values() if c["n"] == n_max]
    kind = "ivf" if any(c["kind"] == "ivf" for c in at_max) else at_max[0]["kind"]
    candidates = [c for c in at_max if c["kind"] == kind]
    in_grid = [c for c in candidates if c["shards"] in ISSUE_SHARDS]
    best = max(in_grid or candidates, key=lambda c: c["shards"])
    return n_max, best, results["baselines"][f"{n_max}/{kind}"]


def beyond_grid(results: dict, n_max: int) -> dict:
    """The headline figures of the configurations at N max with more shards than the issue's grid."""
    return {f"{c['n']}/{c['kind']}/S{c['shards']}": {
        key: c[key] for key in ("recall10", "handle_qps_b64", "handle_vs_inprocess_ratio_b64",
                                "max_process_peak_rss_gib", "shard_peak_rss_vs_bound", "build_s", "deploy_s")}
        for c in results["configs"].values() if c["n"] == n_max and c["shards"] > max(ISSUE_SHARDS)}


def summary(results: dict) -> dict:
    n_max, best, base = headline(results)
    configs = list(results["configs"].values())
    flat = [c for c in configs if "flat_vs_unsharded" in c]
    flat_n = min((c["n"] for c in flat), key=lambda n: abs(n - 1_000_000), default=None)
    eval_ns = sorted(int(n) for n in results["datasets"])
    eval_n = min(eval_ns, key=lambda n: abs(n - 1_000_000), default=None)
    out: dict = {
        "n_max": n_max,
        "headline_config_at_n_max": f"{n_max}/{best['kind']}/S{best['shards']}" if best else None,
        "recall10_at_n_max": best["recall10"] if best else None,
        "flat_sharded_vs_unsharded_top10_agreement": min(
            (c["flat_vs_unsharded"]["top10_agreement"] for c in flat if c["n"] == flat_n), default=None),
        "flat_agreement_measured_at_n": flat_n,
        "shard_peak_rss_vs_bound": max((c["shard_peak_rss_vs_bound"] for c in configs), default=None),
        "max_process_peak_rss_gib_at_n_max": best["max_process_peak_rss_gib"] if best else None,
        "handle_vs_inprocess_ratio_b64_at_n_max": best["handle_vs_inprocess_ratio_b64"] if best else None,
        "handle_qps_b64_at_n_max": best["handle_qps_b64"] if best else None,
        "inprocess_qps_b64_at_n_max": base["faiss_b64"]["qps"] if base else None,
        "build_s_at_n_max": best["build_s"] if best else None,
        # The build's own chunked writes (the slowest shard's), not a re-write after the fact.
        "snapshot_write_s_at_n_max": max(b["save_s"] for b in best["shard_build_s"]) if best else None,
        "snapshot_rewrite_s_standalone_at_n_max": best["roundtrip_shard0"]["write_s"] if best else None,
        "snapshot_load_s_at_n_max": best["deploy_s"] if best else None,  # replicas start and load, in parallel
        "shard_load_s_standalone_at_n_max": best["roundtrip_shard0"]["load_s"] if best else None,
        "eval_peak_rss_gib_1m_1000q": results["datasets"][str(eval_n)]["ground_truth"]["peak_rss_gib"]
        if eval_n else None,
        "eval_measured_at_n": eval_n,
        # per configuration: the worst process against its bound (a swap's two versions included)
        "shard_peak_rss_vs_bound_by_config": {f"{c['n']}/{c['kind']}/S{c['shards']}": c["shard_peak_rss_vs_bound"]
                                              for c in configs},
    }
    out["beyond_issue_grid_at_n_max"] = beyond_grid(results, n_max)
    swap = (best or {}).get("swap")
    if swap:
        out |= {"swap_s_at_n_max": swap["swap_s"], "rebuild_s_at_n_max": swap["rebuild_s"],
                "recall10_after_swap_at_n_max": swap["recall10_after"],
                "swap_replica_peak_growth_gib_at_n_max": swap["replica_peak_growth_gib"]}
    if base and "recall10_nprobe8" in base:
        out["hardness_at_n_max"] = {"ivf_recall10_nprobe8_inprocess": base["recall10_nprobe8"],
                                    "gap_10_11_mean": results["datasets"][str(n_max)]["ground_truth"]["gap_10_11_mean"]}
    out["goals"] = goals(out)
    return out


def goals(s: dict) -> dict:
    """Each goal of the issue: the figure, the goal, met or missed (None: not measured)."""
    def check(value, ok):
        return {"value": value, "met": None if value is None else bool(ok(value))}

    return {
        "n_max >= 5,000,000": check(s["n_max"] or None, lambda v: v >= 5_000_000),
        "recall10_at_n_max >= 0.95": check(s["recall10_at_n_max"], lambda v: v >= 0.95),
        "flat_sharded_vs_unsharded_top10_agreement == 1.0": check(
            s["flat_sharded_vs_unsharded_top10_agreement"], lambda v: v == 1.0),
        "shard_peak_rss_vs_bound <= 1.0": check(s["shard_peak_rss_vs_bound"], lambda v: v <= 1.0),
        "max_process_peak_rss_gib_at_n_max <= 4": check(s["max_process_peak_rss_gib_at_n_max"], lambda v: v <= 4),
        "handle_vs_inprocess_ratio_b64_at_n_max >= 0.5": check(s["handle_vs_inprocess_ratio_b64_at_n_max"],
                                                               lambda v: v >= 0.5),
    }


def print_table(results: dict) -> None:
    print(f"\n{'config':22} {'nprobe':>6} {'recall10':>8} {'handle q/s':>10} {'in-proc q/s':>11} {'ratio':>6} "
          f"{'build s':>8} {'deploy s':>8} {'shard0 load/write s':>19} {'B/vec':>6} {'max RSS GiB':>11} "
          f"{'RSS/bound':>9}")
    for name, c in results["configs"].items():
        base = results["baselines"][f"{c['n']}/{c['kind']}"]
        trip = c["roundtrip_shard0"]
        print(f"{name:22} {c['config']['nprobe'] or '-':>6} {c['recall10']:8.3f} {c['handle_qps_b64']:10.0f} "
              f"{base['faiss_b64']['qps']:11.0f} {c['handle_vs_inprocess_ratio_b64']:6.2f} {c['build_s']:8.1f} "
              f"{c['deploy_s']:8.1f} {trip['load_s']:9.2f}/{trip['write_s']:<9.2f} {c['bytes_per_vector']:6.0f} "
              f"{c['max_process_peak_rss_gib']:11.2f} {c['shard_peak_rss_vs_bound']:9.2f}")
    for name, c in results["configs"].items():
        if "swap" in c:
            w = c["swap"]
            print(f"{name:22} swap to v2: rebuild {w['rebuild_s']:.1f} s, swap {w['swap_s']:.1f} s, recall10 after "
                  f"{w['recall10_after']:.3f}, versions after {w['versions_after']}, replica peak growth "
                  f"{w['replica_peak_growth_gib']:.2f} GiB")
    for n, dataset in results["datasets"].items():
        truth = dataset["ground_truth"]
        print(f"N={int(n):,}: exact search {truth['seconds']:.1f} s, peak RSS {truth['peak_rss_gib']:.2f} GiB; "
              f"hardness {dataset.get('hardness', {})}")
    if "issue_set_hardness" in results:
        print(f"issue's set: {results['issue_set_hardness']}")
    for name, error in results["failures"].items():
        print(f"{name:22} FAILED: {error[:300]}")
    print("\nsummary:")
    for key, value in results["summary"].items():
        if key == "goals":
            for goal, verdict in value.items():
                print(f"  goal {goal:58} {'met' if verdict['met'] else 'MISSED' if verdict['met'] is False else 'n/a'}")
        else:
            print(f"  {key:44} {value:.4g}" if isinstance(value, float) else f"  {key:44} {value}")


def write_results(results: dict, opts: argparse.Namespace) -> None:
    results["summary"] = summary(results)
    results["machine"]["load_avg_now"] = os.getloadavg()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return float(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda text: [int(float(x)) for x in text.split(",") if x]  # noqa: E731 - "1e6,5e6" works too
    words = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[1_000_000, 2_000_000, 5_000_000])
    parser.add_argument("--shards", type=ints, default=[1, 2, 4])
    parser.add_argument("--kinds", type=words, default=["flat", "ivf", "ivfpq"])
    parser.add_argument("--large-kinds", type=words, default=["ivf"], help="kinds run above the smallest size")
    parser.add_argument("--large-shards", type=ints, default=[4, 8], help="shard counts above the smallest size")
    parser.add_argument("--no-swap", dest="swap", action="store_false",
                        help="skip the swap to a second build at the largest size")
    parser.add_argument("--swap-mode", choices=["beside", "blue_green"], default="blue_green",
                        help="the service's swap_mode (blue_green: no shard process holds two versions)")
    parser.add_argument("--pq-all-shards", action="store_true", help="IVF-PQ at every S (default: the largest)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each in-process baseline way (median kept)")
    parser.add_argument("--clusters", type=int, default=5_000)
    parser.add_argument("--spread", type=float, default=0.065)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells per shard (default by N)")
    parser.add_argument("--target-recall", type=float, default=0.96, help="the baseline's nprobe sweep picks the "
                        "smallest nprobe reaching this (a margin over the goal of 0.95)")
    parser.add_argument("--no-issue-set", action="store_true", help="skip measuring the issue's set's hardness")
    parser.add_argument("--sample-interval-s", type=float, default=0.2)
    parser.add_argument("--run-dir", default=str(data.default_run_dir(REPO)))
    parser.add_argument("--keep-data", action="store_true", default=True)
    parser.add_argument("--drop-data", dest="keep_data", action="store_false", help="delete the vectors after")
    parser.add_argument("--keep-indexes", action="store_true")
    parser.add_argument("--quick", action="store_true", help="50k vectors, 2,000 clusters, S=1,4, 3 s windows")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true", help="keep the configurations already in --out")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.sizes, opts.shards, opts.clusters, opts.seconds, opts.repeats = [50_000], [1, 4], 2000, 3.0, 1
    # a quick run's figures are for development: they go beside its data, not to the results
    opts.out = opts.out or str(Path(opts.run_dir) / "index_scale_quick.json" if opts.quick
                               else REPO / "benchmarks" / "results" / "index_scale.json")
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict = {"machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                                 "python": sys.version.split()[0], "platform": platform.platform(),
                                 "load_avg_at_start": os.getloadavg()},
                     "settings": vars(opts) | {"k": K, "batch": BATCH}, "datasets": {}, "baselines": {},
                     "configs": {}, "failures": {}}
    started = time.perf_counter()
    if opts.resume and Path(opts.out).is_file():  # keep what an interrupted run measured
        kept = json.loads(Path(opts.out).read_text())
        for key in ("datasets", "baselines", "configs", "issue_set_hardness"):
            if key in kept:
                results[key] = kept[key]
        print(f"resuming: {len(results['configs'])} configurations kept from {opts.out}", flush=True)
    if not opts.no_issue_set and "issue_set_hardness" not in results:
        probe_n = min(opts.sizes)
        print(f"[issue set] hardness of 2,000 clusters / spread 0.06 at N={probe_n:,}", flush=True)
        results["issue_set_hardness"] = in_subprocess(data.issue_set_hardness, probe_n, opts.dim, **ISSUE_SET)
    by_size: dict[int, list] = {}
    for n, kind, counts in plan(opts.sizes, opts.kinds, opts.shards, opts.large_kinds, opts.large_shards,
                                opts.pq_all_shards):
        by_size.setdefault(n, []).append((kind, counts))
        print(f"plan: N={n:,} {kind} S={counts}", flush=True)
    for n, kinds in by_size.items():
        run_size(n, kinds, opts, results)
    results["wall_s"] = time.perf_counter() - started
    write_results(results, opts)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
