"""Contrastive training quality: Whetstone's live negatives against sentence-transformers baselines.

One budget for every trained method: all-MiniLM-L6-v2, 15 steps of 32 pairs (Whetstone: 3 epochs
of the 188 scifact-subset train queries on 2 workers x 16; sentence-transformers: max_steps 15 at
batch 32), lr 2e-5 with 10% warm-up, temperature 0.05 (MNRL scale 20), documents truncated at 256
tokens. Methods:

* ``base``: the untrained model;
* ``st_in_batch``: sentence-transformers MultipleNegativesRankingLoss, in-batch negatives;
* ``st_mined``: the same with one negative per pair mined once, before training, by
  ``sentence_transformers.util.mine_hard_negatives`` (rank 10 to 50, relative margin 0.05, random
  pick in the window) with the base model;
* ``whetstone_in_batch``: the Whetstone job without the index (in-batch negatives gathered across
  both workers);
* ``whetstone_live``: the Whetstone job with one hard negative per query from the live index
  (rank 3 to 30, random pick), with the false-negative guard at the mined baseline's setting
  (candidates scoring above 0.95 x the labelled positive's score are dropped and refilled),
  refreshed from a checkpoint every 5 steps;
* ``whetstone_live_merged``: the same run, its final weights then interpolated half-way back to
  the base model (``optim.merge_base_weight=0.5``: WiSE-FT, arXiv 2109.01903; LM-Cocktail, arXiv
  2311.13534), to keep the base model's general ability. The weight 0.5 is WiSE-FT's and
  LM-Cocktail's default, fixed before this benchmark ran, not tuned on either test set. The
  unmerged model of the same run is evaluated too (``trained_unmerged`` in its runs);
* ``whetstone_live_cached``: ``whetstone_live`` with ``negatives.encode=false``: the negatives'
  stored index vectors instead of re-encoding them (faster; gradients through the queries only).
* ``whetstone_live_bf16``: ``whetstone_live`` with ``encoder.precision=bfloat16`` (the transformer's
  forward and backward under bf16 autocast; weights, optimizer and loss in float32), to show what
  the faster precision costs in quality.
* ``whetstone_live_frozen_queries``: ``whetstone_live`` with ``encoder.query_tower=frozen``: queries
  keep the base model's weights and only the document tower trains (an asymmetric dual encoder),
  asked of the transfer goal: in-batch probes (3 seeds) kept the in-domain gain and lost 0.07 to
  0.31 msmarco points where the shared tower lost 0.65. Measured (2026-12-03, 3 seeds): scifact
  0.6963 ± 0.0033, msmarco 0.45 points below the base: the first live variant to meet both goals.
* ``whetstone_in_batch_frozen_queries``: ``whetstone_in_batch`` with ``encoder.query_tower=frozen``
  (measured: scifact 0.6900 ± 0.0070, msmarco 0.30 below the base).
* ``whetstone_live_bf16_frozen_queries``: the frozen query tower with bf16 autocast (the faster
  precision). Measured 2026-12-03, 3 seeds: scifact 0.6983 ± 0.0079, msmarco 0.49 below the base.
* ``whetstone_live_cached_frozen_queries``: the frozen query tower with cached negatives
  (``negatives.encode=false``). The negatives are the index's stored vectors, so they weight each
  query's softmax but get no gradient; the document tower learns from the positives only, with the
  hard negatives raising the pull toward them. This is the cheapest live step: measured
  2026-12-03, 3 seeds, scifact 0.6932 ± 0.0096 (+1.43 over best ST), msmarco 0.26 below the base.

Whetstone trains without dropout (``encoder.dropout`` 0, its default; the in-batch runs always
did, the live runs before 2026-12-02 had MiniLM's 0.1 switched on by accident and are kept under
``superseded/``); sentence-transformers trains with the model's own 0.1.

Every model is evaluated by the same function (exact cosine search, float32, documents at 256
tokens): nDCG@10 on scifact-subset test (trained on its train split) and on msmarco-dl19-subset
(transfer, never trained on). Seeds change sentence-transformers' data order and Whetstone's data
order and negative sampling. Mean, standard deviation, min and max over seeds.

Goal: ``whetstone_live`` beats the better sentence-transformers baseline by at least 1.0 nDCG@10
point on scifact-subset test, and msmarco-dl19-subset stays within 0.5 points of the base model.
``contrastive_transfer.py`` takes the msmarco loss apart per query (and along the line from the
base model to the fine-tuned one, where merging would move).

Runs are cached per (method, seed) in ``benchmarks/results/contrastive_quality.partial.json``,
so an interrupted run continues where it stopped (``--fresh`` starts over).

Usage::

    python -m benchmarks.contrastive_quality                     # 3 seeds, ~100 min on 2 cores
    python -m benchmarks.contrastive_quality --seeds 0 --methods base,whetstone_live
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.contrastive_common import (
    RESULTS,
    SHARED,
    evaluate,
    ingest_scifact,
    load_beir,
    machine,
    mean_spread,
    run_whetstone,
    train_pairs,
    train_sentence_transformers,
    variant_overrides,
)

STEPS, BATCH, LR, DOC_LEN = 15, 32, 2e-5, 256
METHODS = ("base", "st_in_batch", "st_mined", "whetstone_in_batch", "whetstone_live", "whetstone_static",
           "whetstone_live_partial", "whetstone_live_merged",
           "whetstone_live_cached", "whetstone_live_bf16", "whetstone_live_frozen_queries",
           "whetstone_in_batch_frozen_queries", "whetstone_live_bf16_frozen_queries",
           "whetstone_live_cached_frozen_queries")
REQUIRED = ("base", "st_in_batch", "st_mined", "whetstone_in_batch", "whetstone_live", "whetstone_static",
            "whetstone_live_partial")  # the issues' methods (21: the first five; 23: static and partial)
REQUIRED_SEEDS = (0, 1, 2, 3, 4)
MERGE_BASE_WEIGHT = 0.5
PARTIAL = RESULTS / "contrastive_quality.partial.json"
# The live method's negatives: the rank window of run_whetstone plus the false-negative guard that
# st_mined also gets (relative margin 0.05).
LIVE_MINING = {"num_negatives": 1, "rank_start": 3, "rank_end": 30, "sampling": "random", "relative_margin": 0.05}


def mined_rows(base: str, beir_train, corpus: dict[str, str]) -> tuple[list[tuple[str, str, str]], dict]:
    """(anchor, positive, negative) rows mined once with the base model."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(base, device="cpu")
    model.max_seq_length = DOC_LEN
    rows = train_pairs(beir_train)
    dataset = Dataset.from_dict({"anchor": [q for _, q, _ in rows], "positive": [p for _, _, p in rows]})
    mined = mine_hard_negatives(dataset, model, corpus=list(corpus.values()), range_min=10, range_max=50,
                                relative_margin=0.05, num_negatives=1, sampling_strategy="random",
                                batch_size=32, output_format="triplet", verbose=False)
    out = [(r["anchor"], r["positive"], r["negative"]) for r in mined]
    return out, {"pairs": len(rows), "triplets": len(out)}


