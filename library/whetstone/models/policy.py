"""Causal-LM policies for preference training: memory-lean sequence log-probs and pair batching.

The expensive part of DPO on small models is the output layer: with GPT-2's 50,257-word
vocabulary a batch of 16 rows x 256 tokens has 206M logits, 823 MB in float32, and a naive
``log_softmax(logits).gather(...)`` keeps several such copies alive for backward. Here the
logits are never materialised for the whole batch: the decoder's final hidden states are taken
for the label positions only (prompt and padding need no logits), and a custom autograd function
computes logits, logsumexp and the label logit chunk by chunk, recomputing each chunk in backward.
Peak extra memory is one chunk's (chunk_size, V) in float32 plus the (V, H) weight gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHUNK_SIZE = 1024


class _ChunkedLabelLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[label] per row, in chunks of rows; backward recomputes each chunk."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward then recomputes logits under the same autocast
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        rows = hidden.shape[0]
        token_logps = torch.empty(rows, dtype=torch.float32, device=hidden.device)  # (N,)
        logsumexp = torch.empty(rows, dtype=torch.float32, device=hidden.device)  # (N,)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            logits = F.linear(hidden[start:stop], weight, bias).float()  # (c, V)
            chunk_lse = torch.logsumexp(logits, dim=-1)  # (c,)
            label_logits = logits.gather(1, labels[start:stop, None]).squeeze(1)  # (c,)
            token_logps[start:stop] = label_logits - chunk_lse
            logsumexp[start:stop] = chunk_lse
        ctx.save_for_backward(hidden, weight, bias, labels, logsumexp)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, labels, logsumexp = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulate parameter gradients in float32 across chunks even for bf16 models.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        grad_out = grad_token_logps.float()  # (N,)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden.shape[0])
            chunk_hidden = hidden[start:stop]  # (c, H)
            chunk_grad = grad_out[start:stop, None]  # (c, 1)
            logits = F.linear(chunk_hidden, weight, bias).float()  # (c, V)
            # d(logit_label - lse)/d logits = onehot(label) - softmax; done in place to keep one (c, V).
            grad_logits = logits.sub_(logsumexp[start:stop, None]).exp_().mul_(-chunk_grad)  # (c, V)
            grad_logits.scatter_add_(1, labels[start:stop, None], chunk_grad)
            if need_hidden:
                grad_hidden[start:stop] = grad_logits.to(hidden.dtype) @ weight  # (c, H)
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), chunk_hidden.float())  # (V, H)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))  # (V,)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def label_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probability of each row's label under a linear output layer, computed in row chunks.

    Equal to ``log_softmax(hidden @ weight.T + bias, -1).gather(1, labels[:, None])`` but the
    (N, V) logits never exist at once, in forward or backward.

    Args:
        hidden: final hidden states of the positions that predict a label, shape (N, H).
        weight: output embedding matrix, shape (V, H).
        labels: the token each row predicts, shape (N,), int64 in [0, V).
        bias: output bias, shape (V,), or None.
        chunk_size: rows per chunk; peak extra memory is about 2 * chunk_size * V * 4 bytes.

    Returns:
        Float32 log-probs, shape (N,).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and labels (N,); got {tuple(hidden.shape)}, {tuple(labels.shape)}")
    return _ChunkedLabelLogProbs.apply(hidden, weight, bias, labels.long(), chunk_size)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a DistributedDataParallel wrapper (as Ray Train's prepare_model makes)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _accepts_logits_to_keep(core: nn.Module) -> bool:
    target = core.get_base_model() if hasattr(core, "get_base_model") else core  # peft wraps the LM
    return "logits_to_keep" in inspect.signature(target.forward).parameters


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run a transformers causal LM and return its decoder's last hidden states (after the final norm).

    The call goes through ``model`` itself, not its decoder submodule, so a DDP wrapper still sees
    the forward and synchronises gradients; a forward hook on the decoder captures the hidden
    states, and ``logits_to_keep=1`` (where the model supports it) keeps the LM head to one
    position, since the label log-probs are computed in chunks afterwards.

    Args:
        model: a ``*ForCausalLM``, optionally wrapped by peft and/or DistributedDataParallel.
        input_ids: token ids, shape (B, L).
        attention_mask: 1 for real tokens, 0 for padding, shape (B, L); left or right padding.

    Returns:
        Hidden states, shape (B, L, H).
    """
    core = unwrap_model(model)
    config = getattr(core, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1.0):
            raise NotImplementedError(
                f"{type(core).__name__} sets config.{attr}={value}; chunked log-probs apply the plain "
                "linear LM head only, so they would be wrong for this model"
            )
    captured: dict[str, torch.Tensor] = {}

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    # Positions follow the real tokens, so left padding gives the same numbers as right padding.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False
    }  # fmt: skip
    if _accepts_logits_to_keep(core):
        kwargs["logits_to_keep"] = 1
    handle = core.get_decoder().register_forward_hook(capture)
    try:
        model(**kwargs)
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"{type(core).__name__}: the decoder returned by get_decoder() did not run")
    return captured["hidden"]


