"""Matryoshka representation learning: one loss applied at several embedding prefixes.

Also holds the eval helper that produces the same truncated, re-normalised view of stored vectors,
so retrieval metrics can be reported per dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def truncate_embeddings(vectors: ArrayT, dim: int) -> ArrayT:
    """First ``dim`` coordinates of each row, re-normalised to unit length.

    Works on numpy arrays (eval: nDCG per dimension on stored vectors) and torch tensors
    (training, keeps gradients). Normalising before truncation does not matter: the row scale
    cancels in the re-normalisation.

    Args:
        vectors: (N, D).
        dim: 1 <= dim <= D.

    Returns:
        (N, dim) unit-norm rows, same type as ``vectors`` (numpy output is float32).
    """
    full = int(vectors.shape[-1])
    if not 1 <= dim <= full:
        raise ValueError(f"Matryoshka dim {dim} is outside [1, {full}] (the embedding width)")
    if isinstance(vectors, torch.Tensor):
        return F.normalize(vectors[..., :dim], dim=-1)  # (N, dim)
    prefix = np.asarray(vectors, dtype=np.float32)[..., :dim]  # (N, dim)
    norms = np.linalg.norm(prefix, axis=-1, keepdims=True)  # (N, 1)
    # Same floor as F.normalize, so a zero prefix stays zero instead of becoming NaN.
    return prefix / np.maximum(norms, 1e-12)


def per_dimension_views(vectors: ArrayT, dims: Sequence[int]) -> dict[int, ArrayT]:
    """``{dim: truncate_embeddings(vectors, dim)}`` for each requested dim (eval per dimension)."""
    return {int(dim): truncate_embeddings(vectors, int(dim)) for dim in dims}


@dataclass
class MatryoshkaOutput:
    """Weighted per-example losses plus each dimension's own output (detached diagnostics).

    ``positive_scores``, ``hardest_negative_scores`` and ``masked_fraction`` read the largest
    dimension's output, so a loop written for :class:`ContrastiveOutput` can log this unchanged.
    """

    losses: torch.Tensor  # (B,) sum over dims of weight * per-dim loss
    per_dim: dict[int, Any] = field(default_factory=dict)  # dim -> base loss output at that dim
    per_dim_mean_loss: dict[int, float] = field(default_factory=dict)  # dim -> detached mean loss

    @property
    def full(self) -> Any:
        return self.per_dim[max(self.per_dim)]

    @property
    def positive_scores(self) -> torch.Tensor:
        return self.full.positive_scores

    @property
    def hardest_negative_scores(self) -> torch.Tensor:
        return self.full.hardest_negative_scores

    @property
    def masked_fraction(self) -> float:
        return self.full.masked_fraction


class MatryoshkaLoss(nn.Module):
    """Apply a base contrastive loss to nested prefixes of the embeddings and sum with weights.

    Matryoshka Representation Learning (Kusupati et al. 2022, arXiv 2205.13147) trains the first
    ``d`` coordinates of an embedding to be a good embedding on their own for every ``d`` in a
    nested list, so one model serves several index sizes. Here the query and document embeddings
    are truncated to each dim, re-normalised, and passed to ``base_loss`` with the same extra
    arguments (positive columns, masks, guide scores); the per-example losses are combined as
    ``sum_d weight_d * loss_d``. Masks computed on ids or by a guide do not depend on the dim.

    Args:
        base_loss: any loss whose forward is ``(query_embeddings, doc_embeddings, *args)`` and
            returns an object with ``losses`` (B,) — InfoNCELoss, GISTLoss, DecoupledSoftmaxLoss.
        dims: distinct positive ints, e.g. [768, 512, 256, 128, 64] (or [384, 256, 128, 64] for
            MiniLM); each must be <= the embedding width at forward time.
        weights: one per dim, >= 0; default 1.0 each (as sentence-transformers' MatryoshkaLoss).

    Shapes: query_embeddings (B, D), doc_embeddings (M, D); losses (B,).
    """

    def __init__(self, base_loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None):
        super().__init__()
        dims = [int(dim) for dim in dims]
        if not dims:
            raise ValueError("Matryoshka dims must not be empty")
        if any(dim < 1 for dim in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"Matryoshka dims must be distinct positive ints, got {dims}")
        weights = [1.0] * len(dims) if weights is None else [float(weight) for weight in weights]
        if len(weights) != len(dims):
            raise ValueError(f"Matryoshka weights ({len(weights)}) must match dims ({len(dims)})")
        if any(weight < 0 for weight in weights):
            raise ValueError(f"Matryoshka weights must be >= 0, got {weights}")
        self.base_loss = base_loss
        self.dims = dims
        self.weights = weights

    def forward(
        self, query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, *args: Any, **kwargs: Any
    ) -> MatryoshkaOutput:
        """Base loss at every dim, weighted sum of per-example losses.

        Args:
            query_embeddings: (B, D), normalised or not (each prefix is re-normalised).
            doc_embeddings: (M, D).
            *args, **kwargs: passed to ``base_loss`` unchanged at every dim.

        Returns:
            MatryoshkaOutput with losses (B,) and per-dim outputs.
        """
        width = int(query_embeddings.shape[-1])
        too_wide = [dim for dim in self.dims if dim > width]
        if too_wide:
            raise ValueError(f"Matryoshka dims {too_wide} exceed the embedding width {width}")
        total: torch.Tensor | None = None
        per_dim: dict[int, Any] = {}
        mean_loss: dict[int, float] = {}
        for dim, weight in zip(self.dims, self.weights, strict=True):
            queries = truncate_embeddings(query_embeddings, dim)  # (B, dim)
            docs = truncate_embeddings(doc_embeddings, dim)  # (M, dim)
            out = self.base_loss(queries, docs, *args, **kwargs)
            weighted = weight * out.losses  # (B,)
            total = weighted if total is None else total + weighted
            per_dim[dim] = out
            mean_loss[dim] = float(out.losses.detach().mean())
        assert total is not None  # dims is non-empty
        return MatryoshkaOutput(losses=total, per_dim=per_dim, per_dim_mean_loss=mean_loss)
