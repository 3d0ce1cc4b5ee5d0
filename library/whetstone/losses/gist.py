"""GIST-style guided false-negative masking (GISTEmbed) on top of InfoNCE.

The guide is a frozen encoder (often larger or already well trained). The caller embeds the same
queries and candidates with it and passes its scores; this module never calls a model, so the
gathered variant works the same way (gather guide document embeddings alongside the trained ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from whetstone.losses.info_nce import ContrastiveOutput, InfoNCELoss

MarginStrategy = Literal["absolute", "relative"]
MARGIN_STRATEGIES = ("absolute", "relative")


def guide_scores_from_embeddings(
    guide_query_embeddings: torch.Tensor, guide_doc_embeddings: torch.Tensor, positive_column: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guide cosine scores for every (query, candidate) cell and for each query's positive.

    Args:
        guide_query_embeddings: (B, G) unit-norm, from the frozen guide encoder.
        guide_doc_embeddings: (M, G) unit-norm, same candidate order as the trained model's.
        positive_column: (B,) long, index of each query's positive in [0, M).

    Returns:
        (guide_scores (B, M), guide_positive_scores (B,)), both without gradient.
    """
    with torch.no_grad():
        guide_scores = guide_query_embeddings @ guide_doc_embeddings.T  # (B, M)
        rows = torch.arange(guide_scores.shape[0], device=guide_scores.device)
        return guide_scores, guide_scores[rows, positive_column.to(guide_scores.device)]  # (B, M), (B,)


