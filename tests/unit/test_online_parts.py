"""Parts of online preference training that need no Ray: per-token log-probs, the sample batch,
the config's rules, offline KTO on pairs and the report's arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64))
    return model.eval()


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0], [11, 12, 13, 14, 15, 16, 17]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    return ids, attention, loss_mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_equal_full_log_softmax(tiny_lm, temperature):
    from whetstone.models.policy import sequence_logps, token_logps

    ids, attention, loss_mask = _batch()
    logps, mask = token_logps(tiny_lm, ids, attention, loss_mask, chunk_size=3, temperature=temperature)
    with torch.no_grad():
        full = F.log_softmax(tiny_lm(input_ids=ids, attention_mask=attention).logits / temperature, -1)  # (B, L, V)
    expected = full[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # position t predicts token t + 1
    want_mask = (loss_mask[:, 1:] * attention[:, 1:]).bool()
    assert torch.equal(mask, want_mask)
    assert torch.allclose(logps[mask], expected[mask], atol=1e-5)
    assert (logps[~mask] == 0).all()
    if temperature == 1.0:  # the per-token values sum to the sequence log-probs DPO uses
        sums, counts = sequence_logps(tiny_lm, ids, attention, loss_mask, chunk_size=3)
        assert torch.allclose(logps.sum(-1), sums, atol=1e-5)
        assert counts.tolist() == [3, 4]


def test_sample_batch_puts_each_sampled_log_prob_where_the_trainer_scores_that_token(tiny_lm):
    """The generation actor's per-token log-probs must line up with the trainer's grid: a sample
    scored by the same weights gives the same values at the same positions (GRPO's ratio is 1)."""
    from types import SimpleNamespace

    from whetstone.models.policy import token_logps
    from whetstone.online.batch import sample_batch

    prompts = [[3, 4, 5], [7]]
    completions = [[[10, 11], [12, 13, 14]], [[20], [21, 22, 23, 24]]]
    # the log-probs the generator would report, computed here by a full forward of each sequence
    logps = []
    for prompt, per_prompt in zip(prompts, completions, strict=True):
        row = []
        for ids in per_prompt:
            seq = torch.tensor([prompt + ids])
            with torch.no_grad():
                full = F.log_softmax(tiny_lm(input_ids=seq).logits[0], -1)
            row.append([float(full[len(prompt) - 1 + j, tok]) for j, tok in enumerate(ids)])
        logps.append(row)
    samples = SimpleNamespace(prompt_ids=prompts, completion_ids=completions, logps=logps)
    batch = sample_batch(samples, pad_id=0)
    assert batch.input_ids.shape == (4, 6) and batch.lengths.tolist() == [2, 3, 1, 4]
    trained, mask = token_logps(tiny_lm, batch.input_ids, batch.attention_mask, batch.loss_mask)
    assert torch.equal(mask, batch.sample_logps != 0)
    assert torch.allclose(trained[mask], batch.sample_logps[mask], atol=1e-5)
    assert batch.rows(torch.tensor([3])).input_ids[0].tolist() == [7, 21, 22, 23, 24, 0]


def _online(**update):
    from whetstone.config.preference import PreferenceJobConfig

    raw = {"mode": "online", "policy": {"path": "tiny-gpt2"}, "loss": {"name": "grpo"},
           "online": {"reward_model": "/models/rm"}}
    for key, value in update.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return PreferenceJobConfig.model_validate(raw)


def test_online_config_rules():
    assert _online().needs_reference
    for loss in ("dpo", "ipo", "kto", "grpo"):
        assert _online(loss__name=loss).loss.name == loss
    with pytest.raises(ValidationError, match="mode=online trains with dpo, ipo, kto, grpo, not simpo"):
        _online(loss__name="simpo")
    with pytest.raises(ValidationError, match="exactly one of online.reward_model"):
        _online(online={"reward_model": "/m", "reward_app": "rm"})
    with pytest.raises(ValidationError, match="exactly one of online.reward_model"):
        _online(online={})
    with pytest.raises(ValidationError, match="LoRA is not supported"):
        _online(lora={"enabled": True})
    with pytest.raises(ValidationError, match="samples_per_prompt"):
        _online(online={"reward_model": "/m", "samples_per_prompt": 1})


def test_offline_config_refuses_grpo_and_kto_without_the_reference_copy():
    from whetstone.config.preference import PreferenceJobConfig

    base = {"policy": {"path": "tiny-gpt2"}}
    with pytest.raises(ValidationError, match="loss.name=grpo needs mode=online"):
        PreferenceJobConfig.model_validate({**base, "loss": {"name": "grpo"}})
    with pytest.raises(ValidationError, match="reference.mode=on_the_fly"):
        PreferenceJobConfig.model_validate({**base, "loss": {"name": "kto"}})
    config = PreferenceJobConfig.model_validate({**base, "loss": {"name": "kto"}, "reference": {"mode": "on_the_fly"}})
    assert config.needs_reference


def test_offline_kto_on_pairs_by_hand():
    """Chosen = desirable, rejected = undesirable; each pair's loss is the mean of its two."""
    from whetstone.losses.kto import KTOLoss
    from whetstone.train.preference import kto_as_pairs

    beta, z0 = 0.5, torch.tensor(0.2)
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -2.5])
    out = kto_as_pairs(KTOLoss(beta), chosen, rejected, ref_chosen, ref_rejected, z0)
    h_c, h_r = chosen - ref_chosen, rejected - ref_rejected  # (0.5, 0), (-1, 0.5)
    want_c = 1 - torch.sigmoid(beta * (h_c - z0))
    want_r = 1 - torch.sigmoid(beta * (z0 - h_r))
    assert torch.allclose(out.losses, (want_c + want_r) / 2)
    assert torch.allclose(out.chosen_rewards, beta * h_c) and torch.allclose(out.rejected_rewards, beta * h_r)
    assert out.accuracies.tolist() == [1.0, 0.0]
    # held-out evaluation passes no reference point: z0 = 0
    evaluated = kto_as_pairs(KTOLoss(beta), chosen, rejected, ref_chosen, ref_rejected, None)
    assert torch.allclose(evaluated.losses, ((1 - torch.sigmoid(beta * h_c)) + (1 - torch.sigmoid(-beta * h_r))) / 2)


