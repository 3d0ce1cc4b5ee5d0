"""Multi-positive queries with the decoupled softmax (each positive competes only with negatives)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.info_nce import ContrastiveOutput


def positives_matrix(doc_ids: Sequence[str], query_positive_ids: Sequence[Sequence[str]]) -> torch.Tensor:
    """Mark every candidate column whose id is one of the query's labelled positives.

    Args:
        doc_ids: M candidate ids (the gathered batch's documents and negatives, in column order).
        query_positive_ids: for each of B queries, its labelled positive ids.

    Returns:
        (B, M) bool. Duplicated ids mark every copy (each copy is a positive term).

    Example: doc_ids [a, b, c, a], query positives [[a, c], [b]] ->
    [[T, F, T, T], [F, T, F, F]].
    """
    column_of: dict[str, list[int]] = {}
    for col, doc_id in enumerate(doc_ids):
        column_of.setdefault(doc_id, []).append(col)
    positives = torch.zeros(len(query_positive_ids), len(doc_ids), dtype=torch.bool)
    for row, ids in enumerate(query_positive_ids):
        for doc_id in ids:
            for col in column_of.get(doc_id, ()):
                positives[row, col] = True
    return positives


def decoupled_softmax_losses(
    logits: torch.Tensor, positives: torch.Tensor, exclude_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-query mean over positives of ``-log(e^{l_p} / (e^{l_p} + sum_{n not in P} e^{l_n}))``.

    Args:
        logits: (B, M) scores already divided by the temperature.
        positives: (B, M) bool, at least one True per row.
        exclude_mask: (B, M) bool, negatives to drop (ignored on positive cells: a labelled positive
            is a positive term, never a negative).

    Returns:
        (B,) losses.
    """
    if logits.shape != positives.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and positives {tuple(positives.shape)} must match")
    positives = positives.to(logits.device)
    counts = positives.sum(dim=1)  # (B,)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"query rows {empty} have no positive among the {logits.shape[1]} candidates")
    not_negative = positives if exclude_mask is None else positives | exclude_mask.to(logits.device)  # (B, M)
    has_negative = (~not_negative).any(dim=1)  # (B,)
    # A row without negatives would make logsumexp's backward NaN (exp(-inf - -inf)): give it finite
    # dummy logits, then drop its value with where(), so its loss is exactly 0 with zero gradient.
    negative_logits = logits.masked_fill(not_negative & has_negative.unsqueeze(1), float("-inf"))  # (B, M)
    negative_lse = torch.logsumexp(negative_logits, dim=1)  # (B,)
    negative_lse = torch.where(has_negative, negative_lse, torch.full_like(negative_lse, float("-inf")))  # (B,)
    # -log(e^l / (e^l + e^N)) = log(1 + e^{N - l}) = softplus(N - l), one term per cell
    terms = F.softplus(negative_lse.unsqueeze(1) - logits)  # (B, M)
    terms = terms.masked_fill(~positives, 0.0)  # (B, M), only positive cells count
    return terms.sum(dim=1) / counts.to(logits.dtype)  # (B,)


class DecoupledSoftmaxLoss(nn.Module):
    """Contrastive loss for queries with several positives among the candidates.

    Plain InfoNCE with several positives puts all of them in one softmax, so positives compete with
    each other and a query with many positives gets a weaker signal per positive. The decoupled
    softmax (Gupta et al., "Dual-Encoders for Extreme Multi-Label Classification", arXiv
    2310.10636) gives each positive p of query i its own term whose denominator excludes the other
    positives:

        loss_ip = -log( e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n ∉ P_i} e^{s_in/τ}) ),  loss_i = mean_{p ∈ P_i} loss_ip.

    With exactly one positive per query it equals :class:`InfoNCELoss`. Candidates are any M
    documents (in-batch positives of other queries, hard negatives, gathered across workers).

    Args:
        temperature: (0, 1], typical 0.01 to 0.05 for unit-norm embeddings.

    Shapes: query_embeddings (B, D), doc_embeddings (M, D), positives (B, M) bool,
    exclude_mask (B, M) bool; losses (B,).
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        query_embeddings: torch.Tensor,
        doc_embeddings: torch.Tensor,
        positives: torch.Tensor,
        exclude_mask: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """Score embeddings, then :meth:`from_scores`."""
        scores = query_embeddings @ doc_embeddings.T  # (B, M) cosine
        return self.from_scores(scores, positives, exclude_mask)

    def from_scores(
        self, scores: torch.Tensor, positives: torch.Tensor, exclude_mask: torch.Tensor | None = None
    ) -> ContrastiveOutput:
        """Loss from precomputed (B, M) similarities (not yet divided by the temperature).

        Returns:
            ContrastiveOutput: losses (B,); positive_scores (B,) is the mean score over each
            query's positives; hardest_negative_scores (B,) the best non-positive, non-excluded
            cell (-inf when none); masked_fraction the share of excluded non-positive cells.
        """
        losses = decoupled_softmax_losses(scores / self.temperature, positives, exclude_mask)  # (B,)
        with torch.no_grad():
            positives = positives.to(scores.device)
            detached = scores.detach()  # (B, M)
            positive_scores = (detached * positives).sum(dim=1) / positives.sum(dim=1)  # (B,)
            dropped = positives.clone()  # (B, M)
            masked = 0.0
            if exclude_mask is not None:
                excluded_negatives = exclude_mask.to(scores.device) & ~positives  # (B, M)
                dropped |= excluded_negatives
                masked = float(excluded_negatives.float().mean())
            hardest = detached.masked_fill(dropped, float("-inf")).max(dim=1).values  # (B,)
        return ContrastiveOutput(losses, positive_scores, hardest, masked)
