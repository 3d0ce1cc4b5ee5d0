"""Online preference training, held-out evaluation: greedy completions scored by the reward model.

The report's reward gain is measured the same way before and after training: every held-out
prompt (never trained on) gets ONE greedy completion from the generation actors, the reward
model scores it, and the mean is compared. The gain is also given in units of the standard
deviation of the starting policy's rewards on those prompts, so runs with different reward
models compare. After training the workers also estimate the KL to the reference on the same
prompts: one sampled completion per prompt, the per-token k3 estimate summed over its tokens
(:func:`whetstone.online.batch.sequence_kl`), averaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whetstone.data import schemas as S

EVAL_SEED = 20_240_226  # held-out sampling: the same completions for every run of one policy


def greedy_rewards(pool: Any, reward: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One greedy completion per prompt from the pool's current weights, scored:
    ``(rewards (P,), completion tokens (P,), texts)``."""
    samples = pool.generate(prompts, 1, seed=EVAL_SEED, greedy=True)
    texts = [row[0] for row in samples.texts]
    scores, _ = reward.score(prompts, texts)
    tokens = np.array([len(row[0]) for row in samples.completion_ids], dtype=np.int64)
    return np.asarray(scores, dtype=np.float64), tokens, texts


def sampled_kl(pool: Any, prompts: list[str], reference_model: torch.nn.Module, pad_id: int, chunk_size: int,
               temperature: float) -> np.ndarray:
    """Per-prompt KL estimate of the pool's policy to the reference: one sample each, the k3 sum
    (:func:`~whetstone.online.batch.sequence_kl`), (P,)."""
    from whetstone.models.policy import token_logps
    from whetstone.online.batch import sample_batch, sequence_kl

    samples = pool.generate(prompts, 1, seed=EVAL_SEED)
    batch = sample_batch(samples, pad_id).to(next(reference_model.parameters()).device)
    with torch.no_grad():
        reference, mask = token_logps(reference_model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                      chunk_size, temperature)  # (P, L-1)
    k3, _ = sequence_kl(batch.sample_logps, reference, mask)
    return k3.double().cpu().numpy()


def summarise(rewards: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """The figures of one greedy pass (the driver's, before training)."""
    return {"prompts": int(len(rewards)), "reward_mean": float(np.mean(rewards)) if len(rewards) else 0.0,
            "reward_std": float(np.std(rewards)) if len(rewards) else 0.0,
            "response_tokens": float(np.mean(tokens)) if len(tokens) else 0.0}


def evaluate_online_shard(run: Any, batches, config: Any) -> dict[str, float]:
    """This worker's held-out prompts: greedy rewards, their lengths and the sampled KL, summed over
    all workers (every worker calls this once; one all-reduce)."""
    from whetstone.online.batch import pad_token_id
    from whetstone.train.preference import all_reduce_sum

    pad_id = pad_token_id(run.tokenizer)
    totals = torch.zeros(5, dtype=torch.float64)  # prompts, reward sum, reward square sum, tokens, KL sum
    for raw in batches:
        prompts = [str(p) for p in raw[S.PROMPT]]
        if not prompts:
            continue
        rewards, tokens, _ = greedy_rewards(run.pool, run.reward, prompts)
        kl = sampled_kl(run.pool, prompts, run.reference_model, pad_id, config.policy.chunk_size,
                        config.online.temperature)
        totals += torch.tensor([len(prompts), rewards.sum(), (rewards**2).sum(), tokens.sum(), kl.sum()],
                               dtype=torch.float64)
    totals = all_reduce_sum(totals)
    count = max(totals[0].item(), 1.0)
    mean = totals[1].item() / count
    return {"eval_prompts": int(totals[0].item()), "eval_reward_mean": mean,
            "eval_reward_std": float(np.sqrt(max(totals[2].item() / count - mean**2, 0.0))),
            "eval_response_tokens": totals[3].item() / count, "eval_kl_to_reference": totals[4].item() / count}