def _masked_token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
    chunk_size: int, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the loss-masked tokens: ``(token_logps (N,), rows (N,), positions (N,))``, where
    ``positions`` indexes the (B, L-1) grid (position t predicts token t + 1)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and loss_mask must all be (B, L); got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(loss_mask.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden = final_hidden_states(model, input_ids, attention_mask)  # (B, L, H)
    label_mask = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()  # (B, L-1)
    rows, positions = label_mask.nonzero(as_tuple=True)  # (N,), (N,)
    head = unwrap_model(model).get_output_embeddings()
    bias = getattr(head, "bias", None)
    # log_softmax(logits / T): scaling the hidden states (and the bias) by 1/T scales the logits
    selected = hidden[rows, positions]  # (N, H): position t predicts token t + 1
    if temperature != 1.0:
        selected, bias = selected / temperature, (None if bias is None else bias / temperature)
    token_logps = label_logps(selected, head.weight, input_ids[rows, positions + 1], bias, chunk_size)  # (N,)
    return token_logps, rows, positions


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the loss-masked tokens of each row, without full-vocabulary logits.

    Token t is scored by the hidden state at t - 1, so a mask on position 0 is ignored (nothing
    precedes it). Only positions whose next token is in ``loss_mask`` (and not padding) reach the
    output layer, which is where the saving over scoring every position comes from.

    Args:
        model: a transformers causal LM (plain linear LM head; tied or not), optionally wrapped by
            peft and/or DistributedDataParallel.
        input_ids: token ids, shape (B, L).
        attention_mask: 1 for real tokens, shape (B, L).
        loss_mask: 1 for tokens whose log-prob counts (completion tokens), shape (B, L).
        chunk_size: output-layer rows per chunk (see :func:`label_logps`).

    Returns:
        (sum_logps, token_counts): float32 (B,) with gradient, and int64 (B,) counts.
    """
    token_logps, rows, _ = _masked_token_logps(model, input_ids, attention_mask, loss_mask, chunk_size)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sum_logps = sums.index_add(0, rows, token_logps)  # (B,)
    counts = torch.bincount(rows, minlength=input_ids.shape[0])  # (B,)
    return sum_logps, counts


def token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the loss-masked tokens on the (B, L-1) grid that GRPO needs.

    Same computation as :func:`sequence_logps` (only masked positions reach the output layer),
    kept per token. ``temperature``: log_softmax(logits / T), the distribution a sampler at
    temperature T drew from.

    Returns:
        (logps, mask): float32 (B, L-1) with gradient, 0 off the mask; bool (B, L-1), True where
        position t's next token (t + 1) is a masked, non-pad token.
    """
    values, rows, positions = _masked_token_logps(model, input_ids, attention_mask, loss_mask, chunk_size,
                                                  temperature)
    grid = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float32, device=input_ids.device)
    mask = torch.zeros_like(grid, dtype=torch.bool)
    mask[rows, positions] = True
    return grid.index_put((rows, positions), values), mask


