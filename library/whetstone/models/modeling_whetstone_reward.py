"""A Whetstone reward model as a ``transformers`` sequence-classification model (``num_labels=1``).

Whetstone copies this file into each reward model it saves with a pooling that no transformers
class computes (``"response"``: the mean of the response segment's last hidden states; ``"mean"``:
of every token's), and names its classes in ``config.json``'s ``auto_map``, so that::

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = model.tokenize_pairs(tokenizer, prompts, responses)  # Whetstone's exact input rows
    rewards = model(**tokens).logits[:, 0]

scores (prompt, response) pairs as Whetstone's ``RewardModel`` does. For a BERT-like tokenizer
``tokenizer(prompts, responses, padding=True, return_tensors="pt")`` builds the same rows as long
as no pair needs truncating (``tokenize_pairs`` cuts a long pair as training did: the prompt keeps
its end, the response its start).

This module imports only torch and transformers: it runs wherever the saved folder is loaded.
Whetstone's ``RewardModel`` uses the same functions, so both score alike by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("mean", "response")


def build_pair_inputs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int,
                      max_prompt_length: int) -> dict[str, torch.Tensor]:
    """Cross-encode pairs as ``[start] prompt-tail [sep] response-head [sep]``, right-padded.

    ``start`` is the tokenizer's CLS (else BOS) token, ``sep`` its SEP (else EOS) token; token type
    0 marks the start, the prompt and the first separator, 1 the response and the last separator.
    A pair longer than ``max_length`` keeps the prompt's END (at most ``max_prompt_length`` tokens
    when the response needs the room) and the response's START.

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids``, each (N, L) int64.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    start, sep = ([first] if first is not None else []), ([last] if last is not None else [])
    budget = max_length - len(start) - 2 * len(sep)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    rows, types = [], []
    for prompt, response in zip(prompt_ids, response_ids, strict=True):
        response = response[: budget - min(len(prompt), max_prompt_length)]
        prompt = prompt[len(prompt) - min(len(prompt), budget - len(response)):]  # the tail
        head = start + prompt + sep
        rows.append(head + response + sep)
        types.append([0] * len(head) + [1] * (len(response) + len(sep)))
    length = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (N, L)
    token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (N, L)
    for i, (row, kind) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        token_type_ids[i, : len(row)] = torch.tensor(kind)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def encoder_kwargs(encoder_config, token_type_ids: torch.Tensor | None) -> dict:
    """Token types go to the encoder only when it embeds more than one type (BERT: 2, MiniLM: 2)."""
    if token_type_ids is not None and getattr(encoder_config, "type_vocab_size", 0) > 1:
        return {"token_type_ids": token_type_ids}
    return {}


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                pooling: str) -> torch.Tensor:
    """(N, L, H) last hidden states -> (N, H): the mean over the response segment (token type 1
    under the attention mask) for ``"response"``, over every real token for ``"mean"``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not one of {POOLINGS}")
    mask = attention_mask
    if pooling == "response":
        if token_type_ids is None:
            raise ValueError("pooling='response' needs token_type_ids (1 on the response) to find the response")
        mask = attention_mask * (token_type_ids == 1)  # (N, L): the response and its closing separator
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class WhetstoneRewardConfig(PretrainedConfig):
    """The encoder's own config (``encoder``, a dict with its ``model_type``) and Whetstone's
    settings (``whetstone_reward``: how pairs are pooled and cut: ``pooling``, ``max_length``,
    ``max_prompt_length``; kept apart from transformers' generation parameters of the same names)."""

    model_type = "whetstone_reward"

    def __init__(self, encoder: dict | None = None, whetstone_reward: dict | None = None, **kwargs):
        kwargs.setdefault("num_labels", 1)
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.whetstone_reward = {"pooling": "response", "max_length": 256, "max_prompt_length": 160,
                                 **(whetstone_reward or {})}

    def encoder_config(self) -> PretrainedConfig:
        settings = dict(self.encoder)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class WhetstoneRewardModel(PreTrainedModel):
    """Encoder -> pooling (:func:`pool_hidden`) -> ``score`` (a linear layer with bias) -> one logit."""

    config_class = WhetstoneRewardConfig
    base_model_prefix = "encoder"

    def __init__(self, config: WhetstoneRewardConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config())
        self.score = nn.Linear(self.encoder.config.hidden_size, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "score", None):  # the encoder initialises its own modules
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def tokenize_pairs(self, tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """The rows Whetstone trained on (see :func:`build_pair_inputs`), on the model's device."""
        settings = self.config.whetstone_reward
        tokens = build_pair_inputs(tokenizer, prompts, responses, settings["max_length"], settings["max_prompt_length"])
        return {name: value.to(self.device) for name, value in tokens.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        """(N, L) token ids -> ``logits`` (N, 1): the reward of each row. Other keyword arguments
        (``labels``, ``use_cache``, ...) are accepted and ignored: the reward needs no loss here."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **encoder_kwargs(self.encoder.config, token_type_ids)).last_hidden_state
        pooled = pool_hidden(hidden, attention_mask, token_type_ids, self.config.whetstone_reward["pooling"])  # (N, H)
        return SequenceClassifierOutput(logits=self.score(pooled))  # (N, 1)
