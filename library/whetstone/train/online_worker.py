"""Online preference training, worker side: sample, score, learn, push the weights.

The loop (``jobs/train_preference.py``'s ``online_loop_per_worker``) reads::

    worker = setup_online_run(config, plan)          # policy, DDP, AdamW, reference; actors get the weights
    for epoch, state, raw in train_batches(shard, config, plan, worker.start, worker.rank):
        values = online_step(worker, raw, config, state.step)   # generate, score, loss, optimiser, push
        metrics = worker.log.step(state.step, epoch, worker.lr(), values)
        after_step(worker, metrics, state, config, plan)
    finish_worker(worker, metrics, state, config, plan)  # greedy held-out rewards, KL, the `final` checkpoint

One step on one worker: its ``optim.batch_size`` prompts go to the generation actors, which sample
``online.samples_per_prompt`` completions each with the newest pushed weights (version = the step
that pushed them); the reward model scores every completion through its Serve handle; the loss
trains on them:

* ``dpo`` / ``ipo``: the best and the worst completion of each prompt as (chosen, rejected)
  (online DPO, Guo et al., arXiv 2402.04792); prompts whose k rewards are all equal teach nothing
  and are left out of the mean (their share: ``tied_share``);
* ``kto``: every completion above its prompt's mean reward is desirable, every one below it not
  (equal to the mean, or a group whose rewards all tie: left out); the reference point z0 is the
  mean log-ratio of policy to reference over the step's own samples on all workers: a direct KL
  estimate where the samples come from the trained weights at temperature 1 (sync_every=1),
  approximate otherwise; the paper's mismatched pairs stand in for samples the offline data lacks;
* ``grpo``: every completion, advantages normalised within each prompt's group, ratios against
  the generating weights' own per-token log-probs (they differ from the trained weights when
  ``sync_every`` > 1), the clipped surrogate and the per-token KL to the reference (arXiv 2402.03300).

Every step reports the mean reward, the mean response length and the KL to the reference (per
sample the k3 estimate summed over its tokens, :func:`whetstone.online.batch.sequence_kl`, at the
sampling temperature; ``kl_log_ratio``: the plain log-ratio estimate), besides the weights'
version and lag and where the time went.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from whetstone.config.preference import PreferenceJobConfig
from whetstone.data import schemas as S
from whetstone.models.policy import sequence_logps, token_logps
from whetstone.online.batch import SampleBatch, pad_token_id, sample_batch, sequence_kl
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference import PreferenceStepLog, apply_loss
from whetstone.train.preference_worker import (
    PolicyRun,
    eval_batches,
    model_device,
    optimise,
    setup_policy_run,
)


@dataclass(kw_only=True)
class OnlineRun(PolicyRun):
    """The policy worker's state plus the generation actors and the reward model's client."""

    pool: Any  # whetstone.online.generation.GenerationPool
    reward: Any  # whetstone.online.reward_client.RewardClient
    pushed_version: int | None = None  # the weights' version the actors hold, as this worker group knows it
    reward_version: str | None = None  # the reward model's version that scored the last step

    def evaluate(self, config: PreferenceJobConfig) -> dict[str, float]:
        from whetstone.train.online_eval import evaluate_online_shard

        push_weights(self, self.log.last_step)  # the final weights, for the greedy held-out completions
        metrics = evaluate_online_shard(self, eval_batches(config), config)
        if self.rank == 0:
            print(f"[eval] held-out prompts: mean reward {metrics['eval_reward_mean']:+.4f} (std "
                  f"{metrics['eval_reward_std']:.4f}), {metrics['eval_response_tokens']:.1f} tokens per greedy "
                  f"response, KL to the reference {metrics['eval_kl_to_reference']:.4f} on "
                  f"{metrics['eval_prompts']} prompts", flush=True)
        return metrics


class OnlineStepLog(PreferenceStepLog):
    """The progress line of an online step: reward, length, KL, version lag, time split."""

    def line(self, metrics: dict[str, Any]) -> str:
        return (f"[train] step {metrics['step']}/{self.total_steps} loss {metrics['loss']:.4f} reward "
                f"{metrics['reward_mean']:+.4f} (best {metrics['reward_best']:+.4f}) len "
                f"{metrics['response_tokens']:.1f} KL {metrics['kl_to_reference']:.4f} weights v"
                f"{metrics['policy_version']:.0f} (lag {metrics['policy_lag']:.0f}) | generate "
                f"{metrics['generate_s']:.1f} s score {metrics['score_s']:.2f} s train {metrics['train_s']:.1f} s "
                f"lr {metrics['lr']:.2e}")


def reward_client(plan: PreferenceRunPlan) -> Any:
    """The workers' reward scorer: the Serve app's handle, or the HTTP endpoint."""
    import os

    from whetstone.online.reward_client import RewardClient

    if plan.reward_app:
        return RewardClient.from_handle(plan.reward_app)
    return RewardClient.from_url(plan.reward_url, os.environ.get("WHETSTONE_REWARD_TOKEN"))


def setup_online_run(config: PreferenceJobConfig, plan: PreferenceRunPlan) -> OnlineRun:
    """The policy worker (model, DDP, AdamW, schedule, resume, frozen reference), the generation
    pool found by name and the reward client; the actors then get this worker's weights, versioned
    by the step it starts from (a restarted worker group may have rolled back past the actors')."""
    from whetstone.online.generation import GenerationPool

    base = setup_policy_run(config, plan, OnlineStepLog)  # its loss_fn: build_loss(config.loss, config.online)
    fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
    run = OnlineRun(**fields, pool=GenerationPool.connect(plan.generation_actors), reward=reward_client(plan))
    # A fresh run's actors already hold v0 (the starting weights); a restarted or resumed group
    # rolls them back or forward to its checkpoint's.
    run.pushed_version = run.pool.version() if run.start.step == 0 else None
    push_weights(run, run.start.step)
    return run


def push_weights(run: OnlineRun, version: int) -> float:
    """Rank 0 puts the policy's weights in the object store once and every generation actor loads
    them as ``version``; all workers wait for it, so no one samples with older weights after."""
    from whetstone.online.generation import policy_state_dict

    seconds = 0.0
    if run.pushed_version == version:  # the same on every rank: no push, no barrier
        return seconds
    if run.rank == 0:
        seconds = run.pool.push_weights(policy_state_dict(run.model), version)
    run.pushed_version = version
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return seconds


def sample_seed(config: PreferenceJobConfig, step: int, rank: int) -> int:
    """The sampling seed of one worker's step: a resumed run samples what the uninterrupted one did."""
    return (config.optim.seed * 1_000_003 + step * 1_009 + rank) % (2**31 - 1)


def online_step(run: OnlineRun, raw: dict, config: PreferenceJobConfig, step: int) -> dict[str, float]:
    """Generate, score, one optimiser step, and (every ``sync_every`` steps) push the weights."""
    from whetstone.online.rewards import shape_rewards

    online = config.online
    prompts, k = [str(p) for p in raw[S.PROMPT]], online.samples_per_prompt
    started = time.monotonic()
    samples = run.pool.generate(prompts, k, seed=sample_seed(config, step, run.rank))
    generated = time.monotonic()
    scores, reward_version = run.reward.score([p for p in prompts for _ in range(k)],
                                              [text for row in samples.texts for text in row])  # (P*k,)
    scored = time.monotonic()
    if reward_version != run.reward_version and run.reward_version is not None and run.rank == 0:
        print(f"[train] step {step}: the reward model changed from {run.reward_version} to {reward_version}",
              flush=True)
    run.reward_version = reward_version
    batch = sample_batch(samples, pad_token_id(run.tokenizer))
    batch = batch.to(model_device(run.model))
    raw_rewards = np.asarray(scores, dtype=np.float32).reshape(len(prompts), k)  # (P, k)
    rewards = shape_rewards(raw_rewards, batch.lengths.view(len(prompts), k).cpu().numpy(), online.length_penalty,
                            online.length_normalise)  # (P, k): what the loss learns from
    with torch.no_grad():
        ref_tokens, mask = token_logps(run.reference_model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                       config.policy.chunk_size, online.temperature)  # (N, L-1)
    kl, log_ratio = sequence_kl(batch.sample_logps, ref_tokens, mask)  # (N,), (N,)
    values = _LOSSES[config.loss.name](run, batch, rewards, ref_tokens, mask, config)
    optimise(run, values.pop("loss_tensor"), config.optim.max_grad_norm)
    trained = time.monotonic()
    sync_s = push_weights(run, step) if step % online.sync_every == 0 else 0.0
    return {**values, "reward_mean": float(raw_rewards.mean()), "reward_std": float(raw_rewards.std()),
            "reward_best": float(raw_rewards.max(axis=1).mean()), "shaped_reward_mean": float(rewards.mean()),
            "response_tokens": float(batch.lengths.float().mean()),
            "finished": float(np.mean([f for row in samples.finished for f in row])),
            "kl_to_reference": float(kl.mean()), "kl_log_ratio": float(log_ratio.mean()), "policy_version": float(samples.version),
            "policy_lag": float(step - 1 - samples.version), "generate_s": generated - started,
            "score_s": scored - generated, "train_s": trained - scored, "sync_s": sync_s}


def _grpo_values(run: OnlineRun, batch: SampleBatch, rewards: np.ndarray, ref_tokens: torch.Tensor,
                 mask: torch.Tensor, config: PreferenceJobConfig) -> dict[str, Any]:
    from whetstone.losses.grpo import group_advantages

    online = config.online
    advantages = group_advantages(torch.as_tensor(rewards), scale=online.grpo_scale_rewards).reshape(-1)  # (N,)
    logps, _ = token_logps(run.model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                           config.policy.chunk_size, online.temperature)  # (N, L-1) with grad
    out = run.loss_fn(logps, batch.sample_logps, ref_tokens, advantages.to(logps.device), mask)
    return {"loss_tensor": out.loss, "loss": float(out.loss.detach()), "clip_ratio": float(out.clip_ratio),
            "kl_per_token": float(out.kl), "ratio_mean": float(out.ratio_mean)}


def _policy_and_reference_sums(run: OnlineRun, batch: SampleBatch, rows: torch.Tensor, ref_tokens: torch.Tensor,
                               config: PreferenceJobConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (temperature 1: the losses' implicit rewards) of ``rows``:
    the policy's with gradient, the reference's, and the token counts."""
    sub = batch.rows(rows)
    policy, counts = sequence_logps(run.model, sub.input_ids, sub.attention_mask, sub.loss_mask,
                                    config.policy.chunk_size)
    if config.online.temperature == 1.0:
        reference = ref_tokens[rows].sum(-1)
    else:
        with torch.no_grad():
            reference, _ = sequence_logps(run.reference_model, sub.input_ids, sub.attention_mask, sub.loss_mask,
                                          config.policy.chunk_size)
    return policy, reference, counts


def kept_mean(losses: torch.Tensor, keep: torch.Tensor, world: int) -> torch.Tensor:
    """The mean loss over the rows kept on EVERY worker (their count all-reduced), scaled by the
    world size because DDP averages the workers' gradients: a worker whose prompts were mostly
    ties then weighs what its kept rows weigh, no more. Averaged over the workers (as the step log
    does) the returned values give that global mean."""
    from whetstone.train.preference import all_reduce_sum

    weights = keep.to(losses.device, losses.dtype)  # (B,)
    kept = all_reduce_sum(weights.sum().detach().reshape(1)).squeeze(0)  # rows kept on all workers
    return (losses * weights).sum() * world / kept.clamp(min=1.0)


def _pair_values(run: OnlineRun, batch: SampleBatch, rewards: np.ndarray, ref_tokens: torch.Tensor,
                 mask: torch.Tensor, config: PreferenceJobConfig) -> dict[str, Any]:
    """Online DPO / IPO: best vs worst sample of each prompt; tied prompts weigh 0."""
    from whetstone.online.rewards import best_vs_worst

    prompts, k = rewards.shape
    chosen, rejected, valid = best_vs_worst(rewards)  # (P,), (P,), (P,) bool
    base = np.arange(prompts) * k
    rows = torch.as_tensor(np.concatenate([base + chosen, base + rejected]), device=batch.input_ids.device)
    policy, reference, counts = _policy_and_reference_sums(run, batch, rows, ref_tokens, config)
    logps = {"chosen_logps": policy[:prompts], "rejected_logps": policy[prompts:],
             "chosen_token_counts": counts[:prompts], "rejected_token_counts": counts[prompts:]}
    out = apply_loss(run.loss_fn, config.loss.name, logps,
                     {"chosen_logps": reference[:prompts], "rejected_logps": reference[prompts:]})
    keep = torch.as_tensor(valid, device=out.losses.device)  # (P,)
    loss = kept_mean(out.losses, keep, run.world)
    return {"loss_tensor": loss, "loss": float(loss.detach()), "tied_share": float((~keep).float().mean()),
            "reward_accuracy": float(out.accuracies[keep].mean()) if keep.any() else 0.0,
            "margin": float(out.margins[keep].mean()) if keep.any() else 0.0}


def _kto_values(run: OnlineRun, batch: SampleBatch, rewards: np.ndarray, ref_tokens: torch.Tensor,
                mask: torch.Tensor, config: PreferenceJobConfig) -> dict[str, Any]:
    """Online KTO: above the prompt's mean reward desirable, below it undesirable, equal left out."""
    from whetstone.losses.kto import kto_reference_point
    from whetstone.online.rewards import above_or_below_mean

    desirable_np, labelled_np = above_or_below_mean(rewards)  # (P, k) bool each
    labelled = torch.as_tensor(labelled_np.reshape(-1))  # (N,)
    rows = torch.arange(labelled.numel(), device=batch.input_ids.device)
    policy, reference, _ = _policy_and_reference_sums(run, batch, rows, ref_tokens, config)
    z0 = kto_reference_point(policy.detach(), reference)  # on-policy KL estimate, over every worker
    desirable = torch.as_tensor(desirable_np.reshape(-1), device=policy.device)
    out = run.loss_fn(policy, reference, desirable, z0)
    loss = kept_mean(out.losses, labelled, run.world)
    return {"loss_tensor": loss, "loss": float(loss.detach()), "kto_reference_point": float(z0),
            "desirable_share": float(desirable[labelled.to(desirable.device)].float().mean())
            if labelled.any() else 0.0}


_LOSSES = {"grpo": _grpo_values, "dpo": _pair_values, "ipo": _pair_values, "kto": _kto_values}

