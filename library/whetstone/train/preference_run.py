"""Preference training, driver side: the stages ``jobs/train_preference.py``'s ``run`` calls, in order.

1. :func:`start_run`: local paths made absolute, the resolved config logged, Ray joined or
   started, ``if_exists`` applied, and (``if_exists=resume``) the newest complete checkpoint found;
2. :func:`select_and_guard`: the train / eval pairs (seeded hash of ``pair_id``) and the leakage guard;
3. :func:`precompute_reference`: the reference log-probs, once, by Ray Data batch inference;
4. :func:`plan_training`: the :class:`~whetstone.train.plan.PreferenceRunPlan` and the Ray Datasets;
5. :func:`fit`: ``TorchTrainer(...).fit()`` with the plan as JSON-safe data;
6. :func:`finish_run`: the plot, ``report.json`` and the summary (the report's path printed last).

Each attempt of a run is its own Ray Train run under ``<run_uri>``: ``train/`` first, then
``train-from-<step>/`` for each resume, so a new attempt never mixes its checkpoints with a dead one's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from whetstone import storage as store
from whetstone.config.base import ConfigError, dump_config
from whetstone.config.extras import check_extras
from whetstone.config.preference import PreferenceJobConfig
from whetstone.data.store import require_store
from whetstone.train.checkpoint import TrainerState, find_resume_checkpoint, worker_restarts
from whetstone.train.memory import MemorySampler
from whetstone.train.model_cards import preference_card
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference import PAIR_METRICS
from whetstone.train.preference_data import PairSelection, leakage_guard, pairs_for_training, select_pairs
from whetstone.train.preference_reference import reference_table
from whetstone.train.runtime import (
    Timer,
    init_ray,
    ordered_data_config,
    prepare_run_dir,
    train_run_config,
    worker_job_config,
)
from whetstone.train.tracking import RunTracking, start_tracking


@dataclass
class DriverRun:
    """What the driver's stages share: the resolved config, the stage timer, the memory sampler and
    the checkpoint a resumed run continues from."""

    config: PreferenceJobConfig
    timer: Timer
    memory: MemorySampler
    resume: tuple[str, TrainerState] | None = None
    tracking: RunTracking = field(default_factory=lambda: RunTracking(None))  # TensorBoard, MLflow


def absolute_local_paths(config: PreferenceJobConfig) -> PreferenceJobConfig:
    """Make local paths absolute on the driver: Ray workers and actors run in other directories."""
    from whetstone.models.assets import resolve_model_path
    from whetstone.storage import absolute_local as fix

    update: dict[str, Any] = {"store_uri": fix(config.store_uri), "output_uri": fix(config.output_uri)}
    if config.policy is not None:
        update["policy"] = config.policy.model_copy(update={
            "path": fix(config.policy.path, True), "tokenizer": fix(config.policy.tokenizer, True)})
    update["leakage"] = config.leakage.model_copy(
        update={"encoder": fix(resolve_model_path(config.leakage.encoder), True)})
    update["reward_model"] = config.reward_model.model_copy(
        update={"encoder": fix(resolve_model_path(config.reward_model.encoder), True)})
    if config.online.reward_model:
        update["online"] = config.online.model_copy(update={"reward_model": fix(config.online.reward_model)})
    return config.model_copy(update=update)


def start_run(config: PreferenceJobConfig) -> DriverRun:
    """Resolve paths, log the config, join or start Ray, apply ``if_exists``: ``error`` refuses an
    existing run folder, ``overwrite`` deletes it, ``resume`` keeps it and continues from its newest
    complete ``step-N`` checkpoint (from the start when there is none)."""
    timer = Timer()
    memory = MemorySampler(include_ray=bool(os.environ.get("RAY_ADDRESS"))).start()
    check_extras(config)  # a missing extra fails here, naming the field, not on a worker
    given_store = config.store_uri
    config = absolute_local_paths(config)
    require_store(given_store, config.store_uri, config.storage)
    print(f"[run] resolved config:\n{dump_config(config)}", flush=True)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    prepare_run_dir(config)
    resume = find_resume_checkpoint(config.run_uri, config.storage) if config.if_exists == "resume" else None
    if resume is not None:
        print(f"[run] resuming from {resume[0]} (step {resume[1].step})", flush=True)
    elif config.if_exists == "resume":
        print(f"[run] no complete checkpoint under {config.run_uri}: starting from step 0", flush=True)
    tracking = start_tracking(config, "train_preference", resume=config.if_exists == "resume")
    return DriverRun(config, timer, memory, resume, tracking)


def select_and_guard(run: DriverRun) -> tuple[PairSelection, dict]:
    """The train and eval pairs, and the leakage guard's report (mode=remove drops flagged eval pairs)."""
    started = time.monotonic()
    selection = select_pairs(run.config)
    print(f"[data] {len(selection.train_ids)} train pairs ({selection.train_name}), {len(selection.eval_ids)} eval "
          f"pairs ({selection.eval_name}); kept aside at ingest: {selection.kept_aside}", flush=True)
    leakage = leakage_guard(run.config, selection)
    run.timer.mark("select_s", started)
    return selection, leakage


