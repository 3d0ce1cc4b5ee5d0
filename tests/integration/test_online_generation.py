"""Generation actors for online preference training, on the session's local Ray.

A tiny random-init GPT-2 (``tiny_gpt2_path``) served by a pool of two actors: k samples per
prompt with the right shapes, per-token log-probs equal to a full forward's, seeded determinism,
greedy equal to ``model.generate`` run here, EOS handling (on weights made to emit EOS often),
weight pushes that change the output and the version, and a pool reached by name from a task.
The prompt rendering and the state dict of a LoRA model are checked without Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid

import pytest
import torch
from whetstone.models.policy import truncate_prompt
from whetstone.online.generation import (
    GenerationActor,
    GenerationPool,
    GenerationSettings,
    Samples,
    policy_state_dict,
    render_prompts,
)

pytestmark = pytest.mark.integration

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog and then",
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "a",
    "Once upon a time, in a land far away, there lived a small robot who wanted to",
]
TEMPERATURE = 0.8
SETTINGS = {"max_new_tokens": 12, "temperature": TEMPERATURE, "batch_size": 4, "max_prompt_length": 48}


@pytest.fixture(scope="module")
def policy_path() -> str:
    from whetstone.models.assets import tiny_gpt2_path

    return str(tiny_gpt2_path())


@pytest.fixture(scope="module")
def local(policy_path):
    """The same policy in the test process: (model, tokenizer), eval mode."""
    from whetstone.config.preference import PolicyConfig
    from whetstone.train.preference import load_policy

    model, tokenizer = load_policy(PolicyConfig(path=policy_path), None)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def pool(ray_cluster, policy_path):
    pool = GenerationPool.start(2, {"path": policy_path}, None, SETTINGS, num_cpus=1.0,
                                name_prefix=f"test-generation-{uuid.uuid4().hex[:6]}")
    yield pool
    pool.shutdown()


def _forward_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token from one unpadded forward, (T,)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]  # (T, V)
    logps = torch.log_softmax(logits.float() / TEMPERATURE, -1)  # (T, V)
    return logps.gather(1, torch.tensor(completion)[:, None])[:, 0]


def _assert_logps_match(model, samples: Samples) -> None:
    for p, completions in enumerate(samples.completion_ids):
        for j, completion in enumerate(completions):
            expected = _forward_logps(model, samples.prompt_ids[p], completion)
            torch.testing.assert_close(torch.tensor(samples.logps[p][j]), expected, atol=1e-4, rtol=0)


def _hf_greedy(model, tokenizer, prompt_ids: list[int]) -> list[int]:
    """``model.generate(do_sample=False)`` on one unpadded prompt, cut after the first EOS."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])  # (1, L)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=SETTINGS["max_new_tokens"], pad_token_id=tokenizer.eos_token_id)
    tokens = out[0, len(prompt_ids):].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _eos_heavy(model, eos_id: int):
    """A copy whose every step gives EOS log-odds of about 0.1 at T=0.8, whatever the input: the final
    norm outputs a constant direction d and EOS's (tied) embedding points along it; others stay near 0."""
    heavy = copy.deepcopy(model)
    with torch.no_grad():
        direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
        direction /= direction.norm()
        heavy.transformer.ln_f.weight.zero_()
        heavy.transformer.ln_f.bias.copy_(direction)
        heavy.transformer.wte.weight[eos_id] = 6.9 * direction  # exp(6.9 / 0.8) ~ 0.11 x 50,256
    return heavy


def _perturbed(model):
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in moved.parameters():  # tied weights once
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return moved


# --- without Ray -------------------------------------------------------------------------------


def test_truncate_prompt_keeps_the_end_and_bos():
    assert truncate_prompt([1, 2, 3, 4, 5], 3, None) == [3, 4, 5]
    assert truncate_prompt([0, 2, 3, 4, 5], 3, 0) == [0, 4, 5]  # BOS kept, then the last 2
    assert truncate_prompt([0, 2, 3], 3, 0) == [0, 2, 3]
    assert truncate_prompt([0, 2, 3, 4], 1, 0) == [4]  # no room for BOS and a token


def test_render_prompts_plain_and_chat(local):
    _, tokenizer = local
    plain = render_prompts(tokenizer, PROMPTS, False, 8)
    full = tokenizer(PROMPTS[1])["input_ids"]
    assert plain[1] == full[-8:] and plain[0] == tokenizer(PROMPTS[0])["input_ids"]
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    rendered = render_prompts(chat, PROMPTS[:3], True, 256)
    dialogue = chat.decode(rendered[2])
    assert dialogue == "<user>What is the capital of France?\n<assistant>", dialogue  # hh-rlhf -> turns
    assert chat.decode(rendered[0]) == "<user>Hello there\n<assistant>"
    with pytest.raises(ValueError, match=r"prompts\[1\] renders to no tokens"):
        render_prompts(tokenizer, ["ok", ""], False, 8)
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompts(tokenizer, ["ok"], True, 8)


def test_settings_and_positions_are_checked(policy_path):
    from pydantic import ValidationError
    from whetstone.config.base import ConfigError

    with pytest.raises(ValidationError, match="temperature"):
        GenerationSettings(temperature=0)
    with pytest.raises(ConfigError, match="exceeds the policy's 256 positions"):
        GenerationActor({"path": policy_path}, None, {"max_prompt_length": 250, "max_new_tokens": 64})


