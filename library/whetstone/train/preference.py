"""Preference training, worker side: what one training step and the held-out evaluation call.

Loading and saving the policy (HF folder, storage URI or GGUF; optional LoRA), the loss dispatch,
tokenising pairs, the reference log-probs of a batch, per-step metrics and the rank-0 progress
log. The worker's setup, step and checkpoint hook are in :mod:`whetstone.train.preference_worker`;
the driver's stages in :mod:`whetstone.train.preference_run`. Nothing here imports either.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig
from whetstone.config.preference import (
    LoRAConfig,
    LossConfig,
    OnlineConfig,
    PolicyConfig,
    PreferenceJobConfig,
)
from whetstone.data import schemas as S
from whetstone.losses.preference_base import PreferenceLossOutput
from whetstone.models.encoder import set_dropout
from whetstone.train.preference_data import REF_CHOSEN, REF_REJECTED

# Per-step metrics that are averaged over workers (each worker sees its own pairs).
PAIR_METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin")
# Rank 0's per-step history so far, in every checkpoint folder (a resumed run continues it).
HISTORY_FILE = "history.json"


def load_policy(policy: PolicyConfig, storage: StorageConfig | None, lora: LoRAConfig | None = None):
    """Load the causal LM and its tokenizer (HF folder, storage URI, or GGUF), optionally with LoRA.

    Returns:
        (model, tokenizer); the model is on CPU in ``policy.dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from whetstone.models.assets import resolve_model_path

    path = resolve_model_path(policy.path)
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


def build_loss(loss: LossConfig, online: OnlineConfig | None = None) -> nn.Module:
    """The configured preference loss module (``grpo`` takes its settings from ``online``)."""
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
    if loss.name == "kto":
        from whetstone.losses.kto import KTOLoss

        return KTOLoss(loss.beta, loss.kto_desirable_weight, loss.kto_undesirable_weight)
    if loss.name == "grpo":
        from whetstone.losses.grpo import GRPOLoss

        online = online or OnlineConfig()
        return GRPOLoss(epsilon_low=online.grpo_epsilon, beta=online.grpo_beta, loss_type=online.grpo_loss_type,
                        max_completion_length=online.max_new_tokens)
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
    if name == "kto":
        return kto_as_pairs(loss_fn, chosen, rejected, ref_chosen, ref_rejected, reference.get(KTO_REFERENCE_POINT))
    return loss_fn(chosen, rejected, ref_chosen, ref_rejected, *counts)


KTO_REFERENCE_POINT = "kto_reference_point"  # reference dict key: KTO's z0 for the batch


def kto_as_pairs(loss_fn: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, reference_point: torch.Tensor | None) -> PreferenceLossOutput:
    """Offline KTO on stored pairs: the chosen responses are the desirable examples, the rejected
    ones the undesirable (KTO itself needs no pairing). Each pair's loss is the mean of its two
    examples' losses, so the pair metrics (implicit-reward accuracy, margin) read as DPO's do.
    ``reference_point`` None (held-out evaluation): z0 = 0."""
    size = chosen.shape[0]
    z0 = reference_point if reference_point is not None else torch.zeros((), device=chosen.device)
    desirable = torch.arange(2 * size, device=chosen.device) < size  # (2B,)
    out = loss_fn(torch.cat([chosen, rejected]), torch.cat([ref_chosen, ref_rejected]), desirable, z0)
    return PreferenceLossOutput(losses=(out.losses[:size] + out.losses[size:]) / 2,
                                chosen_rewards=out.rewards[:size], rejected_rewards=out.rewards[size:])


def kto_reference_point_of(model: nn.Module, reference_model: nn.Module, tokenizer: Any, raw: dict[str, np.ndarray],
                           config: PreferenceJobConfig) -> torch.Tensor:
    """KTO's z0 for a batch of pairs, as the paper estimates it: every prompt with the responses
    of the PREVIOUS pair in the batch (``np.roll`` by one: mismatched, so neither desirable nor not;
    a batch of one pair has no other, and z0 then comes from its own), the mean log-ratio
    of policy to reference over them, clamped at 0, over every worker; no gradient."""
    from whetstone.losses.kto import kto_reference_point
    from whetstone.models.policy import preference_logps, unwrap_model

    shifted = {**raw, S.CHOSEN: np.roll(raw[S.CHOSEN], 1), S.REJECTED: np.roll(raw[S.REJECTED], 1)}
    batch = tokenize_pairs(tokenizer, shifted, config).to(next(model.parameters()).device)
    with torch.no_grad():
        policy = preference_logps(unwrap_model(model), batch, config.policy.chunk_size)
        reference = preference_logps(reference_model, batch, config.policy.chunk_size)
    return kto_reference_point(torch.cat([policy["chosen_logps"], policy["rejected_logps"]]),
                               torch.cat([reference["chosen_logps"], reference["rejected_logps"]]))


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every worker (a copy on the backend's device: NCCL reduces CUDA tensors
    only, gloo CPU ones); returns it on its own device. Identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    moved = tensor.to(device)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over all workers (one small all-reduce); identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    tensor = all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))  # (K,)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, tensor.tolist(), strict=True)}


