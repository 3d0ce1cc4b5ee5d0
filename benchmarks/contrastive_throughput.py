"""Contrastive training throughput: Whetstone against the sentence-transformers trainer.

Same settings for every run: all-MiniLM-L6-v2, global batch 32, documents truncated at 256
tokens, lr 2e-5, scifact-subset train pairs. Measured, in one run:

* sentence-transformers ``SentenceTransformerTrainer`` + MultipleNegativesRankingLoss, in-batch
  only, and with one extra negative per pair (random corpus documents: the same compute as mined
  ones, without a minute of mining first); ``max_seq_length`` 256 for queries and documents.
  Each with the model's own dropout (0.1: what its users train with; the goals' baseline) and
  with dropout 0 (``*_no_dropout``: the same arithmetic as Whetstone's default ``encoder.dropout``
  0, for like-for-like ratios, ``*_vs_st_*_no_dropout``). And both once more with the trainer's
  ``bf16=True`` (``*_bf16``, the model's dropout): the counterparts of Whetstone's bf16 modes.
* Whetstone's contrastive job, 1 and 2 Ray Train workers, live index negatives off and on (one
  hard negative per query from the index service each step, fetched for the next batch while the
  current one trains), and live with cached negatives (``negatives.encode=false``: the index's
  stored vectors of those negatives, no forward or backward for them). Queries are truncated at
  64 tokens, documents at 256. In-batch and live once more with ``encoder.precision=bfloat16``
  (``*_bf16``: the transformer's forward and backward under bf16 autocast, float32 weights).

Throughput is training pairs per second over the steps after the first two, for both: Whetstone
from the run's per-step history, sentence-transformers from a trainer callback timing each step
from the end of the one before (results before 2026-12-03 timed sentence-transformers' whole
``train()`` call, first steps included, which favoured Whetstone; ``pairs_per_s_whole_train`` keeps
that figure). sentence-transformers in-batch runs again after the Whetstone runs
(``st_in_batch_repeat``) and the faster of the two is the baseline: one run of it measured 2.84 and
another 4.56 pairs/s on this machine type. Peak memory: sentence-transformers' process peak RSS;
Whetstone's peak PSS summed over the driver and every Ray process (what the job reports).

Ratios named as in the issue: ``whetstone_<mode>_vs_st_<counterpart>``; goal >= 1.0 each, and live
negatives on >= 1.0 of sentence-transformers' in-batch throughput. The bf16 modes are held to the
same goals twice: against the float32 baselines (the issue's) and against sentence-transformers in
bf16 (``*_vs_st_*_bf16``), so that no ratio credits Whetstone with what is only bf16's speed.

Usage::

    python -m benchmarks.contrastive_throughput              # 45-90 min on 2 cores
    python -m benchmarks.contrastive_throughput --steps 6    # a quicker look
    python -m benchmarks.contrastive_throughput --out benchmarks/results/contrastive_throughput_frozen_queries.json \
        --only st_in_batch,st_one_negative,whetstone_1w_live_bf16_frozen_queries   # ~12 min
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import tempfile

from benchmarks.contrastive_common import (
    RESULTS,
    SHARED,
    ingest_scifact,
    load_beir,
    machine,
    run_whetstone,
    steady_pairs_per_s,
    train_pairs,
    train_sentence_transformers,
    variant_overrides,
)

BATCH, LR, DOC_LEN = 32, 2e-5, 256
# in_batch: no index; live: hard negatives from the index, re-encoded every step; live_cached: the
# same negatives as the index's stored vectors (negatives.encode=false, no forward or backward);
# *_bf16: the same with encoder.precision=bfloat16 (the transformer under bf16 autocast)
WHETSTONE_MODES = ("in_batch", "live", "live_cached", "in_batch_bf16", "live_bf16")
LIVE_MODES = ("live", "live_cached", "live_bf16")
# Extra modes, run only when named with --only (not part of the full run's goals): live negatives
# with encoder.query_tower=frozen, the tower that meets contrastive_quality's transfer goal. Measured
# 2026-12-03 (12 steps, results/contrastive_throughput_frozen_queries.json), against the faster of two
# sentence-transformers in-batch runs: cached 1.16x (1 worker) and 1.30x (2), bf16 0.73x, float32 0.61x.
EXTRA_MODES = ("live_frozen_queries", "live_bf16_frozen_queries", "live_cached_frozen_queries")


# sentence-transformers runs: in-batch and one negative, each with the model's own dropout (0.1, the
# default users train with) and without (like-for-like with Whetstone's default encoder.dropout 0);
# *_bf16: the trainer's bf16=True, the counterparts of Whetstone's bf16 modes
ST_MODES = ("in_batch", "one_negative", "in_batch_no_dropout", "one_negative_no_dropout", "in_batch_bf16",
            "one_negative_bf16")


def _st_child(mode: str, steps: int, queue) -> None:
    """One sentence-transformers run in a fresh process (its own peak RSS)."""
    from whetstone.models.assets import minilm_path

    beir = load_beir(SHARED / "scifact-subset", "train")
    rows = [(q, p) for _, q, p in train_pairs(beir)]
    dropout = 0.0 if mode.endswith("_no_dropout") else None
    if mode.startswith("one_negative"):
        rng = random.Random(0)
        docs = list(beir.corpus.values())
        rows = [(q, p, rng.choice([d for d in rng.sample(docs, 3) if d != p])) for q, p in rows]
    with tempfile.TemporaryDirectory() as out:
        queue.put(train_sentence_transformers(str(minilm_path()), rows, out, steps, BATCH, LR, DOC_LEN, seed=0,
                                              dropout=dropout, bf16=mode.endswith("_bf16")))


def run_st(mode: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_st_child, args=(mode, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def baseline(runs: dict, name: str) -> float:
    """A sentence-transformers figure to compare against: the faster of its run and, when there is
    one, its repeat at the end (``<name>_repeat``), so machine drift during the run cannot favour Whetstone."""
    return max(runs[key]["pairs_per_s"] for key in (name, f"{name}_repeat") if key in runs)


def summarise_only(runs: dict) -> dict:
    """Ratios of a ``--only`` run: every Whetstone run against sentence-transformers in-batch, and
    live modes against one negative, when those baselines ran."""
    summary: dict = {}
    for name, run in runs.items():
        if not name.startswith("whetstone_"):
            continue
        mode = name.split("w_", 1)[1]
        counterparts = ("st_in_batch", "st_one_negative") if mode.startswith("live") else ("st_in_batch",)
        for st in counterparts:
            if st in runs:
                summary[f"{name}_vs_{st}"] = run["pairs_per_s"] / baseline(runs, st)
        summary[f"{name}_peak_memory_gib"] = run["peak_memory_gib"]
    return summary


def summarise(runs: dict) -> dict:
    """Ratios named as in the issue, against sentence-transformers with the model's dropout (the
    goals' baseline) and, suffixed ``_no_dropout``, against sentence-transformers without it; the
    bf16 modes also against sentence-transformers in bf16 (suffix ``_bf16``)."""
    summary: dict = {}
    counterparts: dict[str, list[float]] = {}  # suffix -> each mode against its own counterpart
    bf16_modes = [m for m in WHETSTONE_MODES if m.endswith("_bf16")]
    for suffix, modes in (("", WHETSTONE_MODES), ("_no_dropout", WHETSTONE_MODES), ("_bf16", bf16_modes)):
        st_in, st_neg = baseline(runs, f"st_in_batch{suffix}"), baseline(runs, f"st_one_negative{suffix}")
        for workers in (1, 2):
            for mode in modes:
                run = runs[f"whetstone_{workers}w_{mode}"]
                vs_in = summary[f"whetstone_{workers}w_{mode}_vs_st_in_batch{suffix}"] = run["pairs_per_s"] / st_in
                if mode in LIVE_MODES:  # live's counterpart is one negative, in-batch's is in-batch
                    vs_neg = run["pairs_per_s"] / st_neg
                    summary[f"whetstone_{workers}w_{mode}_vs_st_one_negative{suffix}"] = vs_neg
                counterparts.setdefault(suffix, []).append(vs_neg if mode in LIVE_MODES else vs_in)
                if mode in LIVE_MODES and not suffix:
                    summary[f"whetstone_{workers}w_{mode}_peak_memory_gib"] = run["peak_memory_gib"]
    for mode in ("in_batch", "one_negative", "in_batch_bf16", "one_negative_bf16"):
        summary[f"st_{mode}_peak_rss_gib"] = runs[f"st_{mode}"]["peak_rss_gib"]

    # The issue's goals: each mode >= its counterpart; live negatives on >= sentence-transformers' in-batch.
    summary["goal_each_mode_ge_counterpart"] = all(r >= 1.0 for r in counterparts[""])
    summary["goal_bf16_modes_ge_st_bf16_counterpart"] = all(r >= 1.0 for r in counterparts["_bf16"])
    for mode in LIVE_MODES:
        summary[f"goal_{mode}_ge_st_in_batch"] = max(summary[f"whetstone_{w}w_{mode}_vs_st_in_batch"]
                                                     for w in (1, 2)) >= 1.0
    summary["goal_live_bf16_ge_st_in_batch_bf16"] = max(summary[f"whetstone_{w}w_live_bf16_vs_st_in_batch_bf16"]
                                                        for w in (1, 2)) >= 1.0
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--out", default=str(RESULTS / "contrastive_throughput.json"))
    parser.add_argument("--only", default="", help="comma-separated run names (e.g. st_in_batch,"
                        "whetstone_1w_live_frozen_queries): run just these, report their ratios to st_in_batch "
                        "(live modes also to st_one_negative; no goals); write to a --out of its own")
    opts = parser.parse_args()
    only = {name for name in opts.only.split(",") if name}
    if only and opts.out == parser.get_default("out"):
        raise SystemExit("--only: give --out a file of its own (the full run's results stay as they are)")
    from whetstone.models.assets import minilm_path

    results: dict = {"settings": {"global_batch": BATCH, "lr": LR, "doc_max_length": DOC_LEN,
                                  "whetstone_query_max_length": 64, "st_max_seq_length": DOC_LEN,
                                  "steps": opts.steps, "model": "all-MiniLM-L6-v2", "data": "scifact-subset train"},
                     "machine_before": machine(), "runs": {}}
    for mode in ST_MODES:
        if only and f"st_{mode}" not in only:
            continue
        print(f"[bench] sentence-transformers, {mode} ...", flush=True)
        results["runs"][f"st_{mode}"] = run_st(mode, opts.steps)
        print(f"  {results['runs'][f'st_{mode}']}", flush=True)

    with tempfile.TemporaryDirectory() as root:
        store = ingest_scifact(root)
        for workers in (1, 2):
            for mode in WHETSTONE_MODES + EXTRA_MODES:
                name = f"whetstone_{workers}w_{mode}"
                if (only and name not in only) or (not only and mode in EXTRA_MODES):
                    continue
                print(f"[bench] {name} ...", flush=True)
                # Every run uses all cores, as sentence-transformers does: Ray Train gives each worker
                # as many torch threads as CPUs it asked for.
                cpus = max(1, (os.cpu_count() or 2) // workers)
                extra = {"optim.cpus_per_worker": cpus, **variant_overrides(mode)}
                report = run_whetstone(store, str(minilm_path()), f"{root}/{name}", workers=workers,
                                       batch_per_worker=BATCH // workers, epochs=10, max_steps=opts.steps,
                                       lr=LR, live=mode.startswith("live"), seed=0, doc_max_length=DOC_LEN,
                                       extra=extra)
                results["runs"][name] = {
                    "pairs_per_s": round(steady_pairs_per_s(report["history"], BATCH), 3),
                    "steps": report["steps"], "train_s": report["timings_s"].get("train_s"),
                    "peak_memory_gib": report["peak_memory_gib"],
                    "data_wait_fraction": report["data_wait_fraction"],
                    "negatives_served_by_index": report["negatives_served_all_workers"],
                    "fallback_steps_rank0": report["fallback_steps_rank0"],
                    "step_s": [round(m["step_s"], 3) for m in report["history"]],
                    "step_data_wait_s": [round(m.get("data_wait_s") or 0.0, 3) for m in report["history"]],
                }
                print(f"  {results['runs'][name]}", flush=True)

    # sentence-transformers in-batch once more at the end: the goals' baseline is the faster of the two
    if not only or "st_in_batch" in only:
        print("[bench] sentence-transformers, in_batch (repeat) ...", flush=True)
        results["runs"]["st_in_batch_repeat"] = run_st("in_batch", opts.steps)
        print(f"  {results['runs']['st_in_batch_repeat']}", flush=True)
    runs = results["runs"]
    summary = summarise_only(runs) if only else summarise(runs)
    results["summary"] = summary
    results["machine_after"] = machine()

    print(f"\n{'run':32} {'pairs/s':>9} {'peak GiB':>9}")
    for name, run in runs.items():
        memory = run.get("peak_memory_gib", run.get("peak_rss_gib"))
        print(f"{name:32} {run['pairs_per_s']:9.2f} {memory:9.2f}")
    print("\nsummary:")
    for key, value in summary.items():
        print(f"  {key:45} {value:.3f}" if isinstance(value, float) else f"  {key:45} {value}")
    with open(opts.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
