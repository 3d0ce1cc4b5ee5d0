"""The contrastive job's report: one JSON file, a plot and a short summary on the console."""

from __future__ import annotations

import json
import time
from typing import Any

from whetstone import storage as store
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.train.contrastive_run import ContrastiveRun, Embedded, FinalModel
from whetstone.train.model_cards import contrastive_card
from whetstone.train.plan import ContrastiveRunPlan


def write_report(run: ContrastiveRun, plan: ContrastiveRunPlan, base: Embedded, final: FinalModel,
                 train_metrics: dict[str, Any], mined: Any = None) -> dict:
    """Build the report, plot the run, write both under the run folder and print the summary
    (its last line is the report's path). Returns the report."""
    from whetstone.models.encoder import QUERY_TOWER  # an asymmetric model's query tower subfolder

    config = run.config
    report = {
        "run_uri": config.run_uri,
        "model_uri": final.embedded.model_uri,
        "trained_model_uri": final.trained_uri,
        "merge_base_weight": config.optim.merge_base_weight,
        "eval_split": config.eval.split,
        "before": base.metrics,
        "after": final.embedded.metrics,
        "steps": plan.total_steps,
        "train_rows_per_epoch": plan.train_rows,
        "steps_per_epoch": plan.steps_per_epoch,
        "positives": config.loss.positives,
        "precision": config.encoder.precision,
        "query_tower": config.encoder.query_tower,
        "query_model_uri": (store.join(final.embedded.model_uri, QUERY_TOWER)
                            if config.encoder.query_tower == "frozen" else final.embedded.model_uri),
        "topic_clusters": config.optim.topic_clusters,
        "tasks": _task_report(run.task_data, plan.task_shares, train_metrics),
        "topic_pure_batch_share": train_metrics.get("topic_pure_batch_share"),
        "resumed_from_step": plan.resume_step if plan.resume_checkpoint else None,
        "worker_restarts": int(train_metrics.get("total_worker_restarts") or 0),
        "negatives_source": config.negatives.source,
        "static_mining": mined.summary() if mined is not None else None,
        **_negatives_report(train_metrics, config.optim.num_workers, config.staleness_bound),
        "final_loss": train_metrics.get("loss"),
        "worker_nodes": train_metrics.get("worker_nodes"),
        "data_wait_fraction": train_metrics.get("data_wait_fraction"),
        "index_versions": final.versions,
        "index": {"kind": config.index.kind, "num_shards": config.index.num_shards,
                  "replicas_per_shard": config.index.replicas_per_shard, "use_gpu": config.index.use_gpu,
                  "documents": base.count},
        "refreshes": final.refreshes,
        "refresh_errors": final.refresh_errors,
        "history_uri": plan.history_uri,
        "tensorboard_uri": run.tracking.tensorboard_uri,
        "mlflow_run_id": run.tracking.mlflow_run_id,
        "timings_s": {**run.timer.marks, "total_s": round(time.monotonic() - run.timer.started, 2)},
        "peak_memory_gib": round(run.memory.stop() / 1024**3, 2),
        "peak_memory_top_processes_gib": run.memory.peak_breakdown,
    }
    report["plot_uri"] = _plot_run(config, plan, base.metrics, final.embedded.metrics, final.refreshes)
    report["model_card_uri"] = contrastive_card(run, plan, base, final, train_metrics)  # README.md of the model
    report_uri = store.join(config.run_uri, "report.json")
    store.write_bytes(report_uri, json.dumps(report, indent=2).encode(), config.storage)
    _track(run, plan, report, final)
    _print_summary(report, report_uri)
    return report


def _track(run: ContrastiveRun, plan: ContrastiveRunPlan, report: dict, final: FinalModel) -> None:
    """nDCG@10 and Recall@100 at each refresh and of the final model into TensorBoard's ``eval`` run
    (the base model's went in at step 0) and MLflow; the report's figures to MLflow; the end of the run."""
    for refresh in final.refreshes:
        run.tracking.log_eval({k: v for k, v in refresh.items() if k.endswith("_at_index_length")}, refresh["step"])
    run.tracking.log_eval(final.embedded.metrics, plan.total_steps)
    run.tracking.log_report({key: report[key] for key in (
        "before", "after", "final_loss", "negatives_served_all_workers", "fallback_steps_rank0", "data_wait_fraction",
        "worker_restarts", "timings_s", "peak_memory_gib")}, plan.total_steps)
    run.tracking.finish()


