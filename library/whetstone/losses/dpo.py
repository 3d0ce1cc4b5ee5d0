"""Direct Preference Optimization and its pairwise variants: sigmoid (DPO), conservative DPO, IPO, hinge."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.preference_base import PreferenceLossOutput, check_batch

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


def dpo_pair_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO-family losses from policy/reference log-ratios (the math, no model calls).

    Args:
        chosen_logratios: log pi(y_w|x) - log pi_ref(y_w|x), shape (B,).
        rejected_logratios: log pi(y_l|x) - log pi_ref(y_l|x), shape (B,).
        beta: inverse temperature (sigmoid, hinge) or IPO's regulariser tau.
        loss_type: "sigmoid", "ipo" or "hinge".
        label_smoothing: conservative-DPO flip probability epsilon (sigmoid only).
        chosen_token_counts: completion lengths, shape (B,); when given with IPO the
            log-ratios are averaged per token (TRL's convention, confirmed by the IPO authors).
        rejected_token_counts: same for the rejected completions.

    Returns:
        Per-pair losses, shape (B,).
    """
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
        # cDPO: with probability epsilon the label is flipped, so mix the two directions.
        return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))  # (B,)
    if loss_type == "ipo":
        if chosen_token_counts is not None and rejected_token_counts is not None:
            chosen_logratios = chosen_logratios / chosen_token_counts.clamp(min=1).to(chosen_logratios.dtype)
            rejected_logratios = rejected_logratios / rejected_token_counts.clamp(min=1).to(
                rejected_logratios.dtype
            )
        # Eq. 17 of Azar et al.: regress the log-ratio gap onto 1 / (2 tau).
        return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2  # (B,)
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


class DPOLoss(nn.Module):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290) and its pairwise relatives, chosen by ``loss_type``.

    DPO fits a policy to pairwise preferences without a reward model: the implicit reward of a
    response is ``beta * (log pi(y|x) - log pi_ref(y|x))`` and the Bradley–Terry likelihood of the
    chosen response beating the rejected one is maximised. Variants on the same log-ratios:

    * ``"sigmoid"``: ``-log sigma(beta * (r_w - r_l))``, the DPO loss. With ``label_smoothing``
      epsilon > 0 it is conservative DPO (cDPO, Mitchell 2023): each label is assumed flipped with
      probability epsilon, so the loss is ``-(1-eps) log sigma(z) - eps log sigma(-z)``.
    * ``"ipo"``: IPO (Azar et al. 2023, arXiv 2310.12036), ``(h - 1/(2 beta))^2`` with h the
      log-ratio gap; bounded, so it does not push the gap to infinity on deterministic
      preferences. With ``ipo_length_normalize`` (default) the log-ratios are averaged per
      completion token, which is what TRL does and what the IPO authors reported.
    * ``"hinge"``: SLiC-style ``max(0, 1 - beta * gap)``.

    NS-DPO (``ns_dpo.py``) reuses this math with per-pair time weights; SimPO and ORPO drop the
    reference model; NPO keeps only the rejected term.

    Typical ranges: beta 0.01 to 0.5 for sigmoid/hinge (0.1 is the common default); for IPO beta is
    tau, about 0.01 to 1. label_smoothing 0 to 0.3 (must be < 0.5).

    Inputs are per-example summed completion log-probs, shape (B,). Outputs: per-example losses
    (B,), chosen/rejected rewards ``beta * log-ratio`` (B,), detached; the loop takes the mean.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        ipo_length_normalize: bool = True,
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        if label_smoothing > 0 and loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.ipo_length_normalize = ipo_length_normalize

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        chosen_token_counts: torch.Tensor | None = None,
        rejected_token_counts: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Compute per-example losses.

        Args:
            policy_chosen_logps: summed log pi(y_w|x), shape (B,).
            policy_rejected_logps: summed log pi(y_l|x), shape (B,).
            reference_chosen_logps: summed log pi_ref(y_w|x), shape (B,).
            reference_rejected_logps: summed log pi_ref(y_l|x), shape (B,).
            chosen_token_counts: completion token counts, shape (B,); required for IPO with
                length normalisation, ignored otherwise.
            rejected_token_counts: same for the rejected completions.

        Returns:
            PreferenceLossOutput with losses (B,) to be averaged.
        """
        check_batch(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
            chosen_token_counts=chosen_token_counts,
            rejected_token_counts=rejected_token_counts,
        )
        normalise = self.loss_type == "ipo" and self.ipo_length_normalize
        if normalise and (chosen_token_counts is None or rejected_token_counts is None):
            raise ValueError(
                "IPO with ipo_length_normalize=True needs chosen_token_counts and rejected_token_counts"
            )
        chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
        rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
        losses = dpo_pair_losses(
            chosen_logratios,
            rejected_logratios,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            chosen_token_counts if normalise else None,
            rejected_token_counts if normalise else None,
        )  # (B,)
        return PreferenceLossOutput(
            losses=losses,
            chosen_rewards=self.beta * chosen_logratios.detach(),
            rejected_rewards=self.beta * rejected_logratios.detach(),
        )
