"""End-to-end training at corpus scale: 1,000,000 documents and 1,000,000 pairs on this machine.

What it runs (twice: ``--docs`` documents and pairs, then the same at ``--small-docs``, the
baseline), each in a fresh local Ray with every process's peak RSS sampled
(``benchmarks.index_scale_memory.RolePeakSampler``: the kernel's own high-water mark per process):

- a synthetic corpus generated under the run folder (deterministic: ``--seed``): ``--topics``
  topics, each with its own 40-word vocabulary out of 20,000 words; a document is 9 words of its
  topic and 3 common ones, a query 3 words of its positive document plus 3 of its topic, so
  documents of one topic are each other's near neighbours (hard negatives exist);
- the contrastive job (``jobs.train_contrastive``): a tiny random-init encoder (2 layers, width
  32, MiniLM's tokenizer), 2 Train workers, a 2-shard flat index served by Ray Serve, live hard
  negatives, partial refresh (``refresh.fraction``, default 0.1) every ``--every-steps`` steps,
  document texts from the lookup partitions, pairs streamed from storage.

Sizing the staleness bound: requests merge while a refresh runs, so a refresh starts as soon as the
last one ends and the lag peaks at about twice a refresh's duration in steps (the version being
replaced was embedded one refresh before the one being published). Here the embedding shares 2
cores with training at a lower priority: with f = 0.25 a refresh (~256k documents) spanned ~800
steps and the lag peaked at 1,349; with f = 0.1 (~121k) ~600 steps, peaking at 1,257 (both
2026-12-05, the bounds then 800 and 1,000 passed). Hence f = 0.1 and a bound of 1,500.

Figures (``summary``): ``docs``; ``fallback_steps`` (goal 0); ``max_steps_behind`` (within the
configured bound); ``data_wait_fraction`` (goal <= 0.05); ``worker_peak_rss_gib_delta_vs_small``
(the large run's Train-worker peak minus the small run's; goal <= 0.25);
``max_process_peak_rss_gib`` (goal <= 6); ``refresh_docs_per_s`` and ``full_refresh_s_estimate``
(N / that rate plus a refresh's build and swap); ``index_negative_step_share``;
``train_throughput_during_refresh_ratio`` (pairs/s of steps that ran while a refresh embedded, over
pairs/s of steps while none ran; goal >= 0.7).

Usage::

    python -m benchmarks.scale_train                       # 1M docs and pairs, then 2,000 (~40 min on 2 cores)
    python -m benchmarks.scale_train --docs 200000 --steps 600   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"fallback_steps": ("<=", 0), "data_wait_fraction": ("<=", 0.05),
         "worker_peak_rss_gib_delta_vs_small": ("<=", 0.25), "max_process_peak_rss_gib": ("<=", 6.0),
         "train_throughput_during_refresh_ratio": (">=", 0.7)}


def words(ids: np.ndarray) -> list[str]:
    return [f"w{i}" for i in ids]


def generate_store(root: Path, docs: int, pairs: int, topics: int, seed: int) -> str:
    """Write a store (corpus and pairs/train shards plus a manifest) under ``root``; returns its path."""
    import pyarrow as pa
    from whetstone.data import schemas as S
    from whetstone.data.store import ShardWriter, new_manifest, write_manifest

    rng = np.random.default_rng(seed)
    vocab, per_topic = 20_000, 40
    topic_words = rng.integers(0, vocab, size=(topics, per_topic))
    doc_topic = rng.integers(0, topics, size=docs)
    store = str(root)
    corpus = ShardWriter(store, "corpus", S.CORPUS_SCHEMA, rows_per_shard=50_000)
    pair_writer = ShardWriter(store, "pairs/train", S.PAIRS_SCHEMA, rows_per_shard=10_000)
    block = 100_000
    doc_words: dict[int, np.ndarray] = {}
    for start in range(0, docs, block):
        n = min(block, docs - start)
        own = topic_words[doc_topic[start:start + n, None], rng.integers(0, per_topic, size=(n, 9))]
        common = rng.integers(0, vocab, size=(n, 3))
        grid = np.concatenate([own, common], axis=1)
        doc_words[start] = grid
        corpus.add_table(pa.table({S.DOC_ID: [f"d{start + i}" for i in range(n)], S.TITLE: [""] * n,
                                   S.TEXT: [" ".join(f"w{w}" for w in row) for row in grid.tolist()],
                                   S.METADATA: [None] * n}))
    for start in range(0, pairs, block):
        n = min(block, pairs - start)
        positive = (np.arange(start, start + n) * 7919) % docs  # every document once per `docs` pairs, spread
        own = np.stack([doc_words[(p // block) * block][p % block] for p in positive.tolist()])
        picked = own[np.arange(n)[:, None], rng.integers(0, 9, size=(n, 3))]
        topical = topic_words[doc_topic[positive][:, None], rng.integers(0, per_topic, size=(n, 3))]
        query = np.concatenate([picked, topical], axis=1)
        pair_writer.add_table(pa.table({
            S.QUERY_ID: [f"q{start + i}" for i in range(n)],
            S.QUERY: [" ".join(f"w{w}" for w in row) for row in query.tolist()],
            S.POSITIVE_IDS: [[f"d{p}"] for p in positive.tolist()],
            S.NEGATIVE_IDS: [[] for _ in range(n)], S.SCORE: [None] * n}))
    datasets = {"corpus": corpus.close(), "pairs/train": pair_writer.close()}
    write_manifest(store, new_manifest(f"benchmarks.scale_train synthetic (seed {seed})", datasets, {}))
    return store


def tiny_encoder(out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from whetstone.models.assets import minilm_path
    from whetstone.models.encoder import write_sentence_transformers_files

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_sentence_transformers_files(out, dim=32, max_seq_length=64)
    return str(out)


def job_config(store: str, model: str, out: str, args, epochs: int, kind: str) -> dict:
    return {
        "run_name": f"scale-{Path(out).name}", "store_uri": store, "output_uri": out, "if_exists": "overwrite",
        "encoder": {"base_model": model, "query_max_length": 16, "doc_max_length": 24, "forward_chunk": None},
        "optim": {"num_workers": 2, "batch_size": args.batch, "epochs": epochs, "max_steps": args.steps, "lr": 1e-3,
                  "log_every": 100, "seed": args.seed, "shuffle_buffer": 4096},
        "negatives": {"source": "index", "max_steps_behind": args.max_steps_behind,
                      "mining": {"num_negatives": 1, "rank_start": 3, "rank_end": 30, "sampling": "random"}},
        "refresh": {"every_steps": args.every_steps, "fraction": args.fraction, "embed_batch_size": 512,
                    "embed_concurrency": 1, "embed_cpus": 1.0, "doc_max_length": 24},
        "index": {"kind": kind, "nlist": 1024, "nprobe": 16, "num_shards": 2, "initial_embed_concurrency": 2,
                  "http_port": args.port},
        "eval": {"split": None},
        "doc_text": {"partitions": 2},
        "ray_num_cpus": 8, "ray_object_store_mb": 1536,
    }


def throughput_ratio(history: list[dict], refreshes: list[dict], global_batch: int) -> tuple[float | None, dict]:
    """pairs/s of steps that ended while a refresh embedded, over pairs/s of steps while none ran."""
    embedding = [(r["started_at"], r["embedded_at"]) for r in refreshes if "started_at" in r]
    busy = [(r["started_at"], r["ended_at"]) for r in refreshes if "started_at" in r]
    inside, outside = [], []
    for m in history[5:]:  # the first steps warm up
        t = m.get("t")
        if t is None:
            continue
        if any(a <= t <= b for a, b in embedding):
            inside.append(m["step_s"])
        elif not any(a <= t <= b for a, b in busy):
            outside.append(m["step_s"])
    if not inside or not outside:
        return None, {"steps_during_embedding": len(inside), "steps_without_refresh": len(outside)}
    during, idle = global_batch / np.median(inside), global_batch / np.median(outside)
    return during / idle, {"steps_during_embedding": len(inside), "steps_without_refresh": len(outside),
                           "pairs_per_s_during_embedding": round(during, 1), "pairs_per_s_without_refresh": round(idle, 1)}


def steady_data_wait(history: list[dict]) -> float | None:
    """Share of step time spent waiting for data after the first step (whose wait is the pipeline's
    start: reading the first shards, the first resolve and tokenise tasks)."""
    rest = history[1:]
    busy = sum(m["step_s"] for m in rest)
    return sum(m["data_wait_s"] for m in rest) / busy if busy else None


def one_run(name: str, docs: int, pairs: int, args, run_dir: Path, model: str) -> dict:
    import ray
    from ray import serve
    from whetstone.config.contrastive import ContrastiveJobConfig

    from benchmarks.index_scale_memory import RolePeakSampler
    from jobs.train_contrastive import run

    started = time.monotonic()
    store = generate_store(run_dir / name / "store", docs, pairs, args.topics, args.seed)
    generate_s = time.monotonic() - started
    steps_per_epoch = max(pairs // (2 * args.batch), 1)
    config = ContrastiveJobConfig.model_validate(job_config(store, model, str(run_dir / name / "run"), args,
                                                            epochs=math.ceil(args.steps / steps_per_epoch),
                                                            kind=args.index_kind if docs >= 100_000 else "flat"))
    sampler = RolePeakSampler(router="IndexService").start()
    try:
        report = run(config)
    finally:
        sampler.stop()
        serve.shutdown()
        ray.shutdown()
    memory = sampler.report()
    history = json.loads(Path(report["history_uri"]).read_text())
    workers = [p["peak_gib"] for p in memory["processes"] if "RayTrainWorker" in p["title"]]
    ratio, detail = throughput_ratio(history, report["refreshes"], 2 * args.batch)
    refreshes = report["refreshes"]
    rates = [r["embed_docs_per_s"] for r in refreshes if r.get("embed_docs_per_s")]
    rate = float(np.median(rates)) if rates else None
    build_swap = float(np.median([r["total_s"] - r["embed_s"] for r in refreshes])) if refreshes else None
    return {
        "docs": docs, "pairs": pairs, "generate_s": round(generate_s, 1), "steps": report["steps"],
        "fallback_steps": report["fallback_steps_rank0"], "fallback_by_reason": report["fallback_steps_by_reason_rank0"],
        "max_steps_behind": report["max_index_steps_behind_rank0"], "staleness_bound": report["staleness_bound_steps"],
        "data_wait_fraction": report["data_wait_fraction"],
        "data_wait_fraction_after_first_step": steady_data_wait(history),
        "first_step_s": round(history[0]["step_s"], 2) if history else None,  # mostly the wait for the first batch
        "index_negative_step_share": 1 - (report["fallback_steps_rank0"] or 0) / max(report["steps"], 1),
        "worker_peak_rss_gib": round(max(workers), 3) if workers else None,
        "max_process_peak_rss_gib": round(memory["processes"][0]["peak_gib"], 3),
        "max_process": memory["processes"][0]["role"],
        "refreshes": len(refreshes), "refresh_docs_per_s": rate,
        "full_refresh_s_estimate": round(docs / rate + build_swap, 1) if rate else None,
        "train_throughput_during_refresh_ratio": round(ratio, 3) if ratio is not None else None,
        "throughput_detail": detail, "final_index_age": refreshes[-1].get("age") if refreshes else None,
        "refresh_records": [{k: r.get(k) for k in ("step", "documents", "embed_s", "total_s", "embed_docs_per_s",
                                                   "partial")} for r in refreshes],
        "timings_s": report["timings_s"], "memory_roles": memory["roles"],
        "top_processes": memory["processes"][:8],
    }


def summarise(large: dict, small: dict) -> dict:
    delta = None
    if large["worker_peak_rss_gib"] is not None and small["worker_peak_rss_gib"] is not None:
        delta = round(large["worker_peak_rss_gib"] - small["worker_peak_rss_gib"], 3)
    summary = {key: large[key] for key in ("docs", "pairs", "fallback_steps", "max_steps_behind", "staleness_bound",
                                           "data_wait_fraction", "data_wait_fraction_after_first_step",
                                           "first_step_s", "max_process_peak_rss_gib", "refresh_docs_per_s",
                                           "full_refresh_s_estimate", "index_negative_step_share",
                                           "train_throughput_during_refresh_ratio", "worker_peak_rss_gib")}
    summary["worker_peak_rss_gib_small"] = small["worker_peak_rss_gib"]
    summary["worker_peak_rss_gib_delta_vs_small"] = delta
    met = {}
    for key, (op, goal) in GOALS.items():
        value = summary.get(key)
        met[key] = None if value is None else bool(value <= goal if op == "<=" else value >= goal)
    behind, bound = summary["max_steps_behind"], summary["staleness_bound"]
    met["max_steps_behind"] = behind is not None and bool(behind <= bound)
    return {"summary": summary, "goals": {k: f"{op} {goal}" for k, (op, goal) in GOALS.items()}, "goals_met": met}


def print_table(result: dict) -> None:
    runs = result["runs"]
    keys = ["docs", "steps", "fallback_steps", "max_steps_behind", "data_wait_fraction", "worker_peak_rss_gib",
            "max_process_peak_rss_gib", "refreshes", "refresh_docs_per_s", "full_refresh_s_estimate",
            "train_throughput_during_refresh_ratio"]
    print(f"\n{'figure':40} {'large':>14} {'small':>14}")
    for key in keys:
        print(f"{key:40} {runs['large'].get(key)!s:>14} {runs['small'].get(key)!s:>14}")
    print("goals met:", json.dumps(result["goals_met"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000, help="documents and pairs of the large run")
    parser.add_argument("--small-docs", type=int, default=2_000)
    parser.add_argument("--topics", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32, help="pairs per worker per step")
    parser.add_argument("--every-steps", type=int, default=150)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--index-kind", default="ivf", help="ivf (default; flat search of 1M documents per step "
                        "took most of 2 cores) or flat; the small run uses flat when it has fewer docs than nlist")
    parser.add_argument("--max-steps-behind", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--run-dir", default=".whetstone/bench/scale_train")
    parser.add_argument("--out", default=str(RESULTS / "scale_train.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = Path(args.run_dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    model = tiny_encoder(run_dir / "tiny-encoder")
    started = time.monotonic()
    runs = {"large": one_run("large", args.docs, args.docs, args, run_dir, model)}
    runs["small"] = one_run("small", args.small_docs, args.small_docs, args, run_dir, model)
    result = {"settings": vars(args), **summarise(runs["large"], runs["small"]), "runs": runs,
              "total_s": round(time.monotonic() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    print(f"figures: {args.out} ({result['total_s']} s)")


if __name__ == "__main__":
    main()
