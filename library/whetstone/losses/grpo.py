"""GRPO: group-relative advantages and the clipped policy-gradient loss of online preference training.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) samples k completions per prompt, scores
them with a reward model and uses each completion's reward relative to its group as the advantage,
so no value network is needed. The policy step is PPO's clipped surrogate on per-token importance
ratios plus a per-token KL penalty towards a frozen reference. The formulas follow TRL 1.16
(``GRPOTrainer._generate_and_score_completions`` for the advantages, ``GRPOTrainer._compute_loss``
for the loss); tests/unit/test_online_losses.py calls TRL's own loss code on the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo"]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages: each reward minus its prompt's mean, over its prompt's std.

    ``A = (r - mean_group(r)) / (std_group(r) + eps)``, as TRL 1.16 computes it with
    ``scale_rewards="group"`` (the paper fixes neither the std estimator nor an eps): the std
    carries Bessel's correction (divides by k - 1; TRL's ``nanstd``), the eps of 1e-4 is added to
    the std (not under the square root), and a group of one (k = 1) has std 0, so its advantage
    is 0. NaN rewards (a completion the reward model could
    not score) are left out of their group's mean and std and get advantage 0, as in TRL, so they
    neither bias the baseline nor move the policy. A group whose rewards are all equal gets
    advantages 0: it carries no learning signal.

    ``scale=False`` gives ``r - mean`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783; TRL's
    ``scale_rewards="none"``): dividing by the std over-weights prompts that are nearly always
    solved or always failed, a difficulty bias.

    Args:
        rewards: shape (P, k), one row per prompt, its k samples' rewards.
        scale: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std so that near-constant groups do not explode.

    Returns:
        Advantages, shape (P, k), float (the rewards' dtype, float32 for integer rewards), no grad.
    """
    rewards = torch.as_tensor(rewards).detach()
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, k), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mean = torch.nanmean(rewards, dim=1, keepdim=True)  # (P, 1)
    advantages = rewards - mean  # (P, k)
    if scale:
        std = _nanstd_rows(rewards, mean)  # (P, 1)
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def _nanstd_rows(rewards: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-row std with Bessel's correction, NaNs ignored; TRL's ``nanstd`` except that k = 1 gives 0.

    TRL sets the std of a one-sample group to 0 explicitly (``num_generations == 1``); a row with
    only one non-NaN value still gets NaN here, as in TRL, and its advantage becomes 0 downstream.
    """
    if rewards.shape[1] == 1:
        return torch.zeros_like(mean)
    counts = (~torch.isnan(rewards)).sum(dim=1, keepdim=True).to(rewards.dtype)  # (P, 1)
    variance = torch.nanmean((rewards - mean) ** 2, dim=1, keepdim=True)  # (P, 1), biased
    correction = torch.where(counts > 1, counts / (counts - 1), torch.full_like(counts, float("nan")))
    return torch.sqrt(variance * correction)


@dataclass(frozen=True)
class GRPOLossOutput:
    """What :class:`GRPOLoss` returns.

    Attributes:
        loss: The scalar to back-propagate (0-d, with grad), already reduced over the batch.
        kl: Mean per-token k3 KL estimate to the reference over the masked tokens (0-d, detached);
            0 when no reference log-probs were given.
        clip_ratio: Share of masked tokens where the clip was active, i.e. the ratio left
            [1 - eps_low, 1 + eps_high] on the side where the advantage pushes it further, so the
            token gave no policy gradient (TRL's ``clip_ratio/region_mean``), 0-d, detached.
        ratio_mean: Mean importance ratio pi / pi_old over the masked tokens (0-d, detached); 1 on
            the first step after sampling, drifting as the same samples are reused.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    clip_ratio: torch.Tensor
    ratio_mean: torch.Tensor


class GRPOLoss(nn.Module):
    """GRPO's clipped surrogate with a k3 KL penalty, reduced as TRL 1.16 reduces ``loss_type``.

    Per completion token t of sample i, with ratio ``rho = exp(logp - old_logp)`` and the
    sample's advantage ``A_i``::

        l_it = -min(rho * A_i, clamp(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_it
        kl_it = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3, unbiased, >= 0)

    The token losses are reduced over the mask by ``loss_type``:

    * ``"grpo"``: each sequence's mean over its tokens, then the mean over sequences
      (the paper's ``1/G sum_i 1/|o_i| sum_t``; biased towards short answers for positive A).
    * ``"bnpo"``: the sum over all masked tokens over their number (token-level mean over the
      local batch).
    * ``"dr_grpo"``: the sum over all masked tokens over ``N * max_completion_length``, a
      constant, removing the length bias (Dr. GRPO, arXiv 2503.20783). Without
      ``max_completion_length`` the padded width T of the batch is used, which is only a
      constant when every batch is padded to the same width.

    Paper and TRL agree that beta multiplies the per-token KL inside the sum, before the
    reduction (the paper's Eq. 3), and on the k3 estimator. Where this follows TRL rather than
    the paper: the clip range may be asymmetric (``epsilon_high``, DAPO's clip-higher; the paper
    has one eps); "bnpo" and "dr_grpo" are TRL's reductions (the paper has only "grpo"); the KL
    is not weighted by the importance ratio when samples are reused (TRL's default
    ``use_bias_correction_kl=False``; the paper does not say); ``kl`` and ``clip_ratio`` are
    TRL's metrics. The default beta is the paper's 0.04 (TRL's default is 0.0). TRL divides the
    loss by the gradient-accumulation steps; here the caller does that.

    When ``old_logps`` is None the samples are assumed fresh (one policy step per generation
    batch): the ratio is ``exp(logp - logp.detach())`` = 1 with gradient ``grad logp``, exactly
    TRL's shortcut. Then, for "grpo" with beta 0, the gradient on token t of sample i is
    ``-A_i / (|o_i| N)``.

    Typical ranges: epsilon_low 0.1 to 0.3 (0.2), epsilon_high = epsilon_low or 0.28 (DAPO);
    beta 0 to 0.1.
    """

    def __init__(
        self,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.04,
        loss_type: GRPOLossType = "grpo",
        max_completion_length: int | None = None,
    ) -> None:
        super().__init__()
        epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
        if not 0.0 <= epsilon_low < 1.0:
            raise ValueError(f"epsilon_low must lie in [0, 1), got {epsilon_low}")
        if epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {epsilon_high}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        if max_completion_length is not None and max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length

    def forward(
        self,
        logps: torch.Tensor,
        old_logps: torch.Tensor | None,
        ref_logps: torch.Tensor | None,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> GRPOLossOutput:
        """Compute the reduced loss and its diagnostics.

        Args:
            logps: per-token log pi(o_t | x, o_<t) of the sampled tokens under the policy being
                trained, with grad, shape (N, T).
            old_logps: the same under the policy that generated the samples, shape (N, T), or
                None when that is the current policy (then ``logps.detach()``).
            ref_logps: the same under the frozen reference, shape (N, T), or None (beta must be 0).
            advantages: one per sample, shape (N,), e.g. :func:`group_advantages` flattened.
            mask: 1 on completion tokens, 0 on padding, shape (N, T), float 0/1 or bool. Values at
                masked positions are ignored (they are zeroed before any arithmetic, so padding
                holding -inf or NaN cannot leak into the loss or its gradient).

        Returns:
            GRPOLossOutput with the 0-d loss and detached diagnostics.
        """
        keep = _check_inputs(logps, old_logps, ref_logps, advantages, mask)
        if ref_logps is None and self.beta != 0.0:
            raise ValueError(f"ref_logps is None but beta={self.beta}; pass ref_logps or set beta=0")
        weights = keep.to(torch.float32)  # (N, T)
        logps = logps.float().masked_fill(~keep, 0.0)  # (N, T)
        old = logps.detach() if old_logps is None else old_logps.detach().float().masked_fill(~keep, 0.0)
        adv = advantages.detach().float().unsqueeze(1)  # (N, 1)
        ratio = torch.exp(logps - old)  # (N, T)
        clipped = torch.clamp(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        per_token = -torch.min(ratio * adv, clipped * adv)  # (N, T)
        kl = None
        if ref_logps is not None:
            delta = ref_logps.detach().float().masked_fill(~keep, 0.0) - logps  # (N, T)
            kl = torch.exp(delta) - delta - 1.0  # (N, T), k3 estimator
            if self.beta != 0.0:
                per_token = per_token + self.beta * kl
        loss = self._reduce(per_token, weights)
        tokens = weights.sum().clamp(min=1.0)
        ratio_d = ratio.detach()
        is_clipped = ((ratio_d < 1.0 - self.epsilon_low) & (adv < 0)) | (
            (ratio_d > 1.0 + self.epsilon_high) & (adv > 0)
        )
        return GRPOLossOutput(
            loss=loss,
            kl=(kl.detach() * weights).sum() / tokens if kl is not None else weights.new_zeros(()),
            clip_ratio=(is_clipped.float() * weights).sum() / tokens,
            ratio_mean=(ratio_d * weights).sum() / tokens,
        )

    def _reduce(self, per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reduce (N, T) token losses to a 0-d loss as TRL 1.16 does for ``self.loss_type``."""
        masked = per_token * weights  # (N, T)
        if self.loss_type == "grpo":
            return (masked.sum(-1) / weights.sum(-1).clamp(min=1.0)).mean()
        if self.loss_type == "bnpo":
            return masked.sum() / weights.sum().clamp(min=1.0)
        # Dr. GRPO divides by a constant: rows x the longest completion allowed. The (N, T) grid
        # may be wider than that (rows hold prompt + completion, right-padded): the cap applies to
        # each row's completion tokens.
        width = self.max_completion_length or per_token.shape[1]
        longest = int(weights.sum(-1).max().item()) if weights.numel() else 0
        if longest > width:
            raise ValueError(f"mask: a row has {longest} completion tokens, more than max_completion_length={width}")
        return masked.sum() / (per_token.shape[0] * width)


def _check_inputs(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Check the shapes of GRPOLoss's inputs and that the mask is 0/1; return the mask as bool (N, T).

    Raises:
        ValueError: naming the argument whose shape or values are wrong.
    """
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2:
        raise ValueError(
            f"logps must be a tensor of shape (N, T), got {getattr(logps, 'shape', type(logps))}"
        )
    shape = tuple(logps.shape)
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have the shape of logps {shape}, got {tuple(tensor.shape)}")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages must have shape ({shape[0]},), got {tuple(advantages.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1")
    return mask != 0