def guided_exclude_mask(
    guide_scores: torch.Tensor,
    guide_positive_scores: torch.Tensor,
    positive_column: torch.Tensor,
    margin: float = 0.0,
    margin_strategy: MarginStrategy = "absolute",
) -> torch.Tensor:
    """Cells the guide scores above (or too close to) the query's positive: likely false negatives.

    The rule is sentence-transformers' ``GISTEmbedLoss`` (v6, ``sentence_transformer/losses/
    gist_embed.py``, ``mask_false_negatives``): a candidate is dropped when its guide score is
    strictly greater than a threshold derived from the guide's positive score ``p``:

    - ``"absolute"``: threshold ``p - margin``;
    - ``"relative"``: threshold ``p - |p| * margin``.

    With ``margin=0`` both reduce to "strictly above the positive" (GISTEmbed, Solatorio 2024,
    arXiv 2402.16829). The positive cell itself is never dropped.

    Args:
        guide_scores: (B, M) guide similarity of each query with each candidate.
        guide_positive_scores: (B,) guide similarity of each query with its positive.
        positive_column: (B,) long, index of each query's positive in [0, M).
        margin: >= 0; typical 0 to 0.1 (absolute, cosine units) or 0 to 0.1 (relative share).
        margin_strategy: ``"absolute"`` or ``"relative"``.

    Returns:
        (B, M) bool, True where the cell is excluded.

    Example: guide row [0.9, 0.7, 0.85, 0.5], positive column 0 (p = 0.9). Absolute margin 0.1:
    threshold 0.8, so column 2 (0.85) is dropped. Relative margin 0.1: threshold 0.9 - 0.09 = 0.81,
    column 2 is dropped too; with relative margin 0.05 the threshold is 0.855 and nothing is.
    """
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}, got {margin_strategy!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if guide_scores.dim() != 2 or guide_positive_scores.shape != (guide_scores.shape[0],):
        raise ValueError(
            f"guide_scores must be (B, M) and guide_positive_scores (B,), got "
            f"{tuple(guide_scores.shape)} and {tuple(guide_positive_scores.shape)}"
        )
    positive = guide_positive_scores.detach().unsqueeze(1)  # (B, 1)
    if margin_strategy == "absolute":
        threshold = positive - margin  # (B, 1)
    else:
        threshold = positive - positive.abs() * margin  # (B, 1)
    mask = guide_scores.detach() > threshold  # (B, M)
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[rows, positive_column.to(mask.device)] = False
    return mask


@dataclass
class GISTOutput(ContrastiveOutput):
    """InfoNCE's output plus the share of cells the guide alone dropped."""

    guide_masked_fraction: float = 0.0


class GISTLoss(nn.Module):
    """InfoNCE whose negatives are filtered by a frozen guide model's scores (GISTEmbed).

    In-batch and mined negatives contain unlabelled positives; pushing them away hurts. GISTEmbed
    (Solatorio 2024, arXiv 2402.16829) asks a guide encoder for its opinion: any candidate the guide
    ranks above the query's labelled positive (or within ``guide_margin`` of it) is removed from
    that query's softmax. The surviving cells are scored by :class:`InfoNCELoss` with the trained
    model's embeddings; the guide mask is OR-ed with any caller mask (labelled positives and
    duplicates from :func:`whetstone.losses.info_nce.false_negative_mask`).

    Args:
        guide_margin: >= 0, typical 0 to 0.1; 0 drops only cells strictly above the positive.
        margin_strategy: ``"absolute"`` (cosine units) or ``"relative"`` (share of the positive).
        temperature: InfoNCE temperature, typical 0.01 to 0.05 (GISTEmbed uses 0.01).
        symmetric: add InfoNCE's document-to-query term.

    Shapes: query_embeddings (B, D), doc_embeddings (M, D), positive_column (B,),
    guide_scores (B, M), guide_positive_scores (B,), exclude_mask (B, M); losses (B,).
    """

    def __init__(
        self,
        guide_margin: float = 0.0,
        margin_strategy: MarginStrategy = "absolute",
        temperature: float = 0.01,
        symmetric: bool = False,
    ):
        super().__init__()
        if margin_strategy not in MARGIN_STRATEGIES:
            raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}, got {margin_strategy!r}")
        if guide_margin < 0:
            raise ValueError(f"guide_margin must be >= 0, got {guide_margin}")
        self.guide_margin = guide_margin
        self.margin_strategy: MarginStrategy = margin_strategy
        self.info_nce = InfoNCELoss(temperature=temperature, symmetric=symmetric)

    def forward(
        self,
        query_embeddings: torch.Tensor,
        doc_embeddings: torch.Tensor,
        positive_column: torch.Tensor,
        guide_scores: torch.Tensor,
        guide_positive_scores: torch.Tensor | None = None,
        exclude_mask: torch.Tensor | None = None,
    ) -> GISTOutput:
        """Mask by the guide, then InfoNCE.

        Args:
            query_embeddings: (B, D) unit-norm, trained model.
            doc_embeddings: (M, D) unit-norm, trained model.
            positive_column: (B,) long.
            guide_scores: (B, M) guide similarities for the same cells.
            guide_positive_scores: (B,); read from ``guide_scores`` at the positive when omitted.
            exclude_mask: (B, M) bool, cells already excluded (labelled positives, duplicates).

        Returns:
            GISTOutput with per-query losses (B,); ``masked_fraction`` counts all excluded cells,
            ``guide_masked_fraction`` those the guide dropped.
        """
        expected = (query_embeddings.shape[0], doc_embeddings.shape[0])
        if tuple(guide_scores.shape) != expected:
            raise ValueError(f"guide_scores must be {expected} (B, M), got {tuple(guide_scores.shape)}")
        rows = torch.arange(expected[0], device=guide_scores.device)
        if guide_positive_scores is None:
            guide_positive_scores = guide_scores[rows, positive_column.to(guide_scores.device)]  # (B,)
        guided = guided_exclude_mask(
            guide_scores, guide_positive_scores, positive_column, self.guide_margin, self.margin_strategy
        )  # (B, M)
        combined = guided if exclude_mask is None else guided | exclude_mask.to(guided.device)  # (B, M)
        out = self.info_nce(query_embeddings, doc_embeddings, positive_column, combined)
        return GISTOutput(
            losses=out.losses,
            positive_scores=out.positive_scores,
            hardest_negative_scores=out.hardest_negative_scores,
            masked_fraction=out.masked_fraction,
            guide_masked_fraction=float(guided.float().mean()),
        )
