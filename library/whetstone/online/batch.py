"""The sampled sequences of one online step as a padded batch, for the trainer's forward passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SampleBatch:
    """A step's P*k sampled sequences, right-padded: prompt + completion, row p*k + j = sample j of prompt p."""

    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    loss_mask: torch.Tensor  # (N, L) int64: the completion's tokens
    sample_logps: torch.Tensor  # (N, L-1) float32: the generating weights' log-probs, 0 off the mask
    lengths: torch.Tensor  # (N,) int64: completion tokens

    def to(self, device: torch.device) -> SampleBatch:
        return SampleBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))

    def rows(self, index: torch.Tensor) -> SampleBatch:
        return SampleBatch(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


def sample_batch(samples: Any, pad_id: int) -> SampleBatch:
    """Right-pad the actors' :class:`~whetstone.online.generation.Samples` into one batch (no
    re-tokenisation: the trainer scores exactly the token ids that were sampled)."""
    rows = [(prompt, ids, logps) for prompt, per_prompt, per_logps in
            zip(samples.prompt_ids, samples.completion_ids, samples.logps, strict=True)
            for ids, logps in zip(per_prompt, per_logps, strict=True)]
    width = max(len(prompt) + max(len(ids), 1) for prompt, ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    sample_logps = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for row, (prompt, ids, logps) in enumerate(rows):
        start, stop = len(prompt), len(prompt) + len(ids)
        input_ids[row, :stop] = torch.tensor(prompt + ids, dtype=torch.long)
        attention_mask[row, :stop] = 1
        loss_mask[row, start:stop] = 1
        sample_logps[row, start - 1: stop - 1] = torch.tensor(logps, dtype=torch.float32)  # t-1 predicts t
    lengths = torch.tensor([len(ids) for _, ids, _ in rows], dtype=torch.long)
    return SampleBatch(input_ids, attention_mask, loss_mask, sample_logps, lengths)


def sequence_kl(sample_logps: torch.Tensor, reference_logps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two estimates of KL(policy || reference) per sampled sequence, from the sampling weights'
    per-token log-probs and the reference's, both (N, L-1) with ``mask`` (N, L-1):

    * k3 (the one reported as ``kl_to_reference``): sum over the tokens of
      exp(r) - r - 1 with r = log pi_ref - log pi; unbiased for each token's KL given its prefix,
      so the sum is unbiased for the sequence's KL, never negative, and of far lower variance than
      the log-ratio (Schulman's k3; GRPO's penalty uses it per token);
    * k1: the summed log-ratio log pi - log pi_ref; unbiased too, but one sample per prompt can
      give a negative figure.

    Returns:
        (k3 (N,), k1 (N,)) float32.
    """
    log_ratio = (reference_logps - sample_logps) * mask  # (N, L-1), 0 off the mask
    k3 = ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum(-1)
    return k3, -log_ratio.sum(-1)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (GPT-2); id 0 is a real id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