@dataclass
class PreferenceBatch:
    """Chosen and rejected sequences stacked for one forward pass.

    Rows 0..B-1 are prompt + chosen completion, rows B..2B-1 prompt + rejected completion, in the
    same pair order, right-padded.

    Attributes:
        input_ids: (2B, L) int64.
        attention_mask: (2B, L) int64, 1 for real tokens.
        loss_mask: (2B, L) int64, 1 for completion tokens (prompt and padding are 0).
        prompt_lengths: (2B,) int64, prompt tokens per row after truncation.
        truncated: (2B,) bool, True where the prompt or the completion was cut.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    truncated: torch.Tensor

    @property
    def num_pairs(self) -> int:
        """B, the number of preference pairs."""
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PreferenceBatch:
        """Move every tensor to ``device``."""
        return PreferenceBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a per-row tensor (2B, ...) into its chosen (B, ...) and rejected (B, ...) halves."""
        chosen, rejected = values.chunk(2, dim=0)
        return chosen, rejected


def preference_logps(
    model: nn.Module, batch: PreferenceBatch, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> dict[str, torch.Tensor]:
    """One forward pass over a :class:`PreferenceBatch`; log-probs and counts split by side.

    Returns:
        ``chosen_logps``, ``rejected_logps`` (B,) float32; ``chosen_token_counts``,
        ``rejected_token_counts`` (B,) int64.
    """
    sum_logps, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size)
    chosen_logps, rejected_logps = PreferenceBatch.split(sum_logps)
    chosen_counts, rejected_counts = PreferenceBatch.split(counts)
    return {
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "chosen_token_counts": chosen_counts,
        "rejected_token_counts": rejected_counts,
    }



Prompt = str | Sequence[dict[str, Any]]


