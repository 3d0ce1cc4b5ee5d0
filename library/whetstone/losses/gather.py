"""Gather document embeddings from every worker, keeping gradients (the global batch).

Each worker scores its own queries against the documents of all workers. The all-gather here is
differentiable: its backward sums the gradient that every worker's loss sends to a shard and
hands it to the worker that owns the shard. DDP then averages parameter gradients,
so the result equals one process computing the mean loss over the global batch (tested in
tests/unit/test_info_nce.py on two gloo processes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """(N, D) on every worker -> (world, N, D), the same on every worker, with gradient.

    ``torch.distributed.nn.functional.all_gather`` did this; torch 2.13 warns it is deprecated. The
    backward is the same: sum every worker's gradient (all-reduce), keep this worker's row.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over workers; all-reduce runs on every backend, gloo included
        return grad[ctx.rank]


def gather_documents(
    doc_embeddings: torch.Tensor, doc_ids: Sequence[str]
) -> tuple[torch.Tensor, list[str], int]:
    """All-gather (M_w, D) embeddings and their ids from every worker.

    Workers may hold different M_w (the last batch, or fewer negatives found): rows are padded
    to the largest M_w for the collective and the padding is dropped afterwards.

    Returns:
        (embeddings (sum M_w, D) with gradient, ids in the same order, offset of this worker's
        first row in the gathered matrix).
    """
    if not is_distributed():
        return doc_embeddings, list(doc_ids), 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes: list[int] = [0] * world
    dist.all_gather_object(sizes, int(doc_embeddings.shape[0]))
    all_ids: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(all_ids, list(doc_ids))
    largest = max(sizes)
    padded = doc_embeddings
    if doc_embeddings.shape[0] < largest:
        pad = doc_embeddings.new_zeros(largest - doc_embeddings.shape[0], doc_embeddings.shape[1])
        padded = torch.cat([doc_embeddings, pad], dim=0)  # (largest, D)
    pieces = _AllGather.apply(padded)  # (world, largest, D), differentiable
    gathered = torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)], dim=0)  # (sum M_w, D)
    ids = [doc_id for worker_ids in all_ids for doc_id in worker_ids]
    return gathered, ids, sum(sizes[:rank])
