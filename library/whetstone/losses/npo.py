"""NPO: Negative Preference Optimization, a bounded loss that lowers the likelihood of rejected responses only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.preference_base import PreferenceLossOutput, check_batch


class NPOLoss(nn.Module):
    """NPO (Zhang et al. 2024, arXiv 2404.05868).

    NPO is DPO with the chosen response removed: only the rejected (to-be-forgotten) response
    y_l is used, and ``L = (2/beta) * log(1 + (pi(y_l|x) / pi_ref(y_l|x))^beta)``, computed as
    ``(2/beta) * softplus(beta * (log pi - log pi_ref))``. Unlike gradient ascent on the NLL, the
    loss is bounded below by 0 and its gradient vanishes as pi(y_l|x) falls, so training does not
    collapse; as beta -> 0 it recovers gradient ascent. Use it for unlearning or when only negative
    examples exist.

    Typical ranges: beta 0.05 to 0.5 (the paper uses 0.1).

    Inputs: summed log-probs of the rejected responses under the policy and the reference (B,);
    optionally the chosen ones, used only for logging rewards.
    Outputs: per-example losses (B,) to be averaged; rejected rewards ``beta * log-ratio`` (B,);
    chosen rewards likewise when the chosen log-probs are given, else NaN (B,) so nobody takes
    them for measurements. All rewards are detached.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(
        self,
        policy_rejected_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        policy_chosen_logps: torch.Tensor | None = None,
        reference_chosen_logps: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Compute per-example losses.

        Args:
            policy_rejected_logps: summed log pi(y_l|x), shape (B,).
            reference_rejected_logps: summed log pi_ref(y_l|x), shape (B,).
            policy_chosen_logps: summed log pi(y_w|x), shape (B,), logging only.
            reference_chosen_logps: summed log pi_ref(y_w|x), shape (B,), logging only.

        Returns:
            PreferenceLossOutput with losses (B,) to be averaged.
        """
        check_batch(
            policy_rejected_logps=policy_rejected_logps,
            reference_rejected_logps=reference_rejected_logps,
            policy_chosen_logps=policy_chosen_logps,
            reference_chosen_logps=reference_chosen_logps,
        )
        if (policy_chosen_logps is None) != (reference_chosen_logps is None):
            raise ValueError("pass both policy_chosen_logps and reference_chosen_logps, or neither")
        rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
        losses = (2.0 / self.beta) * F.softplus(self.beta * rejected_logratios)  # (B,)
        if policy_chosen_logps is not None:
            chosen_rewards = self.beta * (policy_chosen_logps - reference_chosen_logps).detach()  # (B,)
        else:
            chosen_rewards = torch.full_like(rejected_logratios, float("nan")).detach()  # (B,)
        return PreferenceLossOutput(
            losses=losses,
            chosen_rewards=chosen_rewards,
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
