"""The model cards the training jobs write into their final model's folder, from the run's config
and its real figures (:mod:`whetstone.models.cards` renders them).

A card that cannot be written never fails a finished run: the jobs log why and report no card.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from whetstone.models.cards import CardFacts, flatten, hf_card, write_card, write_encoder_card

# Config sections that describe training (not where it runs, storage credentials or services).
CONTRASTIVE_SECTIONS = ("encoder", "optim", "loss", "negatives", "refresh", "multitask")
PREFERENCE_SECTIONS = ("policy", "loss", "reference", "lora", "optim", "data", "reward_model")


def settings(config: BaseModel, sections: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(every training setting, those that differ from the job's defaults), flattened."""
    every = flatten(config.model_dump(mode="json", include=set(sections)))
    defaults: dict[str, Any] = {}
    for name in sections:
        default = type(config).model_fields[name].default
        if isinstance(default, BaseModel):
            defaults.update(flatten({name: default.model_dump(mode="json")}))
    return every, {key: value for key, value in every.items() if key in defaults and defaults[key] != value}


def _name(uri: str) -> str:
    """A store or dataset URI as a short name: its last two path parts."""
    return "/".join(uri.rstrip("/").split("/")[-2:])


def contrastive_card(run: Any, plan: Any, base: Any, final: Any, train_metrics: dict[str, Any]) -> str | None:
    """sentence-transformers' card, with the run's facts, into the published model's folder
    (``final.embedded.model_uri``); returns its URI, or None when it could not be written."""
    config = run.config
    try:
        every, changed = settings(config, CONTRASTIVE_SECTIONS)
        loss = f"{'GIST' if config.loss.kind == 'gist' else 'InfoNCE'} (temperature {config.optim.temperature}" + \
            (", symmetric" if config.optim.symmetric else "") + \
            (f", Matryoshka dims {config.loss.matryoshka_dims}" if config.loss.matryoshka_dims else "") + ")"
        negatives = {"index": "hard negatives mined live from an index of the corpus, refreshed while training",
                     "static": "hard negatives mined once with the base model", "none": "in-batch negatives only"}
        towers = ("queries keep the base model's frozen query tower, only the document tower was trained "
                  "(a sentence-transformers Router model: `encode_query` and `encode_document` use each tower)"
                  if config.encoder.query_tower == "frozen" else "one encoder for queries and documents")
        datasets = [{"name": f"{_name(config.store_uri)} pairs/{config.train_split}", "rows": plan.train_rows,
                     "what": "(query, positive) pairs", "role": "training", "columns": ["query", "positive"]}]
        datasets += [{"name": f"{task.name} ({task.kind}): {_name(task.data)}", "what": "rows", "role": "training",
                      "rows": run.task_data[task.name].table.num_rows, "columns": ["text"]}
                     for task in config.multitask.tasks]
        metrics, before = final.embedded.metrics, base.metrics
        eval_name = f"{_name(config.store_uri)} {config.eval.split}" if config.eval.split else None
        if eval_name and metrics:
            datasets.append({"name": eval_name, "rows": int(metrics.get("queries", 0)), "what": "queries (corpus: "
                             f"{base.count:,} documents, exact search)", "role": "evaluation"})
        evaluation = [{"metric": label, "dataset": eval_name, "before": before.get(key), "after": metrics[key]}
                      for key, label in (("ndcg@10", "nDCG@10"), ("recall@100", "Recall@100")) if key in metrics]
        facts = CardFacts(
            title=f"{config.run_name}: a Whetstone contrastive fine-tune",
            summary=f"Fine-tuned by Whetstone's contrastive job (run `{config.run_name}`) with {loss} and "
                    f"{negatives[config.negatives.source]}; {towers}.",
            base_model=run.base_model, datasets=datasets, losses=[loss], steps=plan.total_steps,
            hyperparameters=_key_settings(every, ("optim.lr", "optim.batch_size", "optim.num_workers", "optim.epochs",
                                                  "optim.max_steps", "optim.warmup_ratio", "optim.weight_decay",
                                                  "optim.seed", "encoder.query_tower", "encoder.precision",
                                                  "encoder.query_max_length", "encoder.doc_max_length",
                                                  "negatives.source", "refresh.every_steps",
                                                  "optim.merge_base_weight"))
            | {"final training loss": train_metrics.get("loss")},
            evaluation=evaluation, all_hyperparameters=every, non_default_hyperparameters=changed,
            tags=[f"loss:{config.loss.kind}", *(["asymmetric"] if config.encoder.query_tower == "frozen" else [])])
        return write_encoder_card(final.embedded.model_uri, facts, config.storage, metrics=metrics,
                                  eval_name=eval_name, before=before)
    except Exception as err:  # noqa: BLE001 - a card must never fail a finished run
        print(f"[report] WARNING: no model card written ({type(err).__name__}: {err})", flush=True)
        return None


def _key_settings(every: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: every[key] for key in keys if key in every}


