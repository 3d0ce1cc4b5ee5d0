"""Where the transfer loss comes from: per-query msmarco-dl19 changes along base -> fine-tuned.

``contrastive_quality.py`` finds every fine-tuned method (sentence-transformers included) about
0.6 to 0.7 nDCG@10 points below the base model on msmarco-dl19-subset, with a spread across seeds
under 0.1 points. This benchmark asks what that loss is made of and whether weight interpolation
towards the base (WiSE-FT, ``optim.merge_base_weight``) trades it back at a fair in-domain price:

1. trains ``whetstone_live`` once (seed 0, the quality benchmark's exact settings);
2. for each fine-tuned share ``alpha`` in ALPHAS, writes ``alpha * fine_tuned + (1 - alpha) * base``
   with the product's merge (``whetstone.models.merge.merge_with_base``) and evaluates it on
   scifact-subset test and msmarco-dl19-subset (exact cosine search, documents at 256 tokens,
   queries at 64, as ``contrastive_common.evaluate``); ``alpha`` 0 is the base model, the baseline;
3. reports, per ``alpha``, both nDCG@10s and their change against the base, and for msmarco the
   per-query changes: how many queries lose or gain, how much of the loss the five worst carry,
   and a paired bootstrap 95% interval of the mean change over the 43 judged queries.

Usage::

    python -m benchmarks.contrastive_transfer        # ~25 min on 2 cores
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.contrastive_common import (
    RESULTS,
    SHARED,
    Beir,
    evaluate,
    ingest_scifact,
    load_beir,
    machine,
    run_whetstone,
)
from benchmarks.contrastive_quality import BATCH, DOC_LEN, LIVE_MINING, LR

ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0)  # share of the fine-tuned weights; 0 = the base model
QUERY_LEN = 64
BOOTSTRAP = 10_000


def per_query_ndcg(model_dir: str, beir: Beir) -> dict[str, float]:
    """nDCG@10 of every judged query, by the quality benchmark's ``evaluate``."""
    return evaluate(model_dir, beir, doc_max_length=DOC_LEN, query_max_length=QUERY_LEN,
                    per_query=True)["per_query_ndcg@10"]


def paired_bootstrap(deltas: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of ``deltas`` (queries resampled with replacement)."""
    rng = np.random.default_rng(seed)
    means = deltas[rng.integers(0, len(deltas), size=(BOOTSTRAP, len(deltas)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    from whetstone.models.assets import minilm_path
    from whetstone.models.merge import merge_with_base

    base = str(minilm_path())
    scifact = load_beir(SHARED / "scifact-subset", "test")
    msmarco = load_beir(SHARED / "msmarco-dl19-subset", "test")
    result: dict = {"settings": {"method": "whetstone_live", "seed": 0, "alphas": list(ALPHAS),
                                 "bootstrap_resamples": BOOTSTRAP, "doc_max_length": DOC_LEN,
                                 "query_max_length": QUERY_LEN}, "machine": machine()}
    with tempfile.TemporaryDirectory() as root:
        store = ingest_scifact(root)
        report = run_whetstone(store, base, str(Path(root) / "live"), workers=2, batch_per_worker=BATCH // 2,
                               epochs=3, max_steps=None, lr=LR, live=True, seed=0, doc_max_length=DOC_LEN,
                               refresh_every=5, gradient_checkpointing=True,
                               extra={"negatives.mining": LIVE_MINING})
        tuned = report["model_uri"]
        result["train"] = {"steps": report["steps"], "negatives_served_by_index": report["negatives_served_all_workers"]}
        per_alpha: dict[float, dict] = {}
        for alpha in ALPHAS:
            model = base if alpha == 0 else tuned if alpha == 1 else merge_with_base(
                tuned, base, 1.0 - alpha, str(Path(root) / f"alpha-{alpha}"))
            per_alpha[alpha] = {"scifact": per_query_ndcg(model, scifact), "msmarco": per_query_ndcg(model, msmarco)}
            print(f"[bench] alpha {alpha}: scifact nDCG@10 {np.mean(list(per_alpha[alpha]['scifact'].values())):.4f}, "
                  f"msmarco nDCG@10 {np.mean(list(per_alpha[alpha]['msmarco'].values())):.4f}", flush=True)

    base_runs = per_alpha[0.0]
    rows = []
    for alpha, runs in per_alpha.items():
        queries = sorted(runs["msmarco"])
        deltas = np.array([runs["msmarco"][q] - base_runs["msmarco"][q] for q in queries])
        order = np.argsort(deltas)
        loss = -deltas[deltas < 0].sum()
        low, high = paired_bootstrap(deltas)
        row = {
            "alpha": alpha,
            "scifact_ndcg@10": float(np.mean(list(runs["scifact"].values()))),
            "msmarco_ndcg@10": float(np.mean(deltas + np.array([base_runs["msmarco"][q] for q in queries]))),
            "scifact_minus_base_points": 100 * float(np.mean([runs["scifact"][q] - base_runs["scifact"][q]
                                                             for q in runs["scifact"]])),
            "msmarco_minus_base_points": 100 * float(deltas.mean()),
            "msmarco_minus_base_ci95_points": [100 * low, 100 * high],
            "msmarco_queries_lost": int((deltas < -1e-9).sum()),
            "msmarco_queries_gained": int((deltas > 1e-9).sum()),
            "msmarco_queries": len(queries),
            "msmarco_worst5_share_of_loss": float(-deltas[order[:5]].clip(max=0).sum() / loss) if loss else None,
            "msmarco_worst_queries": {queries[i]: round(float(deltas[i]), 4) for i in order[:5] if deltas[i] < 0},
        }
        rows.append(row)
        result[f"msmarco_minus_base_points_alpha_{alpha}"] = row["msmarco_minus_base_points"]
        result[f"scifact_minus_base_points_alpha_{alpha}"] = row["scifact_minus_base_points"]
    result["rows"] = rows
    result["per_query_ndcg@10"] = {str(alpha): runs for alpha, runs in per_alpha.items()}
    out = RESULTS / "contrastive_transfer.json"
    out.write_text(json.dumps(result, indent=2))

    print(f"\n{'alpha':>6} {'scifact':>8} {'d pts':>7} {'msmarco':>8} {'d pts':>7} {'95% CI (pts)':>16} "
          f"{'lost/gained':>12} {'worst5 share':>13}")
    for r in rows:
        low, high = r["msmarco_minus_base_ci95_points"]
        share = "" if r["msmarco_worst5_share_of_loss"] is None else f"{r['msmarco_worst5_share_of_loss']:.2f}"
        print(f"{r['alpha']:>6} {r['scifact_ndcg@10']:>8.4f} {r['scifact_minus_base_points']:>+7.2f} "
              f"{r['msmarco_ndcg@10']:>8.4f} {r['msmarco_minus_base_points']:>+7.2f} "
              f"{f'[{low:+.2f}, {high:+.2f}]':>16} {r['msmarco_queries_lost']:>5}/{r['msmarco_queries_gained']:<6} "
              f"{share:>13}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
