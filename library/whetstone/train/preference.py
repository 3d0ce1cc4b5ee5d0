"""Preference training: the worker's step helpers and the driver's orchestration.

The job file (``jobs/train_preference.py``) holds the loop; this module holds what the loop calls
(policy loading, the loss dispatch, metrics, eval on held-out pairs) and :func:`run_preference`,
which runs on the driver: select pairs, leakage guard, reference precompute, ``TorchTrainer``,
report and plot.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig, dump_config
from whetstone.config.preference import LoRAConfig, LossConfig, PolicyConfig, PreferenceJobConfig
from whetstone.data import schemas as S
from whetstone.losses.preference_base import PreferenceLossOutput
from whetstone.models.encoder import set_dropout
from whetstone.train.preference_data import REF_CHOSEN, REF_REJECTED

# Per-step metrics that are averaged over workers (each worker sees its own pairs).
PAIR_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin")


def load_policy(policy: PolicyConfig, storage: StorageConfig | None, lora: LoRAConfig | None = None):
    """Load the causal LM and its tokenizer (HF folder, storage URI, or GGUF), optionally with LoRA.

    Returns:
        (model, tokenizer); the model is on CPU in ``policy.dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = policy.path
    if "://" in path:
        path = str(store.download_dir(path, tempfile.mkdtemp(prefix="whetstone-policy-"), storage))
    gguf = {"gguf_file": policy.gguf_file} if policy.gguf_file else {}
    dtype = getattr(torch, policy.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **gguf)
    except (OSError, ValueError) as err:
        raise ConfigError(f"policy.path: cannot load a causal LM from {path}: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(policy.tokenizer or path, **({} if policy.tokenizer else gguf))
    if policy.gguf_file:
        _forget_gguf_origin(model)
    if policy.disable_dropout:
        set_dropout(model, 0.0)
    if lora is not None and lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model, tokenizer


def _forget_gguf_origin(model: nn.Module) -> None:
    """transformers dequantises GGUF weights to ``dtype`` on load but keeps a quantizer marker that
    makes ``save_pretrained`` refuse; the weights are plain tensors, so drop the marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if quantizer is not None and "gguf" in method:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def build_loss(loss: LossConfig) -> nn.Module:
    """The configured preference loss module."""
    from whetstone.losses import DPOLoss, NPOLoss, NSDPOLoss, ORPOLoss, SimPOLoss

    if loss.name in ("dpo", "ipo", "hinge"):
        return DPOLoss(loss.beta, "sigmoid" if loss.name == "dpo" else loss.name)
    if loss.name == "cdpo":
        return DPOLoss(loss.beta, "sigmoid", label_smoothing=loss.label_smoothing)
    if loss.name == "ns_dpo":
        return NSDPOLoss(loss.beta, loss.gamma)
    if loss.name == "simpo":
        return SimPOLoss(loss.beta, loss.target_margin)
    if loss.name == "orpo":
        return ORPOLoss(loss.beta)
    return NPOLoss(loss.beta)


def eval_loss(loss: LossConfig) -> nn.Module:
    """The loss used for held-out metrics: NS-DPO's rewards are DPO's, without the cross-worker weights."""
    return build_loss(loss.model_copy(update={"name": "dpo"}) if loss.name == "ns_dpo" else loss)


def apply_loss(loss_fn: nn.Module, name: str, logps: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
               time_steps: torch.Tensor | None = None, current_step: float | None = None) -> PreferenceLossOutput:
    """Call the loss with the inputs it takes.

    Args:
        logps: ``chosen_logps``, ``rejected_logps`` (B,) with grad; token counts (B,).
        reference: ``chosen_logps``, ``rejected_logps`` (B,) of the reference (empty for SimPO/ORPO).
        time_steps: NS-DPO t_i (B,); current_step T.
    """
    chosen, rejected = logps["chosen_logps"], logps["rejected_logps"]
    counts = logps["chosen_token_counts"], logps["rejected_token_counts"]
    if name in ("simpo", "orpo"):
        return loss_fn(chosen, rejected, *counts)
    ref_chosen, ref_rejected = reference["chosen_logps"], reference["rejected_logps"]
    if name == "npo":
        return loss_fn(rejected, ref_rejected, chosen, ref_chosen)
    if name == "ns_dpo":
        return loss_fn(chosen, rejected, ref_chosen, ref_rejected, time_steps, current_step)
    return loss_fn(chosen, rejected, ref_chosen, ref_rejected, *counts)


def tokenize_pairs(tokenizer: Any, raw: dict[str, np.ndarray], config: PreferenceJobConfig):
    from whetstone.models.policy import build_preference_batch

    data = config.data
    prompts, chosen, rejected = list(raw[S.PROMPT]), list(raw[S.CHOSEN]), list(raw[S.REJECTED])
    if data.chat_template:
        prompts, chosen, rejected = chat_inputs(prompts, chosen, rejected)
    return build_preference_batch(tokenizer, prompts, chosen, rejected, data.max_length, data.max_prompt_length,
                                  data.chat_template)


def chat_inputs(prompts: list[str], chosen: list[str], rejected: list[str]) -> tuple[list, list[str], list[str]]:
    """hh-rlhf dialogue prompts become chat messages (other prompts stay one user message)."""
    from whetstone.data.hh_rlhf import ASSISTANT_MARKER, HUMAN_MARKER, dialogue_to_messages

    messages = [dialogue_to_messages(p) if p.startswith(HUMAN_MARKER) and p.endswith(ASSISTANT_MARKER) else p
                for p in prompts]
    return messages, [c.strip() for c in chosen], [r.strip() for r in rejected]


def reference_logps(raw: dict[str, np.ndarray], batch, reference_model: nn.Module | None,
                    chunk_size: int) -> dict[str, torch.Tensor]:
    """The reference's log-probs: the precomputed columns, or a no-grad forward of the frozen copy."""
    from whetstone.models.policy import preference_logps

    if reference_model is not None:
        with torch.no_grad():
            out = preference_logps(reference_model, batch, chunk_size)
        return {"chosen_logps": out["chosen_logps"], "rejected_logps": out["rejected_logps"]}
    if REF_CHOSEN not in raw:
        return {}
    return {"chosen_logps": torch.as_tensor(np.asarray(raw[REF_CHOSEN], dtype=np.float32)),
            "rejected_logps": torch.as_tensor(np.asarray(raw[REF_REJECTED], dtype=np.float32))}


def pair_metrics(loss: torch.Tensor, out: PreferenceLossOutput) -> dict[str, float]:
    """Loss, rewards, accuracy and margin of one worker's batch (floats)."""
    return {"loss": float(loss.detach()), "chosen_reward": float(out.chosen_rewards.nanmean()),
            "rejected_reward": float(out.rejected_rewards.mean()), "reward_accuracy": float(out.accuracies.mean()),
            "margin": float(out.margins.nanmean())}


def mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over all workers (one small all-reduce); identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)  # (K,)
    dist.all_reduce(tensor)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, tensor.tolist(), strict=True)}


