"""Model cards: the ``README.md`` a saved model carries, saying what it is and how it was trained.

A training job builds :class:`CardFacts` from its config and results (base model, data and row
counts, losses, hyperparameters, steps, evaluation figures) and writes the card into the model's
folder when the run finishes:

* an encoder (sentence-transformers layout) gets sentence-transformers' own card
  (``SentenceTransformerModelCardData`` rendered by its template: metadata, architecture, usage,
  evaluation, hyperparameters, training logs) with Whetstone's facts filled in, plus a section
  of those facts in plain words;
* a policy or a reward model (transformers layout) gets a plain Hugging Face card: YAML front
  matter (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``, ``license`` when known),
  then the facts, the evaluation and how to load it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whetstone import storage as store
from whetstone.config.base import StorageConfig

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# Models Whetstone knows by alias: (the aliases, the Hub id, its license).
KNOWN_MODELS = [
    ({"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"},
     "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    ({"smollm2-135m-instruct", "smollm2"}, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
]


@dataclass
class CardFacts:
    """What a card says about how its model was trained.

    Attributes:
        title: the card's heading.
        summary: one paragraph: what the model is and what it was trained for.
        base_model: the model training started from, as the job named it (alias, path, URI, Hub id).
        datasets: each ``{"name": ..., "rows": int, "role": "training" | "evaluation", "what": ...}``.
        losses: each loss in words (e.g. ``"InfoNCE (temperature 0.05)"``).
        hyperparameters: the key settings, ``name -> value``.
        steps: optimiser steps trained.
        evaluation: each ``{"metric": ..., "dataset": ..., "before": float | None, "after": float}``.
        all_hyperparameters: every training setting (flattened config), for the details.
        non_default_hyperparameters: those that differ from the job's defaults.
        tags: extra Hub tags.
        usage: a Markdown block on how to load and use the model (plain cards).
    """

    title: str
    summary: str
    base_model: str
    datasets: list[dict[str, Any]] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    all_hyperparameters: dict[str, Any] = field(default_factory=dict)
    non_default_hyperparameters: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    usage: str = ""


def known_model(name: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of a base model named by alias, Hub id or the folder an alias resolves to;
    (None, None) for a model Whetstone cannot name on the Hub (a local path, a storage URI)."""
    from whetstone.models.assets import resolve_model_path

    lowered = name.lower()
    for aliases, hub_id, license_id in KNOWN_MODELS:
        if lowered in aliases | {hub_id.lower()}:
            return hub_id, license_id
        try:
            if Path(name).resolve() == Path(resolve_model_path(next(iter(aliases)))).resolve():
                return hub_id, license_id
        except (RuntimeError, OSError):  # the alias' package is not installed
            continue
    parts = name.split("/")
    if "://" not in name and len(parts) == 2 and all(parts) and not Path(name).exists() and name[0] not in "./~":
        return name, None  # looks like a Hub id
    return None, None


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-5}}`` -> ``{"optim.lr": 1e-5}``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def facts_markdown(facts: CardFacts, heading: str = "## Training with Whetstone") -> str:
    """The facts as Markdown: a table of the run, then the evaluation table."""
    rows = [("Base model", f"`{facts.base_model}`")]
    rows += [(f"{d.get('role', 'training').capitalize()} data",
              f"`{d['name']}`: {d['rows']:,} {d.get('what', 'rows')}") for d in facts.datasets]
    rows += [("Loss", loss) for loss in facts.losses]
    rows.append(("Steps", f"{facts.steps:,}"))
    rows += [(f"`{name}`", f"`{value}`") for name, value in facts.hyperparameters.items()]
    lines = [heading, "", facts.summary, "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if facts.evaluation:
        lines += ["", "### Evaluation", "", "| Metric | Dataset | Before training | After training |",
                  "|---|---|---|---|"]
        lines += [f"| {e['metric']} | {e['dataset']} | {_number(e.get('before'))} | {_number(e['after'])} |"
                  for e in facts.evaluation]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def hf_card(facts: CardFacts, library_name: str, pipeline_tag: str, tags: list[str]) -> str:
    """A plain Hugging Face model card: YAML front matter, the facts, the evaluation, the usage."""
    from huggingface_hub import ModelCardData

    hub_id, license_id = known_model(facts.base_model)
    metadata = ModelCardData(base_model=hub_id, library_name=library_name, pipeline_tag=pipeline_tag,
                             license=license_id, tags=["whetstone", *tags, *facts.tags])
    body = [f"# {facts.title}", "", facts_markdown(facts)]
    if facts.usage:
        body += ["## Usage", "", facts.usage.strip(), ""]
    if facts.all_hyperparameters:
        body += ["<details><summary>All training settings</summary>", ""]
        body += [f"- `{name}`: `{value}`" for name, value in facts.all_hyperparameters.items()]
        body += ["", "</details>", ""]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)