def test_online_report_gain_in_starting_standard_deviations():
    from whetstone.train.online_run import online_report

    config = _online()
    history = [{"step": 1, "reward_mean": 0.1, "kl_to_reference": 0.0, "policy_lag": 0.0, "generate_s": 2.0,
                "score_s": 0.1, "train_s": 3.0, "sync_s": 0.5},
               {"step": 2, "reward_mean": 0.3, "kl_to_reference": 0.2, "policy_lag": 0.0, "generate_s": 4.0,
                "score_s": 0.3, "train_s": 5.0, "sync_s": 0.7}]
    before = {"prompts": 4, "reward_mean": -0.5, "reward_std": 0.25, "response_tokens": 30.0}
    metrics = {"eval_prompts": 4, "eval_reward_mean": -0.3, "eval_reward_std": 0.2, "eval_response_tokens": 20.0,
               "eval_kl_to_reference": 1.5, "loss": 0.1}
    section = online_report(config, history, before, metrics)
    assert section["reward_gain"] == pytest.approx(0.2)
    assert section["reward_gain_sd"] == pytest.approx(0.8)
    assert section["mean_response_tokens_before"] == 30.0 and section["mean_response_tokens_after"] == 20.0
    assert section["kl_to_reference_final"] == 1.5
    assert section["generate_s_per_step"] == 3.0 and section["train_s_per_step"] == 4.0
    assert section["train_reward_first_step"] == 0.1 and section["train_reward_last_step"] == 0.3


def test_sequence_kl_by_hand():
    """k3 = sum over the masked tokens of exp(r) - r - 1 with r = ref - logp; k1 = sum of logp - ref."""
    import math

    from whetstone.online.batch import sequence_kl

    sample = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    reference = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    k3, k1 = sequence_kl(sample, reference, mask)
    r1, r2 = -0.5, 1.0  # ref - logp at the two masked tokens of row 0
    assert k3.tolist() == pytest.approx([math.exp(r1) - r1 - 1 + math.exp(r2) - r2 - 1, 0.0])
    assert k1.tolist() == pytest.approx([0.5 - 1.0, 0.0])
    assert (k3 >= 0).all()


