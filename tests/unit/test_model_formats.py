"""What Whetstone saves loads in the ecosystem's own loaders, with the same numbers:

* an asymmetric encoder (frozen query tower) is a sentence-transformers Router model:
  ``SentenceTransformer(path).encode_query`` / ``encode_document`` embed with each tower;
* a reward model is a ``transformers`` sequence-classification folder (``num_labels=1``):
  ``AutoModelForSequenceClassification`` scores as :class:`RewardModel` does;
* each saved model can carry a model card (README.md) with its training facts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from whetstone.models.encoder import QUERY_TOWER, TOWER_FOLDERS, Encoder

TEXTS = ["a claim about proteins", "the moon is made of rock", "short", "a much longer sentence about how "
         "cells divide and what regulates the cycle of their division"]


@torch.no_grad()
def _perturb(encoder: Encoder, seed: int) -> None:
    """Make two towers differ: seeded noise on every weight."""
    generator = torch.Generator().manual_seed(seed)
    for param in encoder.transformer.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.fixture()
def towers(tiny_encoder_dir) -> tuple[Encoder, Encoder]:
    """(document tower, query tower) on CPU, with different weights."""
    docs, queries = Encoder.load(tiny_encoder_dir, device="cpu"), Encoder.load(tiny_encoder_dir, device="cpu")
    _perturb(docs, seed=1)
    return docs, queries


def test_an_asymmetric_model_is_a_sentence_transformers_router_model(towers, tmp_path):
    from sentence_transformers import SentenceTransformer

    docs, queries = towers
    path = docs.save(tmp_path / "asym", query_tower=queries)
    assert json.loads((path / "modules.json").read_text())[0]["type"].endswith("Router")
    st = SentenceTransformer(str(path), device="cpu")
    want_queries, want_docs = queries.encode(TEXTS), docs.encode(TEXTS)
    assert not np.allclose(want_queries, want_docs, atol=1e-3)  # the towers differ
    np.testing.assert_allclose(st.encode_query(TEXTS), want_queries, atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), want_docs, atol=1e-5)
    np.testing.assert_allclose(st.encode(TEXTS), want_docs, atol=1e-5)  # no task: the document tower
    # Whetstone's own loaders read it back tower by tower.
    np.testing.assert_allclose(Encoder.load(path, device="cpu").encode(TEXTS), want_docs, atol=1e-5)
    np.testing.assert_allclose(Encoder.load_query(path, device="cpu").encode(TEXTS), want_queries, atol=1e-5)
    np.testing.assert_allclose(Encoder.load_query_tower(path, device="cpu").encode(TEXTS), want_queries, atol=1e-5)
    # Each tower's subfolder is a complete model of its own (the report's query_model_uri names one).
    np.testing.assert_allclose(SentenceTransformer(str(path / QUERY_TOWER), device="cpu").encode(TEXTS),
                               want_queries, atol=1e-5)


def test_transformers_loads_a_tower_of_an_asymmetric_model_by_subfolder(towers, tmp_path):
    """The root of a Router model holds no config.json: AutoModel loads a tower by its subfolder."""
    from transformers import AutoModel

    docs, queries = towers
    path = docs.save(tmp_path / "asym", query_tower=queries)
    with pytest.raises((OSError, ValueError)):
        AutoModel.from_pretrained(str(path))
    loaded = AutoModel.from_pretrained(str(path), subfolder=TOWER_FOLDERS["document"])
    want = docs.transformer.state_dict()
    assert all(torch.equal(tensor, want[name]) for name, tensor in loaded.state_dict().items())


def test_a_symmetric_model_stays_a_plain_sentence_transformers_folder(towers, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    docs, _ = towers
    path = docs.save(tmp_path / "sym")
    assert not (path / "router_config.json").exists() and (path / "config.json").is_file()
    assert Encoder.load_query_tower(path) is None
    np.testing.assert_allclose(SentenceTransformer(str(path), device="cpu").encode_query(TEXTS), docs.encode(TEXTS),
                               atol=1e-5)
    assert AutoModel.from_pretrained(str(path)).config.hidden_size == docs.dim


def test_models_saved_with_a_query_encoder_subfolder_still_load(towers, tmp_path):
    """The layout before the Router one: the document tower at the root, the query tower in query_encoder/."""
    docs, queries = towers
    path = docs.save(tmp_path / "old")
    queries.save(path / "query_encoder")
    np.testing.assert_allclose(Encoder.load(path, device="cpu").encode(TEXTS), docs.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(Encoder.load_query(path, device="cpu").encode(TEXTS), queries.encode(TEXTS),
                               atol=1e-5)


# ------------------------------------------------------------------------------ reward models

PROMPTS = ["\n\nHuman: Can you tell me about the moon?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:",
           "\n\nHuman: How do I fix a flat bicycle tyre on the road without a pump?\n\nAssistant:"]
RESPONSES = [" Sure! The moon is Earth's only natural satellite.", " Hello.",
             " Take the wheel off, find the puncture, patch it, and use a CO2 cartridge to inflate it again."]


@pytest.fixture()
def tiny_gpt2_backbone(gpt2_tokenizer_dir):
    """A random-init 2-layer GPT-2 backbone (width 32) and the real GPT-2 tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=128)
    return GPT2Model(config), AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))


