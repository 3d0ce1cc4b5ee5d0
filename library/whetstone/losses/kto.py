"""KTO: Kahneman–Tversky Optimization on unpaired desirable / undesirable completions.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) needs only a thumbs-up or thumbs-down per
completion, not a pair, which suits online training where a reward model labels each of the k
samples. The value of a completion is judged against a reference point z0, an estimate of the
KL divergence between the policy and the reference, computed on the batch and not
back-propagated. The formulas follow TRL 1.16's ``KTOTrainer._compute_loss`` for
``loss_type="kto"``; tests/unit/test_online_losses.py runs TRL's code on the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from whetstone.losses.gather import is_distributed
from whetstone.losses.preference_base import check_batch


def kto_reference_point(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, all_reduce: bool = True
) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x') - log pi_ref(y'|x'))), detached.

    The mean log-ratio estimates KL(pi || pi_ref); the paper (Section 4.2) and TRL take it on
    mismatched pairs (each prompt with another example's completion, TRL's ``KL_completion_ids``)
    so that it does not track the very rewards it is compared with. Which completions to pass is
    the caller's choice; this function only averages and clamps.

    With ``all_reduce`` and a torch.distributed / Ray Train process group of more than one worker,
    the sum and count are all-reduced so every worker gets the same z0 (a worker may hold no
    rows). TRL averages each worker's mean (``gather_for_metrics(kl).mean()``); that is the same
    number whenever the workers hold equally many rows, which TRL's fixed per-device batch
    guarantees and which holds here when the shards are equal. As in TRL the clamp comes after the
    cross-worker mean.

    Args:
        policy_logps: summed log-probs of the KL completions under the policy, shape (M,).
        reference_logps: the same under the reference, shape (M,).
        all_reduce: average over every worker when a process group is initialised.

    Returns:
        z0, a 0-d float32 tensor >= 0 on the inputs' device, without grad.

    Raises:
        ValueError: when the shapes differ or no worker holds any row.
    """
    check_batch(policy_logps=policy_logps, reference_logps=reference_logps)
    logratios = (policy_logps.detach() - reference_logps.detach()).to(torch.float64)  # (M,)
    count = torch.tensor(float(logratios.numel()), dtype=torch.float64, device=logratios.device)
    totals = torch.stack([logratios.sum(), count])  # (2,): sum, count
    if all_reduce and is_distributed():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    if float(totals[1]) == 0.0:
        raise ValueError(
            "policy_logps is empty on every worker: the KTO reference point needs at least one row"
        )
    return (totals[0] / totals[1]).clamp(min=0.0).to(torch.float32)


@dataclass(frozen=True)
class KTOLossOutput:
    """What :class:`KTOLoss` returns, rows in the input order.

    Attributes:
        losses: Per-example weighted losses, shape (B,); :meth:`reduce` takes their mean.
        rewards: Implicit rewards ``beta * (log pi - log pi_ref)``, detached, shape (B,).
        desirable: True for desirable (thumbs-up) rows, shape (B,) bool.
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    desirable: torch.Tensor

    def reduce(self) -> torch.Tensor:
        """The mean of the weighted losses over the batch (TRL's ``losses.nanmean()``), 0-d."""
        return self.losses.mean()


class KTOLoss(nn.Module):
    """KTO's loss for ``loss_type="kto"``, term for term as TRL 1.16 computes it.

    With the log-ratio ``h = log pi(y|x) - log pi_ref(y|x)`` and reference point z0::

        desirable:   w_d * (1 - sigmoid(beta * (h - z0)))
        undesirable: w_u * (1 - sigmoid(beta * (z0 - h)))

    so beta multiplies z0 too (the paper's value function ``sigmoid(beta * (r_theta - z0))`` with
    ``r_theta = h``; TRL writes it the same way). The paper's loss is ``lambda_y - v(x, y)``;
    TRL, and this class, use ``w * (1 - sigmoid(.))``, the same value when ``lambda_y = w``.
    Rewards are ``beta * h``, TRL's ``chosen_rewards`` / ``rejected_rewards``. The paper and TRL
    advise weights with ``w_d * n_d / (w_u * n_u)`` in [1, 4/3] when the classes are unbalanced.

    Unlike TRL, which concatenates the desirable losses before the undesirable ones, the rows
    keep their input order. Typical ranges: beta 0.01 to 0.5 (0.1), weights 0.5 to 2.

    Inputs: summed log-probs (B,) of each completion under the policy and the reference, the
    desirable flags (B,), and z0 from :func:`kto_reference_point`.
    """

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
    ) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if desirable_weight < 0 or undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, {undesirable_weight}"
            )
        self.beta = float(beta)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def forward(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        desirable: torch.Tensor,
        reference_point: torch.Tensor | float,
    ) -> KTOLossOutput:
        """Compute per-example losses.

        Args:
            policy_logps: summed log pi(y|x), with grad, shape (B,).
            reference_logps: summed log pi_ref(y|x), shape (B,).
            desirable: True where the completion is desirable, shape (B,) bool.
            reference_point: z0, 0-d (or a float), >= 0; detached here, since the paper does not
                back-propagate through it.

        Returns:
            KTOLossOutput with losses (B,) to be averaged.
        """
        check_batch(policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable)
        if desirable.dtype != torch.bool:
            raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
        z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
        if z0.dim() != 0:
            raise ValueError(f"reference_point must be 0-d, got shape {tuple(z0.shape)}")
        if not bool(torch.isfinite(z0)) or float(z0) < 0:
            raise ValueError(
                f"reference_point must be finite and >= 0 (kto_reference_point clamps it), got {float(z0)}"
            )
        logratios = policy_logps - reference_logps  # (B,)
        desirable_losses = self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (logratios - z0)))  # (B,)
        undesirable_losses = self.undesirable_weight * (
            1.0 - torch.sigmoid(self.beta * (z0 - logratios))
        )  # (B,)
        return KTOLossOutput(
            losses=torch.where(desirable, desirable_losses, undesirable_losses),
            rewards=self.beta * logratios.detach(),
            desirable=desirable,
        )