def static_and_partial_goals(cache: dict, summary: dict) -> dict:
    """Issue 23's goals: live negatives against Whetstone's own static mining (same index, window,
    margin, budget), partial refresh against full, msmarco transfer; paired over seeds."""
    from scipy import stats

    def per_seed(method: str, metric: str = "scifact_test") -> dict[str, float]:
        return {k.split("/")[1]: v[metric]["ndcg@10"] for k, v in cache.items() if k.startswith(f"{method}/")}

    goals: dict = {}
    live, static, partial = per_seed("whetstone_live"), per_seed("whetstone_static"), per_seed("whetstone_live_partial")
    paired = sorted(set(live) & set(static))
    if paired:
        diffs = [100 * (live[s] - static[s]) for s in paired]
        goals["live_minus_static_scifact_ndcg_points"] = sum(diffs) / len(diffs)
        goals["live_vs_static_seeds"] = len(paired)
        if len(paired) >= 2:
            goals["live_vs_static_p_value"] = float(stats.ttest_rel([live[s] for s in paired],
                                                                    [static[s] for s in paired]).pvalue)
        goals["goal_live_beats_static_by_1_point"] = goals["live_minus_static_scifact_ndcg_points"] >= 1.0
    both = sorted(set(live) & set(partial))
    if both:
        goals["partial_minus_full_scifact_ndcg_points"] = sum(100 * (partial[s] - live[s]) for s in both) / len(both)
        goals["goal_partial_within_0.5_of_full"] = goals["partial_minus_full_scifact_ndcg_points"] >= -0.5
    if "whetstone_live" in summary and "base" in summary:
        gap = 100 * (summary["whetstone_live"]["msmarco_dl19_ndcg@10"]["mean"]
                     - summary["base"]["msmarco_dl19_ndcg@10"]["mean"])
        goals["live_minus_base_msmarco_ndcg_points"] = gap
        goals["goal_live_msmarco_within_0.5_of_base"] = gap >= -0.5
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--fresh", action="store_true", help="ignore cached (method, seed) results")
    parser.add_argument("--out", default=str(RESULTS / "contrastive_quality.json"))
    opts = parser.parse_args()
    from whetstone.models.assets import minilm_path

    base = str(minilm_path())
    seeds = [int(s) for s in opts.seeds.split(",")]
    methods = [m for m in opts.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    cache = json.loads(PARTIAL.read_text()) if PARTIAL.exists() and not opts.fresh else {}
    scifact_train = load_beir(SHARED / "scifact-subset", "train")
    scifact_test = load_beir(SHARED / "scifact-subset", "test")
    msmarco = load_beir(SHARED / "msmarco-dl19-subset", "test")

    def record(key: str, model_dir: str, extra: dict) -> None:
        entry = {"scifact_test": evaluate(model_dir, scifact_test), "msmarco_dl19": evaluate(model_dir, msmarco),
                 **extra, "machine": machine()}
        cache[key] = entry
        PARTIAL.write_text(json.dumps(cache, indent=2))
        print(f"[bench] {key}: scifact nDCG@10 {entry['scifact_test']['ndcg@10']:.4f}, "
              f"msmarco nDCG@10 {entry['msmarco_dl19']['ndcg@10']:.4f}", flush=True)

    mined = None
    with tempfile.TemporaryDirectory() as root:
        store = None
        for method in methods:
            for seed in ([0] if method == "base" else seeds):
                key = f"{method}/seed{seed}"
                if key in cache:
                    print(f"[bench] {key}: cached", flush=True)
                    continue
                print(f"[bench] {key} ...", flush=True)
                out = str(Path(root) / key.replace("/", "-"))
                if method == "base":
                    record(key, base, {})
                elif method.startswith("st_"):
                    if method == "st_mined":
                        if mined is None:
                            mined = mined_rows(base, scifact_train, scifact_train.corpus)
                        rows, info = mined[0], {"mining": mined[1]}
                    else:
                        rows, info = [(q, p) for _, q, p in train_pairs(scifact_train)], {}
                    stats = train_sentence_transformers(base, rows, out, STEPS, BATCH, LR, DOC_LEN, seed)
                    record(key, out, {**info, "train": stats})
                else:
                    store = store or ingest_scifact(root)
                    live = method.startswith("whetstone_live")
                    static = method == "whetstone_static"  # mined once with the base model: same index, window, margin
                    extra = {"negatives.mining": LIVE_MINING} if live or static else {}
                    if static:
                        extra["negatives.source"] = "static"
                    if method == "whetstone_live_merged":
                        extra["optim.merge_base_weight"] = MERGE_BASE_WEIGHT
                    extra.update(variant_overrides(method))
                    report = run_whetstone(store, base, out, workers=2, batch_per_worker=BATCH // 2, epochs=3,
                                           max_steps=None, lr=LR, live=live, seed=seed, doc_max_length=DOC_LEN,
                                           refresh_every=5 if live else None, gradient_checkpointing=True,
                                           extra=extra)
                    unmerged = {}
                    if report.get("merge_base_weight") is not None:
                        trained = report["trained_model_uri"]
                        unmerged = {"merge_base_weight": report["merge_base_weight"], "trained_unmerged": {
                            "scifact_test": evaluate(trained, scifact_test), "msmarco_dl19": evaluate(trained, msmarco)}}
                    record(key, report["model_uri"], {**unmerged, "train": {
                        "steps": report["steps"], "train_s": report["timings_s"].get("train_s"),
                        "negatives_served_by_index": report["negatives_served_all_workers"],
                        "fallback_steps_rank0": report["fallback_steps_rank0"],
                        "false_negative_dropped_share": report.get("false_negative_dropped_share"),
                        "refreshes": [{k: r[k] for k in ("step", "old_version", "new_version")}
                                      for r in report["refreshes"]]}})

    summary: dict = {}
    for method in METHODS:
        runs = [v for k, v in cache.items() if k.startswith(f"{method}/")]
        if runs:
            summary[method] = {
                "scifact_test_ndcg@10": mean_spread([r["scifact_test"]["ndcg@10"] for r in runs]),
                "msmarco_dl19_ndcg@10": mean_spread([r["msmarco_dl19"]["ndcg@10"] for r in runs]),
            }
    goals = {}
    # every live method, and the in-batch variants (not plain in-batch: the goal is for live negatives)
    for method in METHODS:
        name = next((n for n in ("live", "in_batch") if method.startswith(f"whetstone_{n}")), None)
        tag = method.removeprefix(f"whetstone_{name}")
        if name is None or (name == "in_batch" and not tag):
            continue
        if not ({method, "base"} <= set(summary) and ({"st_in_batch", "st_mined"} & set(summary))):
            continue
        best_st = max(summary[m]["scifact_test_ndcg@10"]["mean"] for m in ("st_in_batch", "st_mined") if m in summary)
        live = summary[method]
        scifact_gap = 100 * (live["scifact_test_ndcg@10"]["mean"] - best_st)
        msmarco_gap = 100 * (live["msmarco_dl19_ndcg@10"]["mean"] - summary["base"]["msmarco_dl19_ndcg@10"]["mean"])
        goals[f"{name}{tag}_minus_best_st_scifact_ndcg_points"] = scifact_gap
        goals[f"{name}{tag}_minus_base_msmarco_ndcg_points"] = msmarco_gap
        suffix = tag if name == "live" else f"_{name}{tag}"
        goals[f"goal_beats_best_st_by_1_point{suffix}"] = scifact_gap >= 1.0
        goals[f"goal_msmarco_within_0.5_of_base{suffix}"] = msmarco_gap >= -0.5
    goals.update(static_and_partial_goals(cache, summary))
    missing = [f"{m}/seed{s}" for m in METHODS for s in ([0] if m == "base" else seeds) if f"{m}/seed{s}" not in cache]
    # Goals are only judged on a complete run: every method the issue names, every seed (>= 3);
    # the extra variants (merged, cached, bf16) are reported with however many seeds they have.
    complete = all(f"{m}/seed{s}" in cache for m in REQUIRED for s in ([0] if m == "base" else REQUIRED_SEEDS))
    result = {"settings": {"steps": STEPS, "global_batch": BATCH, "lr": LR, "doc_max_length": DOC_LEN,
                           "seeds": seeds, "model": "all-MiniLM-L6-v2"},
              "complete": complete, "missing_runs": missing,
              "summary": summary, "goals": goals if complete else {"provisional": goals}, "runs": cache}
    result["goals_note"] = ("goals of the extra variants (_merged, _cached, _bf16, _frozen_queries, "
                            "_bf16_frozen_queries, _cached_frozen_queries, _in_batch_frozen_queries) rest on the seeds they have; see summary.<method>.*.n. "
                            "The issue's goal is for live negatives; the in-batch variant is reported beside it")
    print(f"\n{'method':22} {'scifact nDCG@10':>22} {'msmarco nDCG@10':>22}")
    for method, s in summary.items():
        a, b = s["scifact_test_ndcg@10"], s["msmarco_dl19_ndcg@10"]
        print(f"{method:22} {a['mean']:.4f} ± {a['std']:.4f} (n={a['n']})  {b['mean']:.4f} ± {b['std']:.4f}")
    for key, value in goals.items():
        print(f"  {key:45} {value:.3f}" if isinstance(value, float) else f"  {key:45} {value}")
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