@torch.no_grad()
def evaluate_shard(model: nn.Module, tokenizer: Any, batches, config: PreferenceJobConfig,
                   reference_model: nn.Module | None = None) -> dict[str, float]:
    """Reward accuracy, mean margin and loss on this worker's held-out pairs, summed over all workers.

    Every worker calls this exactly once (it ends with one all-reduce), whatever its shard size.
    """

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
    totals = all_reduce_sum(totals)
    core.train(was_training)
    pairs = max(totals[0].item(), 1.0)
    return {"eval_pairs": int(totals[0].item()), "eval_reward_accuracy": totals[1].item() / pairs,
            "eval_margin": totals[2].item() / pairs, "eval_loss": totals[3].item() / pairs}


def evaluate_reward_shard(reward: nn.Module, batches) -> dict[str, float]:
    """Pairwise accuracy and mean score margin of a reward model on this worker's held-out pairs,
    summed over all workers (one all-reduce per worker)."""

    totals = torch.zeros(3, dtype=torch.float64)  # pairs, correct, margin sum
    for raw in batches:
        if len(raw[S.PAIR_ID]) == 0:
            continue
        prompts = list(raw[S.PROMPT])
        margins = reward.score(prompts, list(raw[S.CHOSEN])) - reward.score(prompts, list(raw[S.REJECTED]))
        totals += torch.tensor([len(margins), float((margins > 0).sum()), float(margins.sum())], dtype=torch.float64)
    totals = all_reduce_sum(totals)
    pairs = max(totals[0].item(), 1.0)
    return {"eval_pairs": int(totals[0].item()), "eval_reward_accuracy": totals[1].item() / pairs,
            "eval_margin": totals[2].item() / pairs}


class PreferenceStepLog:
    """Per-step metrics (averaged over workers) and rank 0's progress lines and history."""

    def __init__(self, rank: int, total_steps: int, log_every: int, global_batch: int) -> None:
        self.rank, self.total_steps, self.log_every, self.global_batch = rank, total_steps, log_every, global_batch
        self.started = self.last = time.monotonic()
        self.history: list[dict[str, Any]] = []
        self.resumed_steps = 0  # history entries an earlier attempt logged (see resume_history)
        self.writer = None  # rank 0: TensorBoard / MLflow (whetstone.train.tracking.metric_writer)
        self.last_step = 0  # the newest step trained (mode=online's evaluation versions the weights by it)

    def resume_history(self, checkpoint: str, step: int, storage: StorageConfig | None) -> None:
        """Rank 0 takes the history of steps 1..``step`` from the checkpoint resumed from (nothing
        when it holds none), so a resumed run's history and plot cover the whole run. Every rank
        takes ``step`` as the newest step trained."""
        self.last_step = step
        if self.rank != 0:
            return
        try:
            saved = json.loads(store.read_bytes(store.join(checkpoint, HISTORY_FILE), storage))
        except FileNotFoundError:
            return
        self.history = [m for m in saved if m["step"] <= step]
        self.resumed_steps = len(self.history)

    def save_history(self, folder: str) -> None:
        """Put the history so far into a checkpoint folder (rank 0 writes checkpoints)."""
        with open(os.path.join(folder, HISTORY_FILE), "w") as fh:
            json.dump(self.history, fh)
        if self.writer is not None:  # the event files of an s3:// run go up with each checkpoint
            self.writer.sync()

    def step(self, step: int, epoch: int, lr: float, values: dict[str, float]) -> dict[str, Any]:
        now = time.monotonic()
        step_s, self.last = now - self.last, now
        metrics = {"step": step, "epoch": epoch, "lr": lr, "step_s": step_s,
                   "pairs_per_s": self.global_batch / max(step_s, 1e-9), **mean_over_workers(values)}
        if self.rank == 0:
            self.history.append(metrics)
            if self.writer is not None:
                self.writer.add(metrics)
            if step % self.log_every == 0 or step == self.total_steps:
                print(self.line(metrics), flush=True)
        self.last_step = step
        return metrics

    def line(self, metrics: dict[str, Any]) -> str:
        """Rank 0's progress line of one step."""
        return (f"[train] step {metrics['step']}/{self.total_steps} epoch {metrics['epoch']} loss "
                f"{metrics['loss']:.4f} acc {metrics['reward_accuracy']:.2f} margin {metrics['margin']:+.4f} "
                f"(chosen {metrics['chosen_reward']:+.4f} rejected {metrics['rejected_reward']:+.4f}) "
                f"lr {metrics['lr']:.2e} {metrics['pairs_per_s']:.1f} pairs/s")

    def finish(self, history_uri: str, storage: StorageConfig) -> None:
        """Rank 0 writes the per-step history (the driver plots it)."""
        if self.rank != 0:
            return
        if self.writer is not None:
            self.writer.close()
        trained = len(self.history) - self.resumed_steps
        print(f"[train] done: {trained} steps in {time.monotonic() - self.started:.1f} s", flush=True)
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
