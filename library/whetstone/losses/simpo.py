"""SimPO: reference-free, length-normalised preference optimisation with a target reward margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.preference_base import PreferenceLossOutput, check_batch


class SimPOLoss(nn.Module):
    """SimPO (Meng et al. 2024, arXiv 2405.14734).

    SimPO replaces DPO's implicit reward (a log-ratio against a reference model) with the policy's
    own average per-token log-probability, ``r(y) = beta / |y| * log pi(y|x)``, which matches how
    generation ranks sequences and needs no reference model in memory or in the data. A target
    margin gamma asks the chosen reward to exceed the rejected one by at least gamma:
    ``L = -log sigma(r(y_w) - r(y_l) - gamma)``. ``label_smoothing`` epsilon mixes in the flipped
    direction as in conservative DPO (TRL's CPO trainer does the same).

    Typical ranges (paper): beta 2.0 to 2.5 (up to 10 for some models), target_margin 0.3 to 1.6,
    with gamma / beta around 0.5. Compared with DPO: no reference log-probs; with ORPO: also
    reference-free, but ORPO adds an NLL term and uses odds, not log-probs.

    Inputs: summed completion log-probs (B,) and completion token counts (B,).
    Outputs: per-example losses (B,) to be averaged; rewards ``beta * mean token log-prob`` (B,),
    detached.
    """

    def __init__(self, beta: float = 2.0, target_margin: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if target_margin < 0:
            raise ValueError(f"target_margin must be >= 0, got {target_margin}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.beta = float(beta)
        self.target_margin = float(target_margin)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_token_counts: torch.Tensor,
        rejected_token_counts: torch.Tensor,
    ) -> PreferenceLossOutput:
        """Compute per-example losses.

        Args:
            policy_chosen_logps: summed log pi(y_w|x), shape (B,).
            policy_rejected_logps: summed log pi(y_l|x), shape (B,).
            chosen_token_counts: |y_w| in tokens, shape (B,); must be >= 1.
            rejected_token_counts: |y_l| in tokens, shape (B,); must be >= 1.

        Returns:
            PreferenceLossOutput with losses (B,) to be averaged.
        """
        check_batch(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            chosen_token_counts=chosen_token_counts,
            rejected_token_counts=rejected_token_counts,
        )
        for name, counts in (("chosen_token_counts", chosen_token_counts), ("rejected_token_counts", rejected_token_counts)):
            if bool((counts < 1).any()):
                raise ValueError(f"{name} must be >= 1 (row {int(torch.nonzero(counts < 1)[0, 0])} is not)")
        chosen_rewards = self.beta * policy_chosen_logps / chosen_token_counts.to(policy_chosen_logps.dtype)  # (B,)
        rejected_rewards = self.beta * policy_rejected_logps / rejected_token_counts.to(
            policy_rejected_logps.dtype
        )  # (B,)
        logits = chosen_rewards - rejected_rewards - self.target_margin  # (B,)
        losses = -(1.0 - self.label_smoothing) * F.logsigmoid(logits) - self.label_smoothing * F.logsigmoid(-logits)
        return PreferenceLossOutput(
            losses=losses, chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach()
        )