def test_dr_grpo_divides_by_rows_times_the_completion_cap_on_a_wider_grid():
    """The trainer's grid holds prompt + completion (wider than max_new_tokens); the cap is on
    each row's completion tokens."""
    from whetstone.losses.grpo import GRPOLoss

    logps = torch.zeros(2, 10, requires_grad=True)
    mask = torch.zeros(2, 10)
    mask[0, 6:9] = 1  # 3 completion tokens, after a 6-token prompt
    mask[1, 2:6] = 1  # 4
    advantages = torch.tensor([1.0, -0.5])
    out = GRPOLoss(beta=0.0, loss_type="dr_grpo", max_completion_length=4)(logps, None, None, advantages, mask)
    # ratio 1 everywhere: per-token loss -A; sum = -(3 * 1) - (4 * -0.5) = -1; / (2 rows * 4)
    assert out.loss.item() == pytest.approx(-1.0 / 8)
    with pytest.raises(ValueError, match="a row has 4 completion tokens, more than max_completion_length=3"):
        GRPOLoss(beta=0.0, loss_type="dr_grpo", max_completion_length=3)(logps, None, None, advantages, mask)


def test_kto_labels_leave_ties_and_samples_at_the_mean_out():
    import numpy as np
    from whetstone.online.rewards import above_or_below_mean

    tied = np.full((1, 7), 0.1, dtype=np.float32)  # float32 mean of 7 x 0.1 is not exactly 0.1
    assert ((tied - tied.mean(axis=1, keepdims=True)) != 0).all()  # a naive `!= mean` labels all 7
    rewards = np.concatenate([tied[:, :3], np.array([[0.0, 1.0, 2.0]], dtype=np.float32)])
    desirable, labelled = above_or_below_mean(rewards)
    assert labelled.tolist() == [[False, False, False], [True, False, True]]
    assert desirable.tolist() == [[False, False, False], [False, False, True]]
    desirable, labelled = above_or_below_mean(tied)
    assert not labelled.any() and not desirable.any()


def test_kept_mean_without_a_process_group_is_the_mean_over_kept_rows():
    from whetstone.train.online_worker import kept_mean

    losses = torch.tensor([1.0, 2.0, 4.0])
    assert kept_mean(losses, torch.tensor([True, False, True]), world=1).item() == pytest.approx(2.5)
    assert kept_mean(losses, torch.tensor([False, False, False]), world=1).item() == 0.0


def test_online_checkpoints_fall_on_weight_pushes_and_grpo_builds_from_the_online_section():
    from whetstone.losses.grpo import GRPOLoss
    from whetstone.train.preference import build_loss

    with pytest.raises(ValidationError, match=r"checkpoint_every \(3\) must be a multiple of online.sync_every \(2\)"):
        _online(optim={"checkpoint_every": 3}, online={"reward_model": "/m", "sync_every": 2})
    config = _online(optim={"checkpoint_every": 4}, online={"reward_model": "/m", "sync_every": 2,
                                                            "grpo_loss_type": "bnpo", "max_new_tokens": 7})
    loss = build_loss(config.loss, config.online)
    assert isinstance(loss, GRPOLoss) and loss.loss_type == "bnpo" and loss.max_completion_length == 7


def test_the_summary_says_so_when_the_starting_rewards_have_no_spread():
    from whetstone.train.online_run import online_report, print_online_summary

    before = {"prompts": 1, "reward_mean": 0.5, "reward_std": 0.0, "response_tokens": 3.0}
    metrics = {"eval_prompts": 1, "eval_reward_mean": 0.7, "eval_reward_std": 0.0, "eval_response_tokens": 2.0,
               "eval_kl_to_reference": 0.1}
    history = [{"step": 1, "generate_s": 1.0, "score_s": 0.1, "train_s": 1.0, "sync_s": 0.0, "policy_lag": 0.0}]
    section = online_report(_online(), history, before, metrics)
    assert section["reward_gain_sd"] is None
    assert "the starting rewards have no spread" in print_online_summary(section)[0]
