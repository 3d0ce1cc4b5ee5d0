"""Worker for the 2-process gloo test: sequence_logps through a DDP wrapper synchronises gradients.

Kept apart from the test module so spawned children import only what they need.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel
from whetstone.models.policy import sequence_logps


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """The 2-layer GPT-2 of the policy tests, dropout off so runs are comparable."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def ddp_worker(rank: int, world_size: int, port: int, batch: dict, out_dir: str) -> None:
    """Each rank scores its half of the rows through DDP and saves its gradients after backward."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(tiny_gpt2())
        rows = slice(rank * batch["input_ids"].shape[0] // world_size, (rank + 1) * batch["input_ids"].shape[0] // world_size)
        sums, _ = sequence_logps(model, batch["input_ids"][rows], batch["attention_mask"][rows], batch["loss_mask"][rows])
        sums.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.save(grads, f"{out_dir}/grads{rank}.pt")
    finally:
        dist.destroy_process_group()