@torch.no_grad()
def evaluate_shard(model: nn.Module, tokenizer: Any, batches, config: PreferenceJobConfig,
                   reference_model: nn.Module | None = None) -> dict[str, float]:
    """Reward accuracy, mean margin and loss on this worker's held-out pairs, summed over all workers.

    Every worker calls this exactly once (it ends with one all-reduce), whatever its shard size.
    """
    import torch.distributed as dist

    from whetstone.models.policy import preference_logps, unwrap_model

    core = unwrap_model(model)  # no DDP hooks: shards may hold different numbers of batches
    was_training = core.training
    core.eval()
    loss_fn = eval_loss(config.loss)
    totals = torch.zeros(4, dtype=torch.float64)  # pairs, correct, margin sum, loss sum
    for raw in batches:
        if len(raw[S.PAIR_ID]) == 0:
            continue
        batch = tokenize_pairs(tokenizer, raw, config)
        logps = preference_logps(core, batch, config.policy.chunk_size)
        out = apply_loss(loss_fn, config.loss.name, logps,
                         reference_logps(raw, batch, reference_model, config.policy.chunk_size))
        totals += torch.tensor([len(out.losses), float(out.accuracies.sum()), float(out.margins.nansum()),
                                float(out.losses.sum())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    core.train(was_training)
    pairs = max(totals[0].item(), 1.0)
    return {"eval_pairs": int(totals[0].item()), "eval_reward_accuracy": totals[1].item() / pairs,
            "eval_margin": totals[2].item() / pairs, "eval_loss": totals[3].item() / pairs}


def evaluate_reward_shard(reward: nn.Module, batches) -> dict[str, float]:
    """Pairwise accuracy and mean score margin of a reward model on this worker's held-out pairs,
    summed over all workers (one all-reduce per worker)."""
    import torch.distributed as dist

    totals = torch.zeros(3, dtype=torch.float64)  # pairs, correct, margin sum
    for raw in batches:
        if len(raw[S.PAIR_ID]) == 0:
            continue
        prompts = list(raw[S.PROMPT])
        margins = reward.score(prompts, list(raw[S.CHOSEN])) - reward.score(prompts, list(raw[S.REJECTED]))
        totals += torch.tensor([len(margins), float((margins > 0).sum()), float(margins.sum())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    pairs = max(totals[0].item(), 1.0)
    return {"eval_pairs": int(totals[0].item()), "eval_reward_accuracy": totals[1].item() / pairs,
            "eval_margin": totals[2].item() / pairs}


class PreferenceStepLog:
    """Per-step metrics (averaged over workers) and rank 0's progress lines and history."""

    def __init__(self, rank: int, total_steps: int, log_every: int, global_batch: int) -> None:
        self.rank, self.total_steps, self.log_every, self.global_batch = rank, total_steps, log_every, global_batch
        self.started = self.last = time.monotonic()
        self.history: list[dict[str, Any]] = []

    def step(self, step: int, epoch: int, lr: float, values: dict[str, float]) -> dict[str, Any]:
        now = time.monotonic()
        step_s, self.last = now - self.last, now
        metrics = {"step": step, "epoch": epoch, "lr": lr, "step_s": step_s,
                   "pairs_per_s": self.global_batch / max(step_s, 1e-9), **mean_over_workers(values)}
        if self.rank == 0:
            self.history.append(metrics)
            if step % self.log_every == 0 or step == self.total_steps:
                print(f"[train] step {step}/{self.total_steps} epoch {epoch} loss {metrics['loss']:.4f} "
                      f"acc {metrics['reward_accuracy']:.2f} margin {metrics['margin']:+.4f} "
                      f"(chosen {metrics['chosen_reward']:+.4f} rejected {metrics['rejected_reward']:+.4f}) "
                      f"lr {lr:.2e} {metrics['pairs_per_s']:.1f} pairs/s", flush=True)
        return metrics

    def finish(self, history_uri: str, storage: StorageConfig) -> None:
        """Rank 0 writes the per-step history (the driver plots it)."""
        if self.rank != 0:
            return
        print(f"[train] done: {len(self.history)} steps in {time.monotonic() - self.started:.1f} s", flush=True)
        store.write_bytes(history_uri, json.dumps(self.history).encode(), storage)


def save_policy(model: nn.Module, tokenizer: Any, folder: str) -> None:
    """HF layout (``from_pretrained`` loads it); LoRA adapters are merged into a copy first."""
    import copy

    from whetstone.models.policy import unwrap_model

    core = unwrap_model(model)
    if hasattr(core, "merge_and_unload"):
        core = copy.deepcopy(core).merge_and_unload()
    core.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------


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
    return config.model_copy(update=update)


def _prepare_run_dir(config: PreferenceJobConfig) -> None:
    if store.exists(config.run_uri, config.storage):
        if config.if_exists == "error":
            raise ConfigError(f"run_name: {config.run_uri} exists; set if_exists=overwrite or resume")
        if config.if_exists == "overwrite":
            print(f"[run] removing previous outputs at {config.run_uri}", flush=True)
            store.delete_dir(config.run_uri, config.storage)


def run_preference(config: PreferenceJobConfig, train_loop: Callable[[dict], None]) -> dict:
    """Run the whole job on the driver; returns the report (also at ``<run_uri>/report.json``)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from whetstone.train.memory import MemorySampler
    from whetstone.train.pipeline import Timer, init_ray, train_run_config
    from whetstone.train.preference_data import (
        leakage_guard,
        pairs_for_training,
        reference_table,
        select_pairs,
    )

    timer = Timer()
    memory = MemorySampler(include_ray=bool(os.environ.get("RAY_ADDRESS"))).start()
    config = absolute_local_paths(config)
    print(f"[run] resolved config:\n{dump_config(config)}", flush=True)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    _prepare_run_dir(config)
    run_uri = config.run_uri
    t = time.monotonic()
    selection = select_pairs(config)
    print(f"[data] {len(selection.train_ids)} train pairs ({selection.train_name}), {len(selection.eval_ids)} eval "
          f"pairs ({selection.eval_name}); kept aside at ingest: {selection.kept_aside}", flush=True)
    leakage = leakage_guard(config, selection)
    timer.mark("select_s", t)

    reference, reference_uri = None, None
    if config.needs_reference and config.reference.mode == "precompute":
        t = time.monotonic()
        reference_uri = store.join(run_uri, "reference_logps.parquet")
        reference = reference_table(config, selection, reference_uri)
        print(f"[reference] {reference.num_rows} pairs scored by the reference model in "
              f"{timer.mark('reference_s', t)} s -> {reference_uri}", flush=True)

    world, batch = config.optim.num_workers, config.optim.batch_size
    steps_per_epoch = len(selection.train_ids) // world // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"optim.batch_size: {len(selection.train_ids)} pairs cannot fill one step of "
                          f"{world} x {batch}")
    total_steps = min(steps_per_epoch * config.optim.epochs, config.optim.max_steps or 10**12)
    datasets = {"train": pairs_for_training(config, selection, "train", reference, seed=config.optim.seed)}
    if selection.eval_ids:
        datasets["eval"] = pairs_for_training(config, selection, "eval", reference)
    plan = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "current_time_step": selection.time_plan.current_step,
            "history_uri": store.join(run_uri, "history.json"), "has_eval": bool(selection.eval_ids)}
    job = config.model_dump(mode="json")
    job["storage"] = config.storage.resolved().to_wire()  # workers need the real secrets
    print(f"[train] {config.loss.name}: {world} workers x batch {batch}: {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps", flush=True)
    t = time.monotonic()
    result = TorchTrainer(
        train_loop, train_loop_config={"job": job, "plan": plan},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=config.optim.use_gpu,
                                     resources_per_worker={"CPU": config.optim.cpus_per_worker}),
        datasets=datasets,
        run_config=train_run_config("train", run_uri, config.storage, config.ray_train_log_level),
    ).fit()
    timer.mark("train_s", t)
    return _finish(config, selection, leakage, reference_uri, dict(result.metrics or {}), plan, timer, memory)


def _finish(config, selection, leakage, reference_uri, metrics, plan, timer, memory) -> dict:
    from whetstone.train.plots import plot_metrics

    run_uri = config.run_uri
    history = json.loads(store.read_bytes(plan["history_uri"], config.storage))
    plot_uri = store.join(run_uri, "training.png")
    keys = ["loss", "reward_accuracy", "margin"] if config.mode == "policy" else ["loss", "reward_accuracy"]
    epoch_starts = [(m["step"], f"epoch {m['epoch']}") for m in history[1:] if m["step"] % plan["steps_per_epoch"] == 1
                    and plan["steps_per_epoch"] > 1]
    plot_metrics(history, keys, plot_uri, markers=epoch_starts, storage=config.storage,
                 title=f"{config.run_name}: {config.loss.name if config.mode == 'policy' else 'reward model'}")
    k = max(1, min(10, len(history) // 4))
    report = {
        "run_uri": run_uri, "mode": config.mode,
        "loss": config.loss.name if config.mode == "policy" else "bradley_terry",
        "model_uri": store.join(run_uri, "train", "final"),
        "steps": plan["total_steps"], "train_pairs": len(selection.train_ids), "eval_pairs": len(selection.eval_ids),
        "kept_aside_at_ingest": selection.kept_aside, "dropped_by_time_filter": selection.dropped_by_time_filter,
        "reference": {"mode": config.reference.mode if config.needs_reference else "none", "uri": reference_uri},
        "leakage": leakage,
        "first_loss_mean": float(np.mean([m["loss"] for m in history[:k]])),
        "last_loss_mean": float(np.mean([m["loss"] for m in history[-k:]])),
        "final_train": {key: metrics.get(key) for key in PAIR_METRICS},
        "eval": {key: metrics[key] for key in metrics if key.startswith("eval_")},
        "pairs_per_s": float(np.median([m["pairs_per_s"] for m in history])),
        "history_uri": plan["history_uri"], "plot_uri": plot_uri,
        "timings_s": {**timer.marks, "total_s": round(time.monotonic() - timer.started, 2)},
        "peak_memory_gib": round(memory.stop() / 1024**3, 2),
    }
    report_uri = store.join(run_uri, "report.json")
    store.write_bytes(report_uri, json.dumps(report, indent=2).encode(), config.storage)
    _print_summary(report, report_uri)
    return report


def _print_summary(report: dict, report_uri: str) -> None:
    lines = ["", f"=== Whetstone preference run ({report['mode']}, {report['loss']}) ==="]
    lines.append(f"pairs: train {report['train_pairs']}, eval {report['eval_pairs']}; kept aside at ingest "
                 f"{report['kept_aside_at_ingest']}")
    lines.append(f"loss: first steps {report['first_loss_mean']:.4f} -> last steps {report['last_loss_mean']:.4f} "
                 f"over {report['steps']} steps; {report['pairs_per_s']:.1f} pairs/s")
    if report["eval"]:
        ev = report["eval"]
        lines.append(f"held-out: reward accuracy {ev['eval_reward_accuracy']:.3f}, margin {ev['eval_margin']:+.4f} "
                     f"on {ev['eval_pairs']} pairs")
    leak = report["leakage"]
    if leak.get("mode") != "off":
        lines.append(f"leakage: {leak['flagged']} eval prompts near a train prompt (removed {leak['removed']})")
    lines.append(f"peak memory {report['peak_memory_gib']} GiB; total {report['timings_s']['total_s']} s")
    lines.append(f"model: {report['model_uri']}")
    lines.append(f"plot: {report['plot_uri']}")
    lines.append(f"report: {report_uri}")
    print("\n".join(lines), flush=True)