def _train_a_little(model) -> None:
    """Two Bradley-Terry steps, so the head and the backbone are not at their initial values."""
    from whetstone.models.reward import fit_reward_model

    fit_reward_model(model, PROMPTS[:2], RESPONSES[:2], RESPONSES[1::-1], epochs=2, batch_size=2, lr=1e-3,
                     head_lr=1e-2)


def test_a_gpt2_reward_model_is_a_native_sequence_classification_model(tiny_gpt2_backbone, tmp_path):
    """pooling="last": GPT2ForSequenceClassification, loaded without custom code, scores as Whetstone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from whetstone.models.reward import RewardModel

    backbone, tokenizer = tiny_gpt2_backbone
    model = RewardModel(backbone, tokenizer, max_length=64, max_prompt_length=40, pooling="last")
    _train_a_little(model)
    want = model.score(PROMPTS, RESPONSES)
    path = model.save(tmp_path / "rm")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.eos_token_id and "auto_map" not in config

    hf = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification" and hf.config.num_labels == 1
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
    # Whetstone's rows as text: EOS (GPT-2's BOS) + prompt + EOS + response + EOS, padded with EOS.
    eos = hf_tokenizer.eos_token
    tokens = hf_tokenizer([f"{eos}{p}{eos}{r}{eos}" for p, r in zip(PROMPTS, RESPONSES, strict=True)],
                          padding=True, return_tensors="pt")
    assert tokens["attention_mask"].sum(1).unique().numel() == len(PROMPTS)  # lengths differ: padding is involved
    with torch.no_grad():
        scores = hf(**tokens).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert np.ptp(want) > 1e-4  # the pairs score differently, so the equality means something
    # Whetstone reads it back, scores alike, and goes on training it.
    loaded = RewardModel.load(path)
    assert (loaded.pooling, loaded.max_length, loaded.max_prompt_length) == ("last", 64, 40)
    np.testing.assert_allclose(loaded.score(PROMPTS, RESPONSES), want, atol=1e-5)


def test_a_response_pooled_reward_model_loads_with_its_own_code(tiny_encoder_dir, tmp_path):
    """pooling="response" (the default): no transformers class pools the response segment, so the
    folder carries its modeling code; trust_remote_code=True loads it and it scores as Whetstone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from whetstone.models.reward import RewardModel

    torch.manual_seed(0)
    model = RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=40)
    _train_a_little(model)
    want = model.score(PROMPTS, RESPONSES)
    path = model.save(tmp_path / "rm")
    config = json.loads((path / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["architectures"] == ["WhetstoneRewardModel"]
    assert (path / config["auto_map"]["AutoModelForSequenceClassification"].split(".")[0]).with_suffix(".py").is_file()

    hf = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=True).eval()
    assert hf.config.num_labels == 1
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokens = hf_tokenizer(PROMPTS, RESPONSES, padding=True, return_tensors="pt")  # [CLS] p [SEP] r [SEP]
    assert tokens["attention_mask"].sum(1).unique().numel() == len(PROMPTS)
    with torch.no_grad():
        np.testing.assert_allclose(hf(**tokens).logits[:, 0].numpy(), want, atol=1e-5)
        # the model's own tokenize_pairs builds Whetstone's rows, long pairs cut as in training
        long_prompts = [p * 20 for p in PROMPTS]
        np.testing.assert_allclose(hf(**hf.tokenize_pairs(hf_tokenizer, long_prompts, RESPONSES)).logits[:, 0].numpy(),
                                   model.score(long_prompts, RESPONSES), atol=1e-5)
    assert np.ptp(want) > 1e-4
    loaded = RewardModel.load(path)
    assert (loaded.pooling, loaded.max_length, loaded.max_prompt_length) == ("response", 64, 40)
    np.testing.assert_allclose(loaded.score(PROMPTS, RESPONSES), want, atol=1e-6)


def test_last_token_pooling_needs_a_decoder_classifier(tiny_encoder_dir):
    from whetstone.models.reward import RewardModel

    with pytest.raises(ValueError, match="pooling='last' needs a backbone"):
        RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=40, pooling="last")