def _negatives_report(train_metrics: dict[str, Any], world: int, bound: int | None) -> dict[str, Any]:
    """Where the hard negatives came from (rank 0's running totals; every worker mines alike), and
    how stale the index that answered got against the bound (``bound``: steps, None: unbounded)."""
    served = train_metrics.get("total_negatives_from_index")
    return {
        "negatives_served_by_index": served,
        "negatives_note": "rank-0 worker's count; every worker mines the same number per step",
        "negatives_served_all_workers": (served or 0) * world,
        "fallback_steps_rank0": train_metrics.get("total_fallback_steps"),
        "fallback_steps_by_reason_rank0": {key.removeprefix("total_fallback_steps_"): value
                                           for key, value in train_metrics.items()
                                           if key.startswith("total_fallback_steps_")},
        "max_index_steps_behind_rank0": train_metrics.get("total_max_index_steps_behind"),
        "staleness_bound_steps": bound,
        "negatives_random_fill": train_metrics.get("total_negatives_random_fill"),
        "negatives_dropped_as_false_negatives": train_metrics.get("total_negatives_dropped_margin"),
        "false_negative_dropped_share": (train_metrics.get("total_negatives_dropped_margin") or 0)
        / max(train_metrics.get("total_negative_candidates") or 0, 1),
    }


def _task_report(task_data: dict[str, Any], shares: dict[str, float] | None, metrics: dict) -> dict | None:
    """Per task: its data's accounting, its share of the schedule and the steps rank 0 trained on it."""
    if not task_data:
        return None
    total = sum(shares.values())
    out: dict[str, dict] = {"retrieval": {"kind": "retrieval", "share": shares["retrieval"] / total,
                                          "steps": metrics.get("total_steps_retrieval")}}
    for name, data in task_data.items():
        out[name] = {**data.summary(), "share": shares[name] / total, "steps": metrics.get(f"total_steps_{name}")}
    return out


def _plot_run(config: ContrastiveJobConfig, plan: ContrastiveRunPlan, before: dict, after: dict, refreshes: list[dict]) -> str | None:
    """PNG of loss, score gap and nDCG@10 over steps, with refreshes marked (None if no history)."""
    from whetstone.train.plots import plot_metrics

    try:
        history = json.loads(store.read_bytes(plan.history_uri, config.storage))
    except FileNotFoundError:
        return None
    points = list(history)
    if before:
        points.append({"step": 0, "ndcg@10": before["ndcg@10"]})
    points += [{"step": r["step"], "ndcg@10": r["ndcg@10_at_index_length"]} for r in refreshes
               if "ndcg@10_at_index_length" in r]
    if after:
        points.append({"step": plan.total_steps, "ndcg@10": after["ndcg@10"]})
    points.sort(key=lambda m: m["step"])
    markers = [(r["step"], f"refresh v{r['old_version']}->v{r['new_version']}") for r in refreshes]
    task_losses = sorted({k for point in history for k in point if k.startswith("loss_")})
    keys = ["loss", "score_gap"] + task_losses + (["ndcg@10"] if before or after else [])
    uri = store.join(config.run_uri, "training.png")
    return plot_metrics(points, keys, uri, markers=markers, storage=config.storage,
                        title=f"{config.run_name}: loss, positive-negative gap, nDCG@10 (refreshes dashed)")


def _fallback_reasons(report: dict) -> str:
    reasons = report.get("fallback_steps_by_reason_rank0") or {}
    return "".join(f", {count:.0f} {reason}" for reason, count in sorted(reasons.items()))


def _print_summary(report: dict, report_uri: str) -> None:
    before, after = report["before"], report["after"]
    lines = ["", "=== Whetstone contrastive run ==="]
    if before and after:
        lines.append(f"nDCG@10    before {before['ndcg@10']:.4f}  after {after['ndcg@10']:.4f}  "
                     f"({after['ndcg@10'] - before['ndcg@10']:+.4f})")
        lines.append(f"Recall@100 before {before['recall@100']:.4f}  after {after['recall@100']:.4f}")
    lines.append(f"steps {report['steps']}, hard negatives served by the index: "
                 f"{report['negatives_served_all_workers']} (fallback steps on rank 0: {report['fallback_steps_rank0']}"
                 f"{_fallback_reasons(report)}); index at most {report['max_index_steps_behind_rank0']} steps behind "
                 f"(bound {report['staleness_bound_steps']})")
    if report["worker_restarts"]:
        lines.append(f"worker group restarted {report['worker_restarts']} time(s) after a failure; "
                     "each restart continued from the newest registered checkpoint")
    for r in report["refreshes"]:
        lines.append(f"refresh at step {r['step']}: index v{r['old_version']} -> v{r['new_version']} "
                     f"({r['total_s']} s)")
    lines.append(f"index versions {report['index_versions']}; peak memory {report['peak_memory_gib']} GiB; "
                 f"total {report['timings_s']['total_s']} s")
    lines.append(f"model: {report['model_uri']}")
    if report["query_model_uri"] != report["model_uri"]:
        lines.append(f"query tower (frozen; embed queries with it): {report['query_model_uri']}")
    if report.get("plot_uri"):
        lines.append(f"plot: {report['plot_uri']}")
    if report.get("tensorboard_uri"):
        lines.append(f"tensorboard: tensorboard --logdir {report['tensorboard_uri']}")
    lines.append(f"report: {report_uri}")
    print("\n".join(lines), flush=True)
