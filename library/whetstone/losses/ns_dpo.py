"""Non-Stationary DPO: DPO with exponentially time-discounted, globally normalised pair weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from whetstone.losses.dpo import dpo_pair_losses
from whetstone.losses.preference_base import (
    PreferenceLossOutput,
    check_batch,
    check_gamma,
    normalise_weights,
    time_discount_weights,
)


class NSDPOLoss(nn.Module):
    """NS-DPO (Son et al. 2024, arXiv 2407.18676): DPO whose pairs are weighted by recency.

    Preferences drift; NS-DPO models the drift by weighting each pair's DPO loss by
    ``w_i = gamma^(T - t_i - 1)``, where t_i is the time step the pair was collected at and T the
    current one (so the newest pairs, t_i = T - 1, weigh 1). With the paper's default
    normalisation the weighted loss is divided by the sum of the weights, here over the GLOBAL
    batch: when torch.distributed is initialised the weight sum is all-reduced, so every worker
    divides by the same number and the per-example losses on all workers sum to the loss of the
    concatenated batch. The loop therefore SUMS ``losses`` (``PreferenceLossOutput.reduce`` does).
    Under DDP, which averages gradients over workers, multiply the local sum by the world size if
    you want the exact global-batch gradient scale (a constant factor, the same at every step).

    gamma = 1 gives every pair weight 1, and then ``losses.sum()`` equals plain DPO's
    ``losses.mean()`` on the same batch (exactly, up to float rounding). The paper's experiments
    use gamma around 0.85 to 0.95; beta as in DPO (about 0.1). For dropping pairs whose weight is
    negligible before they are even tokenised, see
    :func:`whetstone.losses.preference_base.time_weight_keep_mask`.

    Inputs: per-example summed log-probs (B,), time steps (B,), the current step (scalar).
    Outputs: weighted, normalised per-example losses (B,), DPO rewards (B,) and the normalised
    weights (B,), all but the losses detached.
    """

    def __init__(
        self,
        beta: float = 0.1,
        gamma: float = 0.9,
        label_smoothing: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.beta = float(beta)
        self.gamma = check_gamma(gamma)
        self.label_smoothing = float(label_smoothing)
        self.process_group = process_group

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        time_steps: torch.Tensor | None = None,
        current_step: int | float | torch.Tensor | None = None,
        weight_sum: float | torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Compute weighted per-example losses.

        Args:
            policy_chosen_logps: summed log pi(y_w|x), shape (B,).
            policy_rejected_logps: summed log pi(y_l|x), shape (B,).
            reference_chosen_logps: summed log pi_ref(y_w|x), shape (B,).
            reference_rejected_logps: summed log pi_ref(y_l|x), shape (B,).
            time_steps: t_i per pair, shape (B,); None means all pairs are current (weight 1).
            current_step: T; required with ``time_steps``; every t_i must be <= T - 1.
            weight_sum: the global sum of the unnormalised weights, when the caller knows it;
                otherwise it is all-reduced (distributed) or taken locally.

        Returns:
            PreferenceLossOutput whose losses (B,) are to be summed; ``weights`` holds the
            normalised weights (B,).
        """
        size = check_batch(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
            time_steps=time_steps,
        )
        if time_steps is None:
            weights = torch.ones(size, dtype=torch.float32, device=policy_chosen_logps.device)  # (B,)
        else:
            if current_step is None:
                raise ValueError("current_step is required when time_steps are given")
            weights = time_discount_weights(time_steps, current_step, self.gamma)  # (B,)
        weights = normalise_weights(weights, weight_sum, self.process_group).to(policy_chosen_logps.dtype)
        chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
        rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
        pair_losses = dpo_pair_losses(
            chosen_logratios, rejected_logratios, self.beta, "sigmoid", self.label_smoothing
        )  # (B,)
        return PreferenceLossOutput(
            losses=weights * pair_losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
            weights=weights.detach(),
        )
