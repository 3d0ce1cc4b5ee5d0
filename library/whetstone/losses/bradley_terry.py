"""Bradley–Terry pairwise loss for training scalar reward models, with optional NS-DPO time discount."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from whetstone.losses.preference_base import (
    PreferenceLossOutput,
    check_batch,
    check_gamma,
    normalise_weights,
    time_discount_weights,
)


class BradleyTerryLoss(nn.Module):
    """Bradley–Terry reward-model loss (Bradley & Terry 1952; as used by Ouyang et al. 2022, arXiv 2203.02155).

    A reward model maps (prompt, response) to a scalar r; the probability that the chosen
    response beats the rejected one is ``sigma(r_w - r_l)``, and the loss is its negative log,
    ``-log sigma(r_w - r_l - m)`` with an optional per-pair margin m (Llama 2's graded margin;
    TRL's ``margin`` column). DPO is this loss with r replaced by the policy's implicit reward.

    With ``gamma`` set, pairs are time-discounted exactly as in NS-DPO (``ns_dpo.py``):
    ``w_i = gamma^(T - t_i - 1)``, normalised by the weight sum over the global batch (all-reduced
    when torch.distributed is initialised), and the loop SUMS the returned losses. Without
    ``gamma`` the losses are unweighted and the loop averages them;
    ``PreferenceLossOutput.reduce`` does the right one either way.

    Typical ranges: margin 0 to a few reward units; gamma 0.85 to 0.95 when used.

    Inputs: reward-model scores of the chosen and rejected responses (B,).
    Outputs: per-example losses (B,); the scores themselves as chosen/rejected rewards (B,),
    detached; normalised weights (B,) when discounting.
    """

    def __init__(self, gamma: float | None = None, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.gamma = None if gamma is None else check_gamma(gamma)
        self.process_group = process_group

    def forward(
        self,
        chosen_scores: torch.Tensor,
        rejected_scores: torch.Tensor,
        margin: torch.Tensor | None = None,
        time_steps: torch.Tensor | None = None,
        current_step: int | float | torch.Tensor | None = None,
        weight_sum: float | torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Compute per-example losses.

        Args:
            chosen_scores: r(x, y_w), shape (B,).
            rejected_scores: r(x, y_l), shape (B,).
            margin: required reward gap per pair, shape (B,), optional.
            time_steps: t_i per pair, shape (B,); only with ``gamma``.
            current_step: T; required with ``time_steps``.
            weight_sum: global sum of the unnormalised weights, if known.

        Returns:
            PreferenceLossOutput; weighted (sum it) when ``gamma`` is set, else unweighted (mean).
        """
        size = check_batch(
            chosen_scores=chosen_scores, rejected_scores=rejected_scores, margin=margin, time_steps=time_steps
        )
        if self.gamma is None and time_steps is not None:
            raise ValueError("time_steps were given but the loss has no gamma; set gamma to discount by time")
        logits = chosen_scores - rejected_scores  # (B,)
        if margin is not None:
            logits = logits - margin.to(logits.dtype)
        losses = -F.logsigmoid(logits)  # (B,)
        weights = None
        if self.gamma is not None:
            if time_steps is None:
                weights = torch.ones(size, dtype=torch.float32, device=chosen_scores.device)  # (B,)
            else:
                if current_step is None:
                    raise ValueError("current_step is required when time_steps are given")
                weights = time_discount_weights(time_steps, current_step, self.gamma)  # (B,)
            weights = normalise_weights(weights, weight_sum, self.process_group).to(losses.dtype).detach()
            losses = weights * losses
        return PreferenceLossOutput(
            losses=losses,
            chosen_rewards=chosen_scores.detach(),
            rejected_rewards=rejected_scores.detach(),
            weights=weights,
        )