def test_reward_models_saved_with_a_head_file_still_load(tiny_encoder_dir, tmp_path):
    """The layout before the transformers one: encoder files, reward_head.pt, reward_config.json."""
    from whetstone.models.reward import CONFIG_FILE, HEAD_FILE, RewardModel

    torch.manual_seed(0)
    model = RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=40)
    old = tmp_path / "old"
    model.transformer.save_pretrained(old)
    model.tokenizer.save_pretrained(old)
    torch.save(model.head.state_dict(), old / HEAD_FILE)
    (old / CONFIG_FILE).write_text(json.dumps(model.settings()))
    np.testing.assert_allclose(RewardModel.load(old).score(PROMPTS, RESPONSES), model.score(PROMPTS, RESPONSES),
                               atol=1e-6)


# ------------------------------------------------------------------------------ model cards

def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _facts(base_model: str, steps: int = 6):
    from whetstone.models.cards import CardFacts

    return CardFacts(
        title="Whetstone test model", summary="A model trained by a test.", base_model=base_model,
        datasets=[{"name": "scifact pairs/train", "rows": 809, "what": "(query, positive) pairs", "role": "training",
                   "columns": ["query", "positive"]},
                  {"name": "scifact test", "rows": 77, "what": "queries", "role": "evaluation"}],
        losses=["InfoNCE (temperature 0.05)"], hyperparameters={"optim.lr": 2e-5, "optim.batch_size": 8},
        steps=steps, evaluation=[{"metric": "nDCG@10", "dataset": "scifact test", "before": 0.3012, "after": 0.4321}],
        all_hyperparameters={"optim.lr": 2e-5, "optim.batch_size": 8, "optim.seed": 0},
        non_default_hyperparameters={"optim.batch_size": 8})


def test_an_encoder_card_is_sentence_transformers_own_with_the_run_facts(towers, tmp_path):
    from sentence_transformers import SentenceTransformer
    from whetstone.models.cards import write_encoder_card

    docs, queries = towers
    path = docs.save(tmp_path / "asym", query_tower=queries)
    uri = write_encoder_card(str(path), _facts("all-MiniLM-L6-v2", steps=6), metrics={"ndcg@10": 0.4321,
                             "recall@100": 0.8123}, eval_name="scifact test", before={"ndcg@10": 0.3012})
    card = (path / "README.md").read_text()
    assert uri == str(path / "README.md")
    meta = _front_matter(card)
    assert meta["library_name"] == "sentence-transformers" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "whetstone" in meta["tags"] and meta["model-index"][0]["results"][0]["metrics"]
    assert "This is a [sentence-transformers](https://www.SBERT.net) model" in card  # sentence-transformers' template
    assert "Router" in card and "encode_query" in card  # the architecture and the asymmetric usage
    assert "| Steps | 6 |" in card and "0.4321" in card and "0.3012" in card and "scifact pairs/train" in card
    assert "InfoNCE (temperature 0.05)" in card and "809" in card
    np.testing.assert_allclose(SentenceTransformer(str(path), device="cpu").encode_query(TEXTS),
                               queries.encode(TEXTS), atol=1e-5)  # the card changes nothing about loading


def test_a_plain_card_for_transformers_models(tmp_path):
    from whetstone.models.cards import hf_card, write_card

    facts = _facts(str(tmp_path / "some-local-model"), steps=12)
    facts.evaluation = [{"metric": "eval_reward_accuracy", "dataset": "hh-rlhf eval", "after": 0.6543}]
    facts.usage = "```python\nprint('hi')\n```"
    write_card(str(tmp_path / "rm"), hf_card(facts, "transformers", "text-classification", ["reward-model"]))
    card = (tmp_path / "rm" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "reward-model" in meta["tags"]
    assert "base_model" not in meta  # a local path is no Hub id; the text names it
    assert str(tmp_path / "some-local-model") in card and "| Steps | 12 |" in card and "0.6543" in card
    assert "## Usage" in card