def test_samples_concat_refuses_mixed_versions():
    part = Samples([[1]], [[[2]]], [["x"]], [[False]], [[[-1.0]]], version=1, seconds=0.1)
    assert Samples.concat([part, part], 0.2).prompt_ids == [[1], [1]]
    with pytest.raises(RuntimeError, match=r"different weight versions \[1, 2\]"):
        Samples.concat([part, dataclasses.replace(part, version=2)], 0.2)


def test_policy_state_dict_merges_lora(local):
    from peft import LoraConfig, get_peft_model

    model, _ = local
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                 fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # B starts at zero; make the delta real
    state = policy_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(state) == set(expected) == set(model.state_dict())
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, atol=1e-6, rtol=0)
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(state[c_attn], model.state_dict()[c_attn])
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # tied: one copy
    copy.deepcopy(model).load_state_dict(state, strict=True)


# --- on Ray ----------------------------------------------------------------------------------------


def test_k_samples_shapes_and_logps(pool, local):
    model, tokenizer = local
    samples = pool.generate(PROMPTS, k=3, seed=11)
    assert samples.version == 0 and samples.seconds > 0
    assert samples.prompt_ids == render_prompts(tokenizer, PROMPTS, False, SETTINGS["max_prompt_length"])
    for field in ("completion_ids", "texts", "finished", "logps"):
        assert [len(row) for row in getattr(samples, field)] == [3] * len(PROMPTS), field
    for p in range(len(PROMPTS)):
        for j in range(3):
            completion = samples.completion_ids[p][j]
            assert 1 <= len(completion) <= SETTINGS["max_new_tokens"]
            assert len(samples.logps[p][j]) == len(completion)
            assert samples.texts[p][j] == tokenizer.decode(completion, skip_special_tokens=True).strip()
            assert all(lp <= 0 for lp in samples.logps[p][j])
    assert len({tuple(c) for c in samples.completion_ids[0]}) > 1  # k different samples
    _assert_logps_match(model, samples)


def test_seeded_sampling_is_deterministic(pool):
    first, again, other = (pool.generate(PROMPTS, k=2, seed=seed) for seed in (5, 5, 6))
    assert again.completion_ids == first.completion_ids and again.logps == first.logps
    assert other.completion_ids != first.completion_ids


def test_greedy_equals_hf_generate(pool, local):
    model, tokenizer = local
    samples = pool.generate(PROMPTS, k=4, seed=0, greedy=True)
    assert [len(row) for row in samples.completion_ids] == [1] * len(PROMPTS)  # greedy ignores k
    for p, prompt_ids in enumerate(samples.prompt_ids):
        assert samples.completion_ids[p][0] == _hf_greedy(model, tokenizer, prompt_ids), PROMPTS[p]
    _assert_logps_match(model, samples)


def test_eos_stops_each_sequence(pool, local):
    model, tokenizer = local
    eos = tokenizer.eos_token_id
    heavy = _eos_heavy(model, eos)
    pool.push_weights(policy_state_dict(heavy), version=7)
    try:
        samples = pool.generate(PROMPTS, k=4, seed=3)
        greedy = pool.generate(PROMPTS[:2], k=1, seed=3, greedy=True)
    finally:
        pool.push_weights(policy_state_dict(model), version=8)
    assert samples.version == 7
    flat = [(c, f) for cs, fs in zip(samples.completion_ids, samples.finished, strict=True)
            for c, f in zip(cs, fs, strict=True)]
    assert {f for _, f in flat} == {True, False}, "want both finished and cut-off samples"
    for completion, finished in flat:
        assert eos not in completion[:-1]  # nothing after the first EOS, no padding
        assert (completion[-1] == eos) == finished
        assert finished or len(completion) == SETTINGS["max_new_tokens"]
    assert greedy.completion_ids == [[[eos]], [[eos]]] and greedy.texts == [[""], [""]]
    _assert_logps_match(heavy, samples)


def test_push_weights_changes_output_and_version(pool, local):
    model, tokenizer = local
    before = pool.generate(PROMPTS, k=1, seed=0, greedy=True)
    moved = _perturbed(model)
    seconds = pool.push_weights(policy_state_dict(moved), version=12)
    assert seconds > 0 and pool.version() == 12
    after = pool.generate(PROMPTS, k=1, seed=0, greedy=True)
    assert after.version == 12 and after.completion_ids != before.completion_ids
    for p, prompt_ids in enumerate(after.prompt_ids):
        assert after.completion_ids[p][0] == _hf_greedy(moved, tokenizer, prompt_ids), PROMPTS[p]
    pool.push_weights(policy_state_dict(model), version=13)


def test_connect_by_name_from_a_task(pool, ray_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0.5)
    def generate_elsewhere(names: list[str]) -> tuple[Samples, int]:
        from whetstone.online.generation import GenerationPool

        connected = GenerationPool.connect(names)
        return connected.generate(PROMPTS, k=2, seed=21), connected.version()

    remote_samples, remote_version = ray.get(generate_elsewhere.remote(pool.names))
    here = pool.generate(PROMPTS, k=2, seed=21)
    assert remote_version == pool.version() == here.version == remote_samples.version
    assert remote_samples.completion_ids == here.completion_ids and remote_samples.logps == here.logps
