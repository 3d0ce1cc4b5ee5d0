"""Shared pieces of the preference losses: the result type, input checks and the time discount.

Every preference loss in this package (``dpo``, ``ns_dpo``, ``simpo``, ``orpo``, ``npo``,
``bradley_terry``) returns a :class:`PreferenceLossOutput`. The time discount of NS-DPO
(Son et al. 2024, arXiv 2407.18676) lives here because the Bradley–Terry reward loss reuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PreferenceLossOutput:
    """What a preference loss returns; the training loop reduces.

    Attributes:
        losses: Per-example losses, shape (B,). Unweighted losses are meant to be averaged;
            when ``weights`` is set they are already multiplied by the normalised weights and are
            meant to be summed (see :meth:`reduce`).
        chosen_rewards: Implicit (or explicit, for reward models) rewards of the chosen responses,
            detached, shape (B,).
        rejected_rewards: Same for the rejected responses, detached, shape (B,).
        weights: Normalised per-example weights, detached, shape (B,), or None when the loss is
            unweighted. Summed over the global batch (all workers) they give 1.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    weights: torch.Tensor | None = None

    def reduce(self) -> torch.Tensor:
        """The scalar to back-propagate on this worker: mean of unweighted losses, sum of weighted ones.

        Returns:
            A 0-d tensor.
        """
        return self.losses.sum() if self.weights is not None else self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        """chosen_rewards - rejected_rewards, shape (B,)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        """1.0 where the chosen reward beats the rejected one, else 0.0, shape (B,)."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def check_batch(**tensors: torch.Tensor | None) -> int:
    """Check that every given tensor is 1-D with the same length; return that length.

    Raises:
        ValueError: naming the argument whose shape is wrong.
    """
    size: int | None = None
    first = ""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(tensor.shape)}")
        if size is None:
            size, first = tensor.shape[0], name
        elif tensor.shape[0] != size:
            raise ValueError(f"{name} has {tensor.shape[0]} rows but {first} has {size}")
    if size is None:
        raise ValueError("no tensors given")
    return size


def check_gamma(gamma: float) -> float:
    """Validate a time-discount factor: 0 < gamma <= 1 (1 means no discount)."""
    if not (0.0 < gamma <= 1.0) or math.isnan(gamma):
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    return float(gamma)


def time_discount_weights(
    time_steps: torch.Tensor, current_step: int | float | torch.Tensor, gamma: float
) -> torch.Tensor:
    """NS-DPO weights w_i = gamma^(T - t_i - 1), unnormalised.

    The most recent pairs (t_i = T - 1) get weight 1; each step older multiplies by gamma.

    Args:
        time_steps: t_i, the time step each pair was collected at, shape (B,), int or float.
        current_step: T, the current step; every t_i must be at most T - 1.
        gamma: discount in (0, 1]; 1 gives every pair weight 1.

    Returns:
        Float32 weights on the device of ``time_steps``, shape (B,), in (0, 1].

    Raises:
        ValueError: when a pair's time step is not before ``current_step``.
    """
    gamma = check_gamma(gamma)
    steps = time_steps.to(torch.float64)  # (B,) float64 so large ages do not lose integer precision
    current = torch.as_tensor(current_step, dtype=torch.float64, device=steps.device)
    age = current - steps - 1.0  # (B,)
    if bool((age < 0).any()):
        bad = int(torch.nonzero(age < 0)[0, 0])
        raise ValueError(
            f"time_steps[{bad}]={steps[bad].item():g} is not before current_step={current.item():g}; "
            "NS-DPO needs t_i <= T - 1"
        )
    return torch.pow(torch.tensor(gamma, dtype=torch.float64, device=steps.device), age).to(torch.float32)


def time_weight_keep_mask(
    time_steps: np.ndarray | list, current_step: float, gamma: float, min_weight: float
) -> np.ndarray:
    """Sampling filter: which pairs are recent enough that gamma^(T - t - 1) >= min_weight.

    Pure numpy, so it runs inside a Ray Data ``map_batches``/``filter`` before tokenisation;
    dropping pairs whose weight would be negligible saves their forward passes entirely.

    Args:
        time_steps: t_i per pair, shape (N,).
        current_step: T.
        gamma: discount in (0, 1].
        min_weight: threshold in [0, 1]; 0 keeps everything.

    Returns:
        Boolean mask, shape (N,), True for pairs to keep.
    """
    gamma = check_gamma(gamma)
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"min_weight must lie in [0, 1], got {min_weight}")
    steps = np.asarray(time_steps, dtype=np.float64)  # (N,)
    age = float(current_step) - steps - 1.0  # (N,)
    if (age < 0).any():
        bad = int(np.flatnonzero(age < 0)[0])
        raise ValueError(f"time_steps[{bad}]={steps[bad]:g} is not before current_step={current_step:g}")
    return np.power(gamma, age) >= min_weight


def normalise_weights(
    weights: torch.Tensor,
    weight_sum: float | torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Divide weights by their sum over the GLOBAL batch.

    The sum is, in order of precedence: ``weight_sum`` when given (for example a cached or
    precomputed sum); the all-reduced sum over ``process_group`` when torch.distributed is
    initialised, so every worker divides by the same number; else the local sum. Summing the
    returned weights over all workers gives 1.

    Args:
        weights: unnormalised, detached weights, shape (B,).
        weight_sum: optional explicit global sum.
        process_group: group to all-reduce over (default: the world).

    Returns:
        Normalised weights, shape (B,).
    """
    if weight_sum is not None:
        total = torch.as_tensor(weight_sum, dtype=weights.dtype, device=weights.device)
    else:
        total = weights.sum()  # () local sum
        if dist.is_available() and dist.is_initialized():
            # Each worker only sees its shard; without the all-reduce the per-worker normalisation
            # would over-weight workers whose pairs happen to be old.
            total = total.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    if bool(total <= 0):
        raise ValueError(f"the sum of the weights must be positive, got {float(total)}")
    return weights / total
