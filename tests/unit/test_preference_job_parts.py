"""Preference job parts without Ray: config rules, the pair-id split hash, NS-DPO time steps, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from whetstone.config.base import ConfigError, load_config
from whetstone.config.preference import PreferenceJobConfig
from whetstone.train.plots import render_metrics_png
from whetstone.train.preference import apply_loss, build_loss
from whetstone.train.preference_data import TimePlan, pair_hash

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "train_preference"


@pytest.mark.parametrize("name", ["smoke.yaml", "hh-rlhf.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(PreferenceJobConfig, CONFIGS / name)
    assert config.policy is not None and config.data.max_prompt_length < config.data.max_length
    assert (CONFIGS / name).read_text().startswith("#")  # header comment with the launch line


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="policy"):
        load_config(PreferenceJobConfig, None, ["mode=policy"])
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(PreferenceJobConfig, None, ["policy.path=x", "data.max_length=64", "data.max_prompt_length=64"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(PreferenceJobConfig, None, ["policy.path=x", "loss.name=kto"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(PreferenceJobConfig, None, ["policy.path=x", "loss.label_smoothing=0.1"])
    reward = load_config(PreferenceJobConfig, None, ["mode=reward_model"])
    assert not reward.needs_reference
    assert not load_config(PreferenceJobConfig, None, ["policy.path=x", "loss.name=simpo"]).needs_reference


def test_pair_hash_is_order_free_and_seeded():
    ids = [f"pair-{i}" for i in range(2000)]
    h = pair_hash(ids, seed=0)
    assert np.array_equal(pair_hash(ids[::-1], seed=0), h[::-1])  # a pair's side never depends on order
    assert not np.array_equal(pair_hash(ids, seed=1), h)
    assert 0 <= h.min() and h.max() < 1
    assert abs((h < 0.1).mean() - 0.1) < 0.03  # about the asked share is held out


def test_time_plan_steps():
    day = 86400 * 10**6
    plan = TimePlan(origin_us=5 * day, step_us=day, current_step=4, missing_step=3)
    # t = floor((time - origin) / step); a missing time takes the documented default
    assert plan.steps([5 * day, 6 * day + 1, 8 * day + day // 2, None]).tolist() == [0, 1, 3, 3]


def test_ns_dpo_dispatch_matches_dpo_at_gamma_one():
    logps = {"chosen_logps": torch.tensor([-5.0, -7.0]), "rejected_logps": torch.tensor([-6.0, -4.0]),
             "chosen_token_counts": torch.tensor([3, 4]), "rejected_token_counts": torch.tensor([3, 2])}
    ref = {"chosen_logps": torch.tensor([-5.5, -6.0]), "rejected_logps": torch.tensor([-5.0, -4.5])}
    config = load_config(PreferenceJobConfig, None, ["policy.path=x", "loss.name=ns_dpo", "loss.gamma=1.0"])
    ns = apply_loss(build_loss(config.loss), "ns_dpo", logps, ref, torch.tensor([0.0, 3.0]), 4)
    dpo = apply_loss(build_loss(config.loss.model_copy(update={"name": "dpo"})), "dpo", logps, ref)
    assert torch.allclose(ns.reduce(), dpo.reduce(), atol=1e-6)
    # hand check of pair 0: beta * ((-5 + 5.5) - (-6 + 5)) = 0.15 -> -log sigmoid(0.15)
    assert dpo.losses[0].item() == pytest.approx(-np.log(1 / (1 + np.exp(-0.15))), abs=1e-6)


def test_plot_is_a_png_and_rejects_unknown_keys():
    history = [{"step": s, "loss": 1 / s, "reward_accuracy": min(1.0, s / 10)} for s in range(1, 21)]
    png = render_metrics_png(history, ["loss", "reward_accuracy"], markers=[(10, "epoch 1")], smooth=5)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="none of"):
        render_metrics_png(history, ["ndcg@10"])


def test_lora_policy_trains_adapters_and_saves_merged(tmp_path, gpt2_tokenizer_dir):
    """LoRA through peft: only adapters train; the checkpoint is a plain HF model with them merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from whetstone.config.preference import LoRAConfig, PolicyConfig
    from whetstone.models.policy import build_preference_batch, preference_logps
    from whetstone.train.preference import load_policy, save_policy

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50257, n_positions=64)).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)).save_pretrained(base)
    model, tokenizer = load_policy(PolicyConfig(path=str(base)), None, LoRAConfig(enabled=True, r=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.05 * sum(p.numel() for p in model.parameters())
    batch = build_preference_batch(tokenizer, ["Hello there"], [" general"], [" kenobi"], 32, 16)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: the first step moves B, the second makes A matter
        out = preference_logps(model, batch)
        optimizer.zero_grad()
        (-(out["chosen_logps"] - out["rejected_logps"]).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        expected = preference_logps(model.eval(), batch)["chosen_logps"]
    save_policy(model, tokenizer, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = preference_logps(merged, batch)["chosen_logps"]
    base_logps = preference_logps(AutoModelForCausalLM.from_pretrained(base).eval(), batch)["chosen_logps"]
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base_logps.detach(), atol=1e-4)


def test_yaml_off_means_leakage_off():
    config = load_config(PreferenceJobConfig, None, ["policy.path=x", "leakage.mode=off"])
    assert config.leakage.mode == "off"
