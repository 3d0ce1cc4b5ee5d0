"""Reward model: a text encoder with a scalar head, trained with the Bradley–Terry loss.

The encoder reads prompt and response as one cross-encoded sequence
``[CLS] prompt-tail [SEP] response-head [SEP]`` (token types 0 / 1), pools its last hidden states
and maps them to one number. Poolings: ``"response"`` (default) mean-pools the response segment
(the prompt is the same on both sides of a pair: its tokens shape the response's context instead
of diluting the average), ``"mean"`` averages every token, ``"last"`` takes the last token that
is not padding (the decoder convention of transformers' ``*ForSequenceClassification``: GPT-2,
Llama, Qwen2, ...). Long hh-rlhf dialogues are cut where it hurts least: the prompt keeps its END
(the turn being answered), the response its START. all-MiniLM-L6-v2 (22M parameters) trains on
CPU in minutes; any BERT-like ``AutoModel`` works (and, for ``"last"``, a decoder LM).

Saved layout (a folder, local or ``s3://`` through :mod:`whetstone.storage`): a ``transformers``
sequence-classification model with ``num_labels=1``, plus the tokenizer, so that
``AutoModelForSequenceClassification.from_pretrained(path)`` gives the same scores:

* ``pooling="last"``: the backbone's own class (``GPT2ForSequenceClassification``, ...) with the
  head as its ``score`` layer (no bias) and ``config.pad_token_id`` set (the tokenizer pads with
  it; a tokenizer without a pad token pads with EOS): plain ``from_pretrained(path)`` loads it;
* ``"response"`` / ``"mean"``: no transformers class pools that way, so the folder carries
  ``modeling_whetstone_reward.py`` (:mod:`whetstone.models.modeling_whetstone_reward`) and
  ``config.json`` names it in ``auto_map``: ``from_pretrained(path, trust_remote_code=True)``.

``config.json`` keeps Whetstone's settings (pooling, lengths) under ``whetstone_reward`` in both
layouts. Folders saved before this layout (``reward_head.pt`` + ``reward_config.json``) still load.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from whetstone.config.base import StorageConfig
from whetstone.models import modeling_whetstone_reward as hf_reward

HEAD_FILE = "reward_head.pt"  # the layout before the transformers one
CONFIG_FILE = "reward_config.json"
POOLINGS = ("mean", "response", "last")
SETTINGS_KEY = "whetstone_reward"  # config.json: Whetstone's settings of a model in a native layout
MODELING_FILE = "modeling_whetstone_reward.py"
AUTO_MAP = {"AutoConfig": "modeling_whetstone_reward.WhetstoneRewardConfig",
            "AutoModelForSequenceClassification": "modeling_whetstone_reward.WhetstoneRewardModel"}


class RewardModel(nn.Module):
    """Encoder + pooling + linear head: (prompt, response) -> scalar reward.

    Args:
        transformer: a transformers backbone (``AutoModel``) with ``config.hidden_size`` H.
        tokenizer: its tokenizer (``pooling="last"`` gives one without a pad token EOS as pad).
        max_length: tokens per (prompt, response) sequence, special tokens included.
        max_prompt_length: prompt tokens kept when the response needs the room.
        pooling: ``"response"``: the mean over the response segment only (measured on hh-rlhf with
            MiniLM: 0.646 / 0.662 / 0.653 test accuracy per epoch against 0.620 / 0.610 / 0.627 for
            ``"mean"`` over every token), ``"mean"``, or ``"last"``: the last non-pad token, as
            decoder ``*ForSequenceClassification`` models score (its head has no bias, as theirs).
    """

    def __init__(self, transformer: nn.Module, tokenizer, max_length: int = 256, max_prompt_length: int = 160,
                 pooling: str = "response"):
        super().__init__()
        if not 1 <= max_prompt_length < max_length - 3:
            raise ValueError(f"need 1 <= max_prompt_length < max_length - 3, got {max_prompt_length}, {max_length}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: {pooling!r} is not one of {POOLINGS}")
        self.pooling = pooling
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        if pooling == "last":
            _native_classifier(transformer)  # fails early for a backbone without a last-token classifier
            if tokenizer.pad_token_id is None:
                if tokenizer.eos_token is None:
                    raise ValueError("pooling='last': the tokenizer has neither a pad nor an EOS token")
                tokenizer.pad_token = tokenizer.eos_token  # as TRL's RewardTrainer pads
        self.head = nn.Linear(transformer.config.hidden_size, 1, bias=pooling != "last")
        # Start near zero so the untrained scores carry no preference of their own.
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        for name, param in transformer.named_parameters():
            if name.startswith("pooler."):
                param.requires_grad_(False)  # mean pooling never uses BERT's pooler; DDP must not wait for it

    @classmethod
    def from_encoder(cls, path: str | Path, max_length: int = 256, max_prompt_length: int = 160,
                     storage: StorageConfig | None = None, pooling: str = "response") -> RewardModel:
        """A fresh head on a pretrained encoder (path, storage URI or the MiniLM alias)."""
        from transformers import AutoModel, AutoTokenizer

        folder = _local_folder(path, storage)
        return cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), max_length,
                   max_prompt_length, pooling)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cross-encode pairs, right-padded (:func:`~whetstone.models.modeling_whetstone_reward
        .build_pair_inputs`, which the saved model's ``tokenize_pairs`` runs too).

        Returns:
            ``input_ids``, ``attention_mask``, ``token_type_ids``, each (N, L) int64.
        """
        return hf_reward.build_pair_inputs(self.tokenizer, prompts, responses, self.max_length,
                                           self.max_prompt_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of tokenised pairs: (N, L) ids -> (N,) float rewards."""
        kwargs = hf_reward.encoder_kwargs(self.transformer.config, token_type_ids)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "last":
            # transformers' rule: the rightmost token that is not the pad token (left or right padding)
            positions = torch.arange(input_ids.shape[-1], device=hidden.device, dtype=torch.int32)
            last = (positions * (input_ids != self.tokenizer.pad_token_id).to(hidden.device, torch.int32)).argmax(-1)
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]  # (N, H)
        else:
            pooled = hf_reward.pool_hidden(hidden, attention_mask, token_type_ids, self.pooling)  # (N, H)
        return self.head(pooled).squeeze(-1)  # (N,)

    def score_pairs(self, prompts: Sequence[str], chosen: Sequence[str],
                    rejected: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over chosen and rejected rows (2B, L); returns (chosen (B,), rejected (B,)) scores."""
        tokens = self.tokenize(list(prompts) * 2, list(chosen) + list(rejected))
        scores = self(**{k: v.to(self.device) for k, v in tokens.items()})  # (2B,)
        return scores[: len(prompts)], scores[len(prompts):]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Reward of each (prompt, response): (N,) float32, in input order."""
        was_training = self.training
        self.eval()
        out = np.empty(len(prompts), dtype=np.float32)
        order = np.argsort([-(len(p) + len(r)) for p, r in zip(prompts, responses, strict=True)], kind="stable")
        for begin in range(0, len(order), batch_size):
            idx = order[begin : begin + batch_size]
            tokens = self.tokenize([prompts[i] for i in idx], [responses[i] for i in idx])
            out[idx] = self(**{k: v.to(self.device) for k, v in tokens.items()}).float().cpu().numpy()
        self.train(was_training)
        return out

    def settings(self) -> dict:
        return {"pooling": self.pooling, "max_length": self.max_length, "max_prompt_length": self.max_prompt_length}

    def to_transformers(self) -> nn.Module:
        """This model as a transformers sequence-classification model that shares its weights:
        the backbone's own ``*ForSequenceClassification`` for ``pooling="last"``, else a
        :class:`~whetstone.models.modeling_whetstone_reward.WhetstoneRewardModel`."""
        if self.pooling == "last":
            model = _native_classifier(self.transformer)
            model.config.pad_token_id = self.tokenizer.pad_token_id
            setattr(model.config, SETTINGS_KEY, self.settings())
            setattr(model, model.base_model_prefix, self.transformer)
        else:
            encoder = {k: v for k, v in self.transformer.config.to_dict().items() if k != "_name_or_path"}
            config = hf_reward.WhetstoneRewardConfig(encoder=encoder, auto_map=AUTO_MAP,
                                                     pad_token_id=self.tokenizer.pad_token_id,
                                                     **{SETTINGS_KEY: self.settings()})
            with torch.device("meta"):  # no weights allocated: the real modules go in below
                model = hf_reward.WhetstoneRewardModel(config)
            model.encoder = self.transformer
        model.score = self.head
        return model

    def save(self, path: str | Path) -> Path:
        """Write the folder layout described in the module docstring (local path)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.to_transformers().save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.pooling != "last":
            shutil.copyfile(hf_reward.__file__, path / MODELING_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path, storage: StorageConfig | None = None, device: str = "cpu") -> RewardModel:
        """Load a saved reward model (local folder or storage URI), either layout."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(_local_folder(path, storage))
        if (folder / HEAD_FILE).is_file() and (folder / CONFIG_FILE).is_file():
            return _load_head_layout(cls, folder).to(device)
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("model_type") == hf_reward.WhetstoneRewardConfig.model_type:
            # Whetstone's own copy of the classes: the folder's code is never run here.
            classifier = hf_reward.WhetstoneRewardModel.from_pretrained(folder)
            backbone = classifier.encoder
        elif SETTINGS_KEY in config:
            classifier = AutoModelForSequenceClassification.from_pretrained(folder)
            backbone = getattr(classifier, classifier.base_model_prefix)
        else:
            raise FileNotFoundError(f"{path} is not a saved reward model (no {SETTINGS_KEY} settings or "
                                    f"{hf_reward.WhetstoneRewardConfig.model_type} config in config.json)")
        # trust_remote_code=False: the config's auto_map (for other tools) would make transformers ask
        # on stdin whether to run the folder's code; the tokenizer is a plain one
        settings, tokenizer = config[SETTINGS_KEY], AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = cls(backbone, tokenizer, settings["max_length"], settings["max_prompt_length"], settings["pooling"])
        model.head = classifier.score
        return model.to(device)


def _native_classifier(transformer: nn.Module) -> nn.Module:
    """The backbone's own ``AutoModelForSequenceClassification`` (num_labels=1), built on the meta
    device: checked to be a backbone plus a bias-free ``score`` layer (the decoder classifiers,
    which score the last non-pad token) and nothing else.

    Raises:
        ValueError: the backbone has no such class (an encoder such as BERT pools differently).
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(transformer.config)
    config.num_labels = 1
    hint = (f"pooling='last' needs a backbone whose AutoModelForSequenceClassification scores the last token "
            f"with a `score` layer (decoder LMs: GPT-2, Llama, Qwen2, ...); {type(transformer).__name__}")
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise ValueError(f"{hint} has no sequence-classification class ({err})") from None
    score = getattr(model, "score", None)
    children = {name for name, _ in model.named_children()}
    if not (isinstance(score, nn.Linear) and score.bias is None and children == {"score", model.base_model_prefix}):
        raise ValueError(f"{hint}'s is {type(model).__name__} with parts {sorted(children)}")
    return model


def _load_head_layout(cls: type[RewardModel], folder: Path) -> RewardModel:
    """A folder saved before the transformers layout: the encoder's files, ``reward_head.pt`` and
    ``reward_config.json``."""
    from transformers import AutoModel, AutoTokenizer

    settings = json.loads((folder / CONFIG_FILE).read_text())
    model = cls(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                settings["max_length"], settings["max_prompt_length"], settings.get("pooling", "mean"))
    model.head.load_state_dict(torch.load(folder / HEAD_FILE, map_location="cpu", weights_only=True))
    return model


def _local_folder(path: str | Path, storage: StorageConfig | None) -> str:
    from whetstone.models.assets import resolve_model_path

    path = resolve_model_path(str(path))
    if "://" in path:
        from whetstone import storage as store

        path = str(store.download_dir(path, tempfile.mkdtemp(prefix="whetstone-reward-"), storage))
    return path


def pairwise_accuracy(model: RewardModel, prompts: Sequence[str], chosen: Sequence[str],
                      rejected: Sequence[str], batch_size: int = 32) -> float:
    """Share of pairs whose chosen response scores strictly higher than the rejected one."""
    chosen_scores = model.score(prompts, chosen, batch_size)
    rejected_scores = model.score(prompts, rejected, batch_size)
    return float(np.mean(chosen_scores > rejected_scores))


def fit_reward_model(
    model: RewardModel,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 3e-5,
    head_lr: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train in this process with the Bradley–Terry loss (AdamW, linear decay); the job's
    ``mode: reward_model`` runs the same step under Ray Train.

    The head gets a larger learning rate than the encoder: it starts from scratch.

    ``on_epoch_end(epoch)`` (1-based) runs after each full epoch, e.g. to evaluate.

    Returns:
        Per-step history dicts: step, loss, reward_accuracy, margin.
    """
    from whetstone.losses.bradley_terry import BradleyTerryLoss

    rng = np.random.default_rng(seed)
    loss_fn = BradleyTerryLoss()
    optimizer = reward_optimizer(model, lr, head_lr)
    steps_per_epoch = len(prompts) // batch_size
    total = min(steps_per_epoch * epochs, max_steps or 10**12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / max(total, 1)))
    history: list[dict] = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(prompts))
        for begin in range(0, steps_per_epoch * batch_size, batch_size):
            if len(history) >= total:
                return history
            idx = order[begin : begin + batch_size]
            chosen_scores, rejected_scores = model.score_pairs(
                [prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx])
            out = loss_fn(chosen_scores, rejected_scores)
            loss = out.reduce()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            record = {"step": len(history) + 1, "loss": float(loss.detach()), "reward_accuracy": float(out.accuracies.mean()),
                      "margin": float(out.margins.mean())}
            history.append(record)
            if on_step is not None:
                on_step(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
            model.train()
    return history


def reward_optimizer(model: nn.Module, lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW with the head (parameters named ``head.*``) at its own learning rate."""
    head, body = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (head if name.split(".")[-2:-1] == ["head"] or name.startswith("head.") else body).append(param)
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.01)
