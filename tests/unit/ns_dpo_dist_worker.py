"""Worker for the 2-process gloo test of NS-DPO's global normalisation.

Kept apart from the test module so spawned children import only torch and the loss, not TRL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from whetstone.losses.ns_dpo import NSDPOLoss

SIDES = ("policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")


def ns_dpo_worker(rank: int, world_size: int, port: int, tensors: dict, out_dir: str) -> None:
    """NS-DPO on this rank's contiguous slice of the batch, with the weight sum all-reduced."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        per_rank = tensors["policy_chosen_logps"].shape[0] // world_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        chosen = tensors["policy_chosen_logps"][part].clone().requires_grad_()
        rest = [tensors[key][part] for key in SIDES]
        out = NSDPOLoss(beta=0.1, gamma=0.8)(chosen, *rest, time_steps=tensors["time_steps"][part], current_step=10)
        out.reduce().backward()
        torch.save(
            {"losses": out.losses.detach(), "weights": out.weights, "grad": chosen.grad}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()