class WhetstoneRetrievalEvaluation:
    """What sentence-transformers' card reads of an evaluator: Whetstone ranked the corpus itself
    (exact search over the eval split's corpus) and hands the card its figures."""

    description = "Information Retrieval"

    def __init__(self, name: str, primary_metric: str, config: dict[str, Any]):
        self.name = name
        self.primary_metric = primary_metric
        self.config = config

    def get_config_dict(self) -> dict[str, Any]:
        return self.config


def sentence_transformers_card(folder: str, facts: CardFacts, metrics: dict[str, float] | None,
                               eval_name: str | None, before: dict[str, float] | None) -> str:
    """sentence-transformers' own card for the model in local ``folder``, with ``facts`` filled
    in: base model, training data and loss, hyperparameters, the eval split's figures (``metrics``
    after training, ``before`` it as the step-0 row of the training logs) and Whetstone's section."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    hub_id, license_id = known_model(facts.base_model)
    card = SentenceTransformerModelCardData(
        model_name=facts.title, license=license_id, local_files_only=True, generate_widget_examples=False,
        train_datasets=[{"name": d["name"], "size": d["rows"], "columns": d.get("columns", []),
                         "loss": {"fullname": facts.losses[0] if facts.losses else "unknown"}}
                        for d in facts.datasets if d.get("role", "training") == "training"],
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", "whetstone",
              *facts.tags])
    model = SentenceTransformer(folder, device="cpu", local_files_only=True, model_card_data=card)
    card.base_model = hub_id
    card.ir_model = True  # trained for retrieval: the usage snippet encodes queries and documents
    card.non_default_hyperparameters = facts.non_default_hyperparameters
    card.all_hyperparameters = facts.all_hyperparameters or facts.hyperparameters
    if metrics:
        evaluation = WhetstoneRetrievalEvaluation(eval_name or "eval", "ndcg@10",
                                                  {"split": eval_name, "search": "exact, cosine"})
        card.eval_results_dict = {evaluation: {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}}
        card.training_logs = [{"Epoch": 0, "Step": 0, **{k: round(v, 4) for k, v in (before or {}).items()
                                                          if k.startswith("ndcg@10")}},
                              {"Epoch": "-", "Step": facts.steps, **{k: round(v, 4) for k, v in metrics.items()
                                                                     if k.startswith("ndcg@10")}}]
    text = generate_model_card(model)
    section = facts_markdown(facts)
    marker = "\n## Training Details"
    return text.replace(marker, f"\n{section}{marker}", 1) if marker in text else f"{text}\n{section}"


def write_card(model_uri: str, text: str, storage: StorageConfig | None = None) -> str:
    """Write ``text`` as the model's ``README.md`` (local folder or storage URI); returns its URI."""
    uri = store.join(model_uri, CARD_FILE)
    store.write_bytes(uri, text.encode(), storage)
    return uri


def write_encoder_card(model_uri: str, facts: CardFacts, storage: StorageConfig | None = None,
                       metrics: dict[str, float] | None = None, eval_name: str | None = None,
                       before: dict[str, float] | None = None) -> str:
    """sentence-transformers' card for an encoder (a plain card if sentence-transformers cannot
    render one); returns the card's URI."""
    from whetstone.models.assets import localize

    try:
        text = sentence_transformers_card(localize(model_uri, storage), facts, metrics, eval_name, before)
    except Exception as err:  # noqa: BLE001 - a card must never fail a finished run
        logger.warning("sentence-transformers could not render the model card (%s); writing a plain one", err)
        text = hf_card(facts, "sentence-transformers", "sentence-similarity", ["sentence-transformers"])
    return write_card(model_uri, text, storage)