POLICY_USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```'''
NATIVE_REWARD_USAGE = '''```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained("{path}")  # num_labels=1
tokenizer = AutoTokenizer.from_pretrained("{path}")  # pads with config.pad_token_id
# The rows Whetstone scored: <start> prompt <sep> response <sep> ({start} / {sep} for this tokenizer).
texts = [f"{start}{{p}}{sep}{{r}}{sep}" for p, r in zip(prompts, responses)]
with torch.no_grad():
    rewards = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
```'''
CUSTOM_REWARD_USAGE = '''```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# pooling "{pooling}" is Whetstone's own: the folder's modeling_whetstone_reward.py implements it
model = AutoModelForSequenceClassification.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}")
with torch.no_grad():  # tokenize_pairs cuts long pairs as training did (prompt tail, response head)
    rewards = model(**model.tokenize_pairs(tokenizer, prompts, responses)).logits[:, 0]
```'''


def preference_card(config: Any, selection: Any, plan: Any, report: dict[str, Any]) -> str | None:
    """A plain Hugging Face card into the run's final model (``report["model_uri"]``): the policy
    (``mode=policy``) or the reward model; returns its URI, or None when it could not be written."""
    uri = report["model_uri"]
    try:
        every, changed = settings(config, PREFERENCE_SECTIONS)
        policy = config.mode in ("policy", "online")
        online = config.mode == "online"
        loss = (f"{'online ' if online else ''}{config.loss.name} (beta {config.loss.beta})" if policy else
                "Bradley-Terry" + (f" (time discount gamma {config.reward_model.gamma})"
                                   if config.reward_model.gamma else ""))
        data = _name(config.store_uri)
        datasets = [{"name": f"{data} {selection.train_name}", "rows": len(selection.train_ids),
                     "what": "preference pairs", "role": "training"}]
        if selection.eval_ids:
            datasets.append({"name": f"{data} {selection.eval_name or selection.train_name} (held out)",
                             "rows": len(selection.eval_ids), "what": "preference pairs", "role": "evaluation"})
        evaluation = [{"metric": key, "dataset": datasets[-1]["name"], "after": value}
                      for key, value in report["eval"].items() if key != "eval_pairs"]
        evaluation.append({"metric": "training loss (mean of the first / last steps)", "dataset": datasets[0]["name"],
                           "before": report["first_loss_mean"], "after": report["last_loss_mean"]})
        keys = ("optim.lr", "optim.batch_size", "optim.num_workers", "optim.epochs", "optim.max_steps",
                "optim.warmup_ratio", "optim.seed")
        keys += (("loss.beta", "reference.mode", "lora.enabled", "lora.r", "data.max_length") if policy else
                 ("reward_model.pooling", "reward_model.max_length", "reward_model.max_prompt_length"))
        base = config.policy.path if policy else config.reward_model.encoder
        facts = CardFacts(
            title=f"{config.run_name}: a Whetstone {'preference-tuned policy' if policy else 'reward model'}",
            summary=(f"A causal LM tuned on its own samples, scored by the reward model "
                     f"`{config.online.reward_model or config.online.reward_app or config.online.reward_url}`, with "
                     f"the {loss} loss by Whetstone's preference job (run `{config.run_name}`)." if online else
                     f"A causal LM tuned on preference pairs with the {loss} loss by Whetstone's preference job "
                     f"(run `{config.run_name}`)." if policy else
                     f"A reward model (prompt, response) -> scalar, trained with the {loss} loss on preference "
                     f"pairs by Whetstone's preference job (run `{config.run_name}`)."),
            base_model=base, datasets=datasets, losses=[loss], steps=plan.total_steps,
            hyperparameters=_key_settings(every, keys), evaluation=evaluation, all_hyperparameters=every,
            non_default_hyperparameters=changed, usage=_preference_usage(uri, config))
        tags = [config.loss.name, "preference-tuning"] if policy else ["reward-model", "bradley-terry"]
        text = hf_card(facts, "transformers", "text-generation" if policy else "text-classification", tags)
        return write_card(uri, text, config.storage)
    except Exception as err:  # noqa: BLE001 - a card must never fail a finished run
        print(f"[report] WARNING: no model card written ({type(err).__name__}: {err})", flush=True)
        return None


def _preference_usage(uri: str, config: Any) -> str:
    """How to load the saved policy or reward model (``uri``: where it was saved)."""
    if config.mode in ("policy", "online"):
        return POLICY_USAGE.format(path=uri)
    pooling = config.reward_model.pooling
    if pooling != "last":
        return CUSTOM_REWARD_USAGE.format(path=uri, pooling=pooling)
    start, sep = "<bos>", "<eos>"
    if "://" not in uri:  # name the tokenizer's own special tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(uri)
        start, sep = tokenizer.cls_token or tokenizer.bos_token or "", tokenizer.sep_token or tokenizer.eos_token or ""
    return NATIVE_REWARD_USAGE.format(path=uri, start=start, sep=sep)