def precompute_reference(run: DriverRun, selection: PairSelection) -> tuple[pa.Table | None, str | None]:
    """``reference.mode=precompute`` with a loss that uses a reference: the table of reference
    log-probs (reused on resume) and its URI; otherwise ``(None, None)``."""
    config = run.config
    if not (config.mode == "policy" and config.needs_reference and config.reference.mode == "precompute"):
        return None, None  # mode=online: every worker holds the reference (it scores fresh samples)
    started = time.monotonic()
    uri = store.join(config.run_uri, "reference_logps.parquet")
    table = reference_table(config, selection, uri)
    print(f"[reference] {table.num_rows} pairs scored by the reference model in "
          f"{run.timer.mark('reference_s', started)} s -> {uri}", flush=True)
    return table, uri


def plan_training(run: DriverRun, selection: PairSelection,
                  reference: pa.Table | None) -> tuple[PreferenceRunPlan, dict[str, Any]]:
    """The run plan (steps, checkpoint folder of this attempt, where it resumes) and the datasets.

    Raises:
        ConfigError: the pairs cannot fill one step, or the checkpoint resumed from already
            trained every step of this run.
    """
    config = run.config
    world, batch = config.optim.num_workers, config.optim.batch_size
    steps_per_epoch = len(selection.train_ids) // world // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"optim.batch_size: {len(selection.train_ids)} pairs cannot fill one step of "
                          f"{world} x {batch}")
    total_steps = min(steps_per_epoch * config.optim.epochs, config.optim.max_steps or 10**12)
    resume_uri, resume_step = (run.resume[0], run.resume[1].step) if run.resume else (None, 0)
    if resume_step >= total_steps:
        raise ConfigError(f"optim.max_steps: {resume_uri} already trained {resume_step} of the run's "
                          f"{total_steps} steps")
    attempt = f"train-from-{resume_step:06d}" if run.resume else "train"  # one Ray Train run per attempt
    plan = PreferenceRunPlan(
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        checkpoint_root=store.join(config.run_uri, attempt),
        history_uri=store.join(config.run_uri, "history.json"),
        resume_checkpoint=resume_uri, resume_step=resume_step,
        current_time_step=selection.time_plan.current_step, has_eval=bool(selection.eval_ids),
        **run.tracking.plan_fields())
    datasets = {"train": pairs_for_training(config, selection, "train", reference, seed=config.optim.seed)}
    if selection.eval_ids:
        datasets["eval"] = pairs_for_training(config, selection, "eval", reference)
    unit = f"prompts x {config.online.samples_per_prompt} samples" if config.mode == "online" else "pairs"
    print(f"[train] {config.loss.name}: {world} workers x {batch} {unit}: {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps", flush=True)
    return plan, datasets


