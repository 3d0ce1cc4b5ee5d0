"""Label contrast for classification data: each text against its label and a few other labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from whetstone.losses.info_nce import ContrastiveOutput

NO_LABEL = -1  # padding in negative_labels when fewer than max_negatives other labels exist


def sample_negative_labels(
    labels: torch.Tensor, num_labels: int, max_negatives: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Up to ``max_negatives`` distinct labels other than each row's own, sampled uniformly.

    Args:
        labels: (B,) long, each in [0, num_labels).
        num_labels: size of the label set L (>= 2).
        max_negatives: K, Piccolo2 uses up to 10.
        generator: for reproducible sampling (seed it from step and rank).

    Returns:
        (B, min(K, L - 1)) long, no row containing its own label.
    """
    if num_labels < 2:
        raise ValueError(f"label contrast needs at least 2 labels, got num_labels={num_labels}")
    bad = ((labels < 0) | (labels >= num_labels)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"labels at rows {bad} are outside [0, {num_labels})")
    count = min(max_negatives, num_labels - 1)
    rows = []
    for label in labels.tolist():
        # a permutation of the L - 1 other labels: shift indices at or above the own label by one
        others = torch.randperm(num_labels - 1, generator=generator)[:count]  # (K,)
        rows.append(others + (others >= label).long())
    return torch.stack(rows).to(labels.device)  # (B, K)


class LabelContrastLoss(nn.Module):
    """Softmax of each text over its own label and a few other labels, no in-batch negatives.

    Classification data turned into retrieval: the text is the query, its label's text (embedded by
    the same encoder) is the positive, and other labels are the negatives. Piccolo2 (arXiv
    2405.06932) uses τ = 0.05, up to 10 other labels as negatives and no in-batch negatives,
    because other texts in the batch often share the label and would be false negatives; it
    weighs this loss 0.2 in its multi-task mix.

    Args:
        temperature: (0, 1], typical 0.05.
        max_negatives: K, other labels per example when they are sampled here (Piccolo2: 10).

    Shapes: query_embeddings (B, D), label_embeddings (L, D), labels (B,), negative_labels (B, K)
    with -1 as padding; losses (B,). ``from_candidates`` takes per-row candidates (B, 1+K, D) with
    the positive first.
    """

    def __init__(self, temperature: float = 0.05, max_negatives: int = 10):
        super().__init__()
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        if max_negatives < 1:
            raise ValueError(f"max_negatives must be >= 1, got {max_negatives}")
        self.temperature = temperature
        self.max_negatives = max_negatives

    def forward(
        self,
        query_embeddings: torch.Tensor,
        label_embeddings: torch.Tensor,
        labels: torch.Tensor,
        negative_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ContrastiveOutput:
        """Each text against its label and its negative labels.

        Args:
            query_embeddings: (B, D) unit-norm text embeddings.
            label_embeddings: (L, D) unit-norm embeddings of the label texts.
            labels: (B,) long, each text's label index.
            negative_labels: (B, K) long, other labels per row (-1 pads); sampled with
                ``generator`` when omitted.
            generator: used only when ``negative_labels`` is None.
        """
        num_labels = int(label_embeddings.shape[0])
        if negative_labels is None:
            negative_labels = sample_negative_labels(labels, num_labels, self.max_negatives, generator)
        own = negative_labels == labels.unsqueeze(1)  # (B, K)
        if own.any():
            rows = own.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"negative_labels rows {rows} contain the row's own label")
        out_of_range = (negative_labels < NO_LABEL) | (negative_labels >= num_labels)  # (B, K)
        if out_of_range.any():
            rows = out_of_range.any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"negative_labels rows {rows} are outside [-1, {num_labels})")
        candidate_labels = torch.cat([labels.unsqueeze(1), negative_labels], dim=1)  # (B, 1+K)
        valid = candidate_labels != NO_LABEL  # (B, 1+K)
        candidates = label_embeddings[candidate_labels.clamp(min=0)]  # (B, 1+K, D)
        return self.from_candidates(query_embeddings, candidates, valid)

    def from_candidates(
        self, query_embeddings: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor | None = None
    ) -> ContrastiveOutput:
        """Cross-entropy at candidate 0 of each row.

        Args:
            query_embeddings: (B, D) unit-norm.
            candidates: (B, 1+K, D) unit-norm, the positive first.
            valid: (B, 1+K) bool, False for padding (column 0 must be True).

        Returns:
            ContrastiveOutput: losses (B,), positive_scores (B,), hardest_negative_scores (B,)
            (-inf for rows without a valid negative), masked_fraction = share of padded cells.
        """
        scores = torch.einsum("bd,bkd->bk", query_embeddings, candidates)  # (B, 1+K) cosine
        logits = scores / self.temperature  # (B, 1+K)
        if valid is not None:
            if not bool(valid[:, 0].all()):
                raise ValueError("valid[:, 0] must be True: column 0 is each row's positive label")
            logits = logits.masked_fill(~valid, float("-inf"))
        target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        losses = F.cross_entropy(logits, target, reduction="none")  # (B,)
        with torch.no_grad():
            negatives = scores.detach()[:, 1:]  # (B, K)
            if valid is not None:
                negatives = negatives.masked_fill(~valid[:, 1:], float("-inf"))
            hardest = (
                negatives.max(dim=1).values
                if negatives.shape[1]
                else torch.full_like(scores[:, 0], float("-inf"))
            )  # (B,)
            padded = float((~valid).float().mean()) if valid is not None else 0.0
        return ContrastiveOutput(losses, scores.detach()[:, 0], hardest, padded)
