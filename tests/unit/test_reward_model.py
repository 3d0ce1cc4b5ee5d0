"""Reward model: cross-encoding and truncation, learning a separable toy preference, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from whetstone.models.reward import RewardModel, fit_reward_model, pairwise_accuracy

TOPICS = ["the weather", "my taxes", "a cake recipe", "python lists", "the moon", "jazz music", "my garden",
          "train times", "a job interview", "chess openings", "the ocean", "car repair", "a birthday party",
          "sleep habits", "learning french", "a broken phone"]
# Two response styles a reward model must tell apart: helpful and polite vs curt and dismissive.
GOOD = "Happy to help! Here is a clear, friendly explanation about {}."
BAD = "No. Figure out {} yourself, stop asking me."


def _pairs(topics):
    prompts = [f"\n\nHuman: Can you tell me about {t}?\n\nAssistant:" for t in topics]
    return prompts, [GOOD.format(t) for t in topics], [BAD.format(t) for t in topics]


@pytest.fixture()
def reward(tiny_encoder_dir) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=40)


def test_tokenize_keeps_prompt_tail_and_response_head(reward):
    prompt = " ".join(f"w{i}" for i in range(200)) + " final question"
    response = "answer starts here " + " ".join("x" for _ in range(200))
    tokens = reward.tokenize([prompt, "short prompt"], [response, "short answer"])
    ids, types, mask = tokens["input_ids"], tokens["token_type_ids"], tokens["attention_mask"]
    assert ids.shape == (2, 64) and int(mask[0].sum()) == 64  # the long pair fills max_length exactly
    text = reward.tokenizer.decode(ids[0])
    assert "final question" in text and "w0 " not in text  # the prompt keeps its end
    assert "answer starts here" in text  # the response keeps its beginning
    first_sep = int((ids[0] == reward.tokenizer.sep_token_id).nonzero()[0])
    assert first_sep <= 40 + 1  # [CLS] + at most max_prompt_length prompt tokens
    assert types[0, : first_sep + 1].eq(0).all() and types[0, first_sep + 1 :].eq(1).all()
    # the short pair is padded after its own last [SEP], with type 0 and mask 0
    length = int(mask[1].sum())
    assert ids[1, length - 1] == reward.tokenizer.sep_token_id and mask[1, length:].eq(0).all()


def test_learns_a_separable_preference(reward):
    prompts, chosen, rejected = _pairs(TOPICS[:12])
    history = fit_reward_model(reward, prompts, chosen, rejected, epochs=6, batch_size=4, lr=1e-3, head_lr=1e-2)
    assert len(history) == 6 * 3
    assert np.mean([h["loss"] for h in history[-3:]]) < np.mean([h["loss"] for h in history[:3]]) - 0.2
    held_prompts, held_chosen, held_rejected = _pairs(TOPICS[12:])
    assert pairwise_accuracy(reward, held_prompts, held_chosen, held_rejected) == 1.0
    scores = reward.score(held_prompts, held_chosen)
    assert scores.shape == (4,) and scores.dtype == np.float32


def test_score_is_order_independent(reward):
    prompts, chosen, _ = _pairs(TOPICS[:6])
    forward = reward.score(prompts, chosen, batch_size=2)
    backward = reward.score(prompts[::-1], chosen[::-1], batch_size=4)[::-1]
    np.testing.assert_allclose(forward, backward, atol=1e-5)


def test_save_load_round_trip(reward, tmp_path):
    prompts, chosen, _ = _pairs(TOPICS[:4])
    with torch.no_grad():
        reward.head.bias.fill_(0.25)
    before = reward.score(prompts, chosen)
    loaded = RewardModel.load(reward.save(tmp_path / "rm"))
    assert (loaded.max_length, loaded.max_prompt_length) == (64, 40)
    np.testing.assert_allclose(loaded.score(prompts, chosen), before, atol=1e-6)


def test_load_rejects_a_plain_encoder_folder(tiny_encoder_dir):
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        RewardModel.load(tiny_encoder_dir)


def test_bad_lengths_are_rejected(tiny_encoder_dir):
    with pytest.raises(ValueError, match="max_prompt_length"):
        RewardModel.from_encoder(tiny_encoder_dir, max_length=32, max_prompt_length=32)


def test_response_pooling_averages_the_response_segment_only(tiny_encoder_dir, tmp_path):
    torch.manual_seed(0)
    model = RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=40, pooling="response")
    prompts, chosen, _ = _pairs(TOPICS[:3])
    tokens = model.tokenize(prompts, chosen)
    with torch.no_grad():
        hidden = model.transformer(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                   token_type_ids=tokens["token_type_ids"]).last_hidden_state
        for row in range(3):
            keep = (tokens["attention_mask"][row] == 1) & (tokens["token_type_ids"][row] == 1)
            want = model.head(hidden[row, keep].mean(0))
            assert torch.allclose(model(**tokens)[row], want.squeeze(), atol=1e-5)
        # Unlike mean pooling, which averages the prompt's tokens in too.
        everything = RewardModel(model.transformer, model.tokenizer, 64, 40, pooling="mean")
        everything.head = model.head
        assert not torch.allclose(everything(**tokens), model(**tokens), atol=1e-4)
    loaded = RewardModel.load(model.save(tmp_path / "rm"))
    assert loaded.pooling == "response"
    np.testing.assert_allclose(loaded.score(prompts, chosen), model.score(prompts, chosen), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(model.transformer, model.tokenizer, 64, 40, pooling="max")