def fit(run: DriverRun, plan: PreferenceRunPlan, datasets: dict[str, Any],
        train_loop: Callable[[dict], None]) -> dict:
    """``TorchTrainer(...).fit()``: the job config and the plan cross to the workers as JSON-safe
    data; returns the last reported metrics (the ``final`` checkpoint's)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    config = run.config
    started = time.monotonic()
    attempt = plan.checkpoint_root.rstrip("/").rsplit("/", 1)[-1]
    result = TorchTrainer(
        train_loop,
        train_loop_config={"job": worker_job_config(config, PreferenceJobConfig), "plan": plan.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=config.optim.num_workers, use_gpu=config.optim.use_gpu,
                                     resources_per_worker={"CPU": config.optim.cpus_per_worker}),
        datasets=datasets, dataset_config=ordered_data_config(),
        run_config=train_run_config(attempt, config.run_uri, config.storage, config.ray_train_log_level,
                                    config.max_failures),
    ).fit()
    run.timer.mark("train_s", started)
    return dict(result.metrics or {})


def plot_history(config: PreferenceJobConfig, history: list[dict], steps_per_epoch: int) -> str:
    """The loss / accuracy / margin curves with epoch markers, as a PNG beside the run; its URI."""
    from whetstone.train.plots import plot_metrics

    plot_uri = store.join(config.run_uri, "training.png")
    keys = {"policy": ["loss", "reward_accuracy", "margin"], "reward_model": ["loss", "reward_accuracy"],
            "online": ["loss", "reward_mean", "response_tokens", "kl_to_reference"]}[config.mode]
    epoch_starts = [(m["step"], f"epoch {m['epoch']}") for m in history[1:]
                    if m["step"] % steps_per_epoch == 1 and steps_per_epoch > 1]
    plot_metrics(history, keys, plot_uri, markers=epoch_starts, storage=config.storage,
                 title=f"{config.run_name}: {loss_label(config)}")
    return plot_uri


def loss_label(config: PreferenceJobConfig) -> str:
    if config.mode == "reward_model":
        return "bradley_terry"
    return f"online {config.loss.name}" if config.mode == "online" else config.loss.name


def finish_run(run: DriverRun, selection: PairSelection, leakage: dict, reference_uri: str | None,
               plan: PreferenceRunPlan, metrics: dict, online: dict | None = None) -> dict:
    """Plot the history, write ``<run_uri>/report.json``, print the summary; returns the report.
    ``online`` (mode=online): ``before``, the starting policy's held-out figures, and
    ``reward_model_version``."""
    config = run.config
    history = json.loads(store.read_bytes(plan.history_uri, config.storage))
    plot_uri = plot_history(config, history, plan.steps_per_epoch)
    k = max(1, min(10, len(history) // 4))
    report = {
        "run_uri": config.run_uri, "mode": config.mode,
        "loss": loss_label(config),
        "model_uri": store.join(plan.checkpoint_root, "final"),
        "steps": plan.total_steps, "train_pairs": len(selection.train_ids), "eval_pairs": len(selection.eval_ids),
        "kept_aside_at_ingest": selection.kept_aside, "dropped_by_time_filter": selection.dropped_by_time_filter,
        "reference": {"mode": config.reference.mode if config.needs_reference else "none", "uri": reference_uri},
        "leakage": leakage,
        "resumed_from_step": plan.resume_step if plan.resume_checkpoint else None,
        "worker_restarts": worker_restarts(plan.checkpoint_root, config.storage),
        "first_loss_mean": float(np.mean([m["loss"] for m in history[:k]])),
        "last_loss_mean": float(np.mean([m["loss"] for m in history[-k:]])),
        "final_train": {key: metrics.get(key) for key in PAIR_METRICS},
        "eval": {key: metrics[key] for key in metrics if key.startswith("eval_")},
        "pairs_per_s": float(np.median([m["pairs_per_s"] for m in history])),
        "history_uri": plan.history_uri, "plot_uri": plot_uri,
        "tensorboard_uri": run.tracking.tensorboard_uri, "mlflow_run_id": run.tracking.mlflow_run_id,
        "timings_s": {**run.timer.marks, "total_s": round(time.monotonic() - run.timer.started, 2)},
        "peak_memory_gib": round(run.memory.stop() / 1024**3, 2),
    }
    if config.mode == "online":
        from whetstone.train.online_run import online_report

        online = online or {}
        report["online"] = online_report(config, history, online.get("before") or {}, metrics,
                                         online.get("reward_model_version"))
    report["model_card_uri"] = preference_card(config, selection, plan, report)  # README.md of the model
    report_uri = store.join(config.run_uri, "report.json")
    store.write_bytes(report_uri, json.dumps(report, indent=2).encode(), config.storage)
    run.tracking.log_eval(report["eval"], plan.total_steps)  # held-out accuracy and margin: TensorBoard's eval run
    run.tracking.log_report({key: report[key] for key in (
        "first_loss_mean", "last_loss_mean", "final_train", "eval", "pairs_per_s", "worker_restarts", "timings_s",
        "peak_memory_gib")}, plan.total_steps)
    run.tracking.finish()
    print_summary(report, report_uri)
    return report


def print_summary(report: dict, report_uri: str) -> None:
    """The run's summary lines; the last one is the report's path."""
    lines = ["", f"=== Whetstone preference run ({report['mode']}, {report['loss']}) ==="]
    lines.append(f"pairs: train {report['train_pairs']}, eval {report['eval_pairs']}; kept aside at ingest "
                 f"{report['kept_aside_at_ingest']}")
    resumed = f" (resumed at step {report['resumed_from_step']})" if report["resumed_from_step"] is not None else ""
    if report["worker_restarts"]:
        resumed += f" ({report['worker_restarts']} worker-group restart(s) after failures)"
    lines.append(f"loss: first steps {report['first_loss_mean']:.4f} -> last steps {report['last_loss_mean']:.4f} "
                 f"over {report['steps']} steps{resumed}; {report['pairs_per_s']:.1f} "
                 f"{'prompts' if report['mode'] == 'online' else 'pairs'}/s")
    if "online" in report:
        from whetstone.train.online_run import print_online_summary

        lines.extend(print_online_summary(report["online"]))
    elif report["eval"]:
        ev = report["eval"]
        lines.append(f"held-out: reward accuracy {ev['eval_reward_accuracy']:.3f}, margin {ev['eval_margin']:+.4f} "
                     f"on {ev['eval_pairs']} pairs")
    leak = report["leakage"]
    if leak.get("mode") != "off":
        lines.append(f"leakage: {leak['flagged']} eval prompts near a train prompt (removed {leak['removed']})")
    lines.append(f"peak memory {report['peak_memory_gib']} GiB; total {report['timings_s']['total_s']} s")
    lines.append(f"model: {report['model_uri']}")
    lines.append(f"plot: {report['plot_uri']}")
    if report.get("tensorboard_uri"):
        lines.append(f"tensorboard: tensorboard --logdir {report['tensorboard_uri']}")
    lines.append(f"report: {report_uri}")
    print("\n".join(lines), flush=True)
