"""CoSENT: a ranking loss for pairs with graded similarity labels (STS-style data)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CoSENTOutput:
    """One batch-level loss plus detached diagnostics; the training loop reduces ``losses``."""

    losses: torch.Tensor  # (1,) CoSENT couples every ordered pair, so it has no per-example form
    pair_scores: torch.Tensor  # (P,) cosine of each pair, detached
    ordered_pairs: int  # number of (i, j) with label_i > label_j
    concordance: float  # share of those pairs with cos_i > cos_j (1.0 when there are none)


def cosent_loss_from_scores(cosine_scores: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """``log(1 + Σ_{(i, j): y_i > y_j} exp(scale * (cos_j - cos_i)))`` as a (1,) tensor.

    Pair i should score above pair j whenever its label is higher; every violation (and every
    near-tie) adds ``exp(scale * (cos_j - cos_i))``. Ties in the label contribute nothing.

    Args:
        cosine_scores: (P,) similarity of each input pair.
        labels: (P,) graded labels (any real scale; only their order matters).
        scale: 1 / temperature, e.g. 20 (Piccolo2's s = cos / 0.05).

    Returns:
        (1,) loss.
    """
    if cosine_scores.dim() != 1 or labels.shape != cosine_scores.shape:
        raise ValueError(
            f"CoSENT needs (P,) scores and (P,) labels, got {tuple(cosine_scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    scores = cosine_scores.float() * scale  # (P,)
    labels = labels.to(scores.device).float()  # (P,)
    # difference[i, j] = s_j - s_i, counted only where pair i has the higher label
    difference = scores.unsqueeze(0) - scores.unsqueeze(1)  # (P, P)
    ordered = labels.unsqueeze(1) > labels.unsqueeze(0)  # (P, P)
    violations = difference[ordered]  # (K,)
    # the leading 0 is the "1 +" inside the log: logsumexp([0, x...]) = log(1 + Σ e^x)
    return torch.logsumexp(torch.cat([scores.new_zeros(1), violations]), dim=0, keepdim=True)  # (1,)


class CoSENTLoss(nn.Module):
    """Rank pairs by cosine in the order of their graded labels (CoSENT).

    For graded pair data (STS scores, relevance grades) regression onto the label (CosineSimilarity
    loss) wastes effort matching absolute values; CoSENT (Su 2022; Huang et al. 2024,
    doi:10.1109/TASLP.2024.3402087) only asks that a pair with a higher label gets a higher cosine:

        L = log(1 + Σ_{(i, j): y_i > y_j} exp((cos_j - cos_i) / τ)).

    This is the same function as sentence-transformers' ``CoSENTLoss`` with ``scale = 1/τ``
    (checked in tests/unit/test_contrastive_losses.py) and as Piccolo2's (arXiv 2405.06932)
    ``log(1 + Σ_{y_j > y_i} exp(s_i - s_j))`` with s = cos / 0.05 (the index names are swapped,
    the set of terms is the same). Piccolo2 weighs it 0.04 in its multi-task mix
    (:class:`whetstone.losses.multitask.MultiTaskLoss`).

    Args:
        temperature: (0, 1], typical 0.05 (scale 20).

    Shapes: a_embeddings (P, D), b_embeddings (P, D), labels (P,); losses (1,).
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature

    def forward(self, a_embeddings: torch.Tensor, b_embeddings: torch.Tensor, labels: torch.Tensor) -> CoSENTOutput:
        """Cosine of each (a_i, b_i) pair, then :meth:`from_scores`.

        Args:
            a_embeddings: (P, D) first text of each pair.
            b_embeddings: (P, D) second text of each pair.
            labels: (P,) graded labels.
        """
        if a_embeddings.shape != b_embeddings.shape:
            raise ValueError(
                f"CoSENT pairs need equal shapes, got {tuple(a_embeddings.shape)} and {tuple(b_embeddings.shape)}"
            )
        cosine = F.cosine_similarity(a_embeddings, b_embeddings, dim=-1)  # (P,)
        return self.from_scores(cosine, labels)

    def from_scores(self, cosine_scores: torch.Tensor, labels: torch.Tensor) -> CoSENTOutput:
        """Loss from (P,) pair cosines and (P,) labels."""
        loss = cosent_loss_from_scores(cosine_scores, labels, 1.0 / self.temperature)  # (1,)
        with torch.no_grad():
            scores = cosine_scores.detach()  # (P,)
            labels = labels.to(scores.device)
            ordered = labels.unsqueeze(1) > labels.unsqueeze(0)  # (P, P)
            correct = ordered & (scores.unsqueeze(1) > scores.unsqueeze(0))  # (P, P)
            count = int(ordered.sum())
            concordance = float(correct.sum()) / count if count else 1.0
        return CoSENTOutput(loss, scores, count, concordance)