def _render_chat(tokenizer: Any, prompt: Prompt, completions: Sequence[str], row: int) -> tuple[str, list[str]]:
    """Render prompt and assistant completions through the tokenizer's chat template, as text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"chat_template=True but tokenizer {tokenizer.name_or_path!r} has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    completion_texts = []
    for completion in completions:
        full_text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": completion}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"row {row}: the chat template does not render prompt + assistant turn as an extension of "
                "the prompt with the generation prompt, so the completion cannot be isolated"
            )
        completion_texts.append(full_text[len(prompt_text) :])
    return prompt_text, completion_texts


def _end_with_eos(ids: list[int], eos_id: int, templated: bool) -> list[int]:
    """Make EOS the last token of a completion.

    A chat template closes the assistant turn with EOS and may add text after it (a newline);
    that tail is cut. Plain text gets EOS appended unless it already ends with one.
    """
    if templated and eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eos_id)
        return ids[: last + 1]
    return ids if ids and ids[-1] == eos_id else [*ids, eos_id]


def truncate_prompt(ids: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    """Keep the END of a prompt longer than ``max_prompt_length`` tokens (the turns nearest the
    response), with its leading BOS when it has one, as the offline batches cut prompts."""
    if len(ids) <= max_prompt_length:
        return list(ids)
    if bos_id is not None and ids[0] == bos_id and max_prompt_length > 1:
        return [bos_id, *ids[len(ids) - (max_prompt_length - 1):]]
    return list(ids[len(ids) - max_prompt_length:])


def _truncate(
    prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int, bos_id: int | None
) -> tuple[list[int], list[list[int]], bool]:
    """Apply the truncation rules (see build_preference_batch); returns (prompt, completions, cut)."""
    cut = False
    if len(prompt) + max(len(c) for c in completions) > max_length and len(prompt) > max_prompt_length:
        prompt = truncate_prompt(prompt, max_prompt_length, bos_id)  # its end, with a leading BOS
        cut = True
    budget = max_length - len(prompt)
    if any(len(c) > budget for c in completions):
        completions = [c[:budget] for c in completions]
        cut = True
    return prompt, completions, cut


def build_preference_batch(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    chosen: Sequence[str],
    rejected: Sequence[str],
    max_length: int,
    max_prompt_length: int,
    chat_template: bool = False,
    pad_to_multiple_of: int | None = None,
) -> PreferenceBatch:
    """Tokenise preference pairs into one (2B, L) batch: chosen rows first, then rejected rows.

    Prompt and completion are tokenised separately, so the prompt tokens are identical in both
    rows of a pair and the loss mask covers exactly the completion. Every completion ends with the
    tokenizer's EOS (appended if missing; with a chat template, anything after the template's
    final EOS, such as a trailing newline, is dropped).

    Truncation rules, applied per pair so both rows keep the same prompt:

    1. If prompt + the longer completion exceeds ``max_length`` and the prompt is longer than
       ``max_prompt_length``, the prompt is cut from the LEFT to ``max_prompt_length`` tokens
       (the latest turns stay; a leading BOS is kept).
    2. If a completion still does not fit, it is cut from the RIGHT to
       ``max_length - prompt tokens``; it then loses its EOS, truthfully, since it did not end
       there. Every completion keeps at least one token because max_prompt_length < max_length.

    Args:
        tokenizer: a transformers tokenizer with an EOS token.
        prompts: B prompts: text, or (with ``chat_template``) text or a list of chat messages.
        chosen: B preferred completions (text).
        rejected: B dispreferred completions (text).
        max_length: maximum tokens per row.
        max_prompt_length: prompt cap used by rule 1; 1 <= max_prompt_length < max_length.
        chat_template: render through ``tokenizer.apply_chat_template`` (a string prompt becomes a
            single user message, completions assistant messages).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        A :class:`PreferenceBatch` of 2B rows.
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError(
            f"prompts, chosen and rejected must be non-empty and equally long; got "
            f"{len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; completions must end with one")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    if chat_template:
        rendered = [
            _render_chat(tokenizer, p, [c, r], i)
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
        ]
        prompt_texts = [prompt_text for prompt_text, _ in rendered]
        chosen_texts = [texts[0] for _, texts in rendered]
        rejected_texts = [texts[1] for _, texts in rendered]
        add_special = False  # the template already places BOS and turn markers
    else:
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"row {i}: prompt must be text when chat_template=False, got {type(prompt).__name__}")
        prompt_texts, chosen_texts, rejected_texts = list(prompts), list(chosen), list(rejected)
        add_special = True
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=add_special)["input_ids"]
    chosen_ids = tokenizer(chosen_texts, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejected_texts, add_special_tokens=False)["input_ids"]

    sequences: list[tuple[list[int], list[int], bool]] = [([], [], False)] * (2 * len(prompts))
    for i in range(len(prompts)):
        completions = [_end_with_eos(ids[i], eos_id, chat_template) for ids in (chosen_ids, rejected_ids)]
        prompt, completions, cut = _truncate(
            prompt_ids[i], completions, max_length, max_prompt_length, tokenizer.bos_token_id
        )
        sequences[i] = (prompt, completions[0], cut)
        sequences[len(prompts) + i] = (prompt, completions[1], cut)
    return _pad(sequences, pad_id, pad_to_multiple_of)


def _pad(
    sequences: list[tuple[list[int], list[int], bool]], pad_id: int, pad_to_multiple_of: int | None
) -> PreferenceBatch:
    """Right-pad (prompt, completion, truncated) rows into a PreferenceBatch."""
    length = max(len(p) + len(c) for p, c, _ in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    rows = len(sequences)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)  # (2B, L)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)  # (2B, L)
    loss_mask = torch.zeros((rows, length), dtype=torch.long)  # (2B, L)
    for row, (prompt, completion, _) in enumerate(sequences):
        total = len(prompt) + len(completion)
        input_ids[row, :total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :total] = 1
        loss_mask[row, len(prompt) : total] = 1
    return PreferenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        prompt_lengths=torch.tensor([len(p) for p, _, _ in sequences], dtype=torch.long),
        truncated=torch.tensor([cut for _, _, cut in sequences], dtype=torch.bool),
    )
