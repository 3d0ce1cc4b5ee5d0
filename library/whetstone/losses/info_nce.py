"""InfoNCE over in-batch plus hard negatives, with false-negative masking.

The math works on embeddings only, so the gathered (multi-worker) variant in
:mod:`whetstone.losses.gather` reuses it unchanged: gather the document embeddings and ids from
every worker, then call :class:`InfoNCELoss` with the local queries against the global documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ContrastiveOutput:
    """Per-query losses plus detached diagnostics; the training loop reduces."""

    losses: torch.Tensor  # (B,)
    positive_scores: torch.Tensor  # (B,) cosine of each query with its positive
    hardest_negative_scores: torch.Tensor  # (B,) best-scoring unmasked negative
    masked_fraction: float  # share of (query, doc) cells masked out as false negatives


def false_negative_mask(
    doc_ids: Sequence[str],
    positive_column: torch.Tensor,
    query_positive_ids: Sequence[Sequence[str]],
) -> torch.Tensor:
    """Cells to drop from each query's negatives: its labelled positives and duplicates of them.

    Args:
        doc_ids: M document ids, one per candidate column (positives and negatives of all queries).
        positive_column: (B,) column index of each query's own positive.
        query_positive_ids: for each of the B queries, every labelled positive id.

    Returns:
        (B, M) bool, True where the cell is excluded. A query's own positive column is never
        excluded (it is the target).

    Example: doc_ids = [a, b, a], query 0 has positive column 0 with positives {a}: column 2 is a
    duplicate of a, so row 0 is [False, False, True].
    """
    num_queries, num_docs = len(query_positive_ids), len(doc_ids)
    column_of: dict[str, list[int]] = {}
    for col, doc_id in enumerate(doc_ids):
        column_of.setdefault(doc_id, []).append(col)
    mask = torch.zeros(num_queries, num_docs, dtype=torch.bool)
    for row, positives in enumerate(query_positive_ids):
        own = {doc_ids[int(positive_column[row])], *positives}
        for doc_id in own:
            for col in column_of.get(doc_id, ()):
                mask[row, col] = True
        mask[row, int(positive_column[row])] = False
    return mask


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query's positive against every other document in the batch.

    Each query scores all M candidate documents (the batch's positives, used as in-batch
    negatives for the other queries, plus every hard negative), scaled by 1/temperature; the
    loss is -log softmax at the query's own positive. Cells that are labelled positives of the
    query, or duplicates of them, are masked to -inf so they are never pushed away (the
    false-negative problem of in-batch and mined negatives).

    This is sentence-transformers' MultipleNegativesRankingLoss (van den Oord et al. 2018,
    arXiv 1807.03748; Henderson et al. 2017) with explicit masking. Temperature 0.01 to 0.05
    is typical for unit-norm embeddings (MNRL's scale 20 is temperature 0.05).

    With ``symmetric=True`` a second term scores each positive against all queries
    (document-to-query), averaged with the first.
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(
        self,
        query_embeddings: torch.Tensor,
        doc_embeddings: torch.Tensor,
        positive_column: torch.Tensor,
        exclude_mask: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """Score and reduce nothing.

        Args:
            query_embeddings: (B, D) unit-norm.
            doc_embeddings: (M, D) unit-norm, M >= B.
            positive_column: (B,) long, index in [0, M) of each query's positive.
            exclude_mask: (B, M) bool, True to drop a cell from the softmax.

        Returns:
            ContrastiveOutput with per-query losses (B,).
        """
        scores = query_embeddings @ doc_embeddings.T  # (B, M) cosine
        logits = scores / self.temperature  # (B, M)
        if exclude_mask is not None:
            logits = logits.masked_fill(exclude_mask.to(logits.device), float("-inf"))
        losses = F.cross_entropy(logits, positive_column, reduction="none")  # (B,)
        if self.symmetric:
            losses = 0.5 * (losses + self._doc_to_query(scores, positive_column, exclude_mask))
        with torch.no_grad():
            rows = torch.arange(scores.shape[0], device=scores.device)
            positive_scores = scores[rows, positive_column]  # (B,)
            negatives = scores.detach().clone()
            negatives[rows, positive_column] = float("-inf")
            if exclude_mask is not None:
                negatives = negatives.masked_fill(exclude_mask.to(scores.device), float("-inf"))
            hardest = negatives.max(dim=1).values  # (B,)
            masked = float(exclude_mask.float().mean()) if exclude_mask is not None else 0.0
        return ContrastiveOutput(losses, positive_scores.detach(), hardest, masked)

    def _doc_to_query(
        self, scores: torch.Tensor, positive_column: torch.Tensor, exclude_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Each query's positive scored against all B queries (only the positives' columns)."""
        logits = scores[:, positive_column].T / self.temperature  # (B, B): positive j vs query i
        if exclude_mask is not None:
            # Query i is a false "negative" for positive j when j's document is i's labelled positive.
            cross = exclude_mask[:, positive_column].T.to(logits.device)  # (B, B)
            logits = logits.masked_fill(cross, float("-inf"))
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target, reduction="none")  # (B,)
