"""ORPO: supervised NLL on the chosen response plus an odds-ratio preference term, no reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.preference_base import PreferenceLossOutput, check_batch

_MINUS_LN2 = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012: branch at -ln 2).

    Args:
        x: values < 0, any shape.

    Returns:
        Same shape; -inf where x == 0.
    """
    # Near 0, 1 - exp(x) cancels, so use expm1; far from 0, exp(x) is tiny, so use log1p.
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLoss(nn.Module):
    """ORPO (Hong et al. 2024, arXiv 2403.07691): monolithic preference optimisation.

    ORPO folds alignment into supervised fine-tuning: the loss is the NLL of the chosen response
    plus ``-lambda * log sigma(log odds(y_w) - log odds(y_l))``, where
    ``odds(y) = P(y|x) / (1 - P(y|x))`` and ``P`` is the length-normalised likelihood
    ``exp(mean token log-prob)``. The odds ratio penalises the rejected style mildly instead of
    pushing its likelihood to zero, and no reference model is needed.

    ``chosen_nll`` defaults to the mean NLL over the chosen completion's tokens,
    ``-chosen_logps / chosen_token_counts``. TRL instead averages cross-entropy over all prompt
    and completion tokens of the batch; pass your own ``chosen_nll`` (B,) to change it.

    Typical ranges: lambda (``beta`` here, as in TRL) 0.05 to 0.5; the paper uses 0.1 to 0.25.
    Compared with SimPO: both are reference-free and length-normalised; ORPO adds SFT on y_w.

    Inputs: summed completion log-probs (B,), completion token counts (B,), optional NLL (B,).
    Outputs: per-example losses (B,) to be averaged; rewards ``beta * mean token log-prob`` (B,),
    detached (TRL's convention).
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_token_counts: torch.Tensor,
        rejected_token_counts: torch.Tensor,
        chosen_nll: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Compute per-example losses.

        Args:
            policy_chosen_logps: summed log pi(y_w|x), shape (B,).
            policy_rejected_logps: summed log pi(y_l|x), shape (B,).
            chosen_token_counts: |y_w| in tokens, shape (B,); must be >= 1.
            rejected_token_counts: |y_l| in tokens, shape (B,); must be >= 1.
            chosen_nll: the supervised term per example, shape (B,); defaults to the mean token
                NLL of y_w.

        Returns:
            PreferenceLossOutput with losses (B,) to be averaged.
        """
        check_batch(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            chosen_token_counts=chosen_token_counts,
            rejected_token_counts=rejected_token_counts,
            chosen_nll=chosen_nll,
        )
        for name, counts in (("chosen_token_counts", chosen_token_counts), ("rejected_token_counts", rejected_token_counts)):
            if bool((counts < 1).any()):
                raise ValueError(f"{name} must be >= 1 (row {int(torch.nonzero(counts < 1)[0, 0])} is not)")
        # Odds need probabilities < 1; float32 keeps log1mexp accurate for bf16 inputs.
        chosen_mean = policy_chosen_logps.float() / chosen_token_counts.float()  # (B,)
        rejected_mean = policy_rejected_logps.float() / rejected_token_counts.float()  # (B,)
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))  # (B,)
        if chosen_nll is None:
            chosen_nll = -chosen_mean  # (B,)
        losses = chosen_nll.float() - self.beta * F.logsigmoid(log_odds)  # (B,)
        return PreferenceLossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_mean.detach(),
            rejected_rewards=self.beta * rejected_mean.detach(),
        )
