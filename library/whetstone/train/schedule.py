"""The optimiser step and LR schedule both training jobs share."""

from __future__ import annotations

import torch

from whetstone.train.contrastive import linear_warmup_decay


def warmup_decay_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                          warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of ``total_steps``, then linear decay to 0."""
    warmup = int(total_steps * warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total_steps, warmup))


def optimiser_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, clip the gradient norm, optimiser step, schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
