"""Chunked causal-LM log-probs and preference batching on a tiny random-init GPT-2 with the real tokenizer.

The reference everywhere is the naive computation: the model's full (B, L, V) logits,
``log_softmax`` in float32, gather the next token, sum over the completion positions.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from whetstone.models.policy import (
    PreferenceBatch,
    build_preference_batch,
    label_logps,
    preference_logps,
    sequence_logps,
)

from tests.conftest import free_port
from tests.unit.policy_ddp_worker import ddp_worker, tiny_gpt2

PROMPTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a short joke about cats.\n\nAssistant:",
    "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant:",
]
CHOSEN = [" Paris.", " Why did the cat sit on the computer? To keep an eye on the mouse.", " It is not advised."]
REJECTED = [" I don't know, maybe Lyon", " No.", " Sure, eat as much raw dough and raw eggs as you like, nothing can go wrong."]


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


def naive_logps(model, input_ids, attention_mask, loss_mask):
    """Full-vocabulary reference: (B, L, V) logits -> float32 log_softmax -> gather -> masked sum."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    token_logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(2, input_ids[:, 1:, None]).squeeze(2)
    mask = (loss_mask[:, 1:] * attention_mask[:, 1:]).float()  # (B, L-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1).long()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_sequence_logps_equals_naive(model, tokenizer, chunk_size):
    batch = build_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=128, max_prompt_length=64)
    ours, counts = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size=chunk_size)
    expected, expected_counts = naive_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == expected_counts.tolist()
    assert ours.dtype == torch.float32 and (ours < 0).all()


def test_sequence_logps_gradient_equals_naive(model, tokenizer):
    batch = build_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=128, max_prompt_length=64)
    weights = torch.linspace(-1.0, 2.0, batch.input_ids.shape[0])  # distinct per row, so rows are not mixed up
    grads = []
    for fn in (lambda *a: sequence_logps(*a, chunk_size=5), naive_logps):
        model.zero_grad()
        sums, _ = fn(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
        (sums * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    for name, grad in grads[1].items():
        # Float32 sums in a different order: compare relative to the gradient's own scale.
        relative = (grads[0][name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert relative < 1e-5, f"{name}: relative gradient error {relative:.2e}"
    assert grads[1]["transformer.wte.weight"].abs().sum() > 0  # the tied output layer really got a gradient


def test_label_logps_matches_linear_log_softmax_with_bias():
    """Untied head with a bias, float64 gradcheck of the custom backward on a small vocabulary."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,), generator=gen)
    expected = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(label_logps(hidden, weight, labels, bias, chunk_size=4).double(), expected, rtol=1e-6, atol=1e-6)

    def fn(h, w, b):
        return label_logps(h, w, labels, b, chunk_size=4)

    # The forward casts logits to float32, so check the backward against float32-level tolerances.
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_left_padding_gives_the_same_logps(model, tokenizer):
    batch = build_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=128, max_prompt_length=64)
    right, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    lengths = batch.attention_mask.sum(1)
    width = batch.input_ids.shape[1]
    left = [torch.roll(t, shifts=int(width - n), dims=0) for t, n in zip(batch.input_ids, lengths, strict=True)]
    left_mask = [torch.roll(t, shifts=int(width - n), dims=0) for t, n in zip(batch.attention_mask, lengths, strict=True)]
    left_loss = [torch.roll(t, shifts=int(width - n), dims=0) for t, n in zip(batch.loss_mask, lengths, strict=True)]
    got, _ = sequence_logps(model, torch.stack(left), torch.stack(left_mask), torch.stack(left_loss))
    torch.testing.assert_close(got, right, atol=1e-4, rtol=1e-5)


def test_batch_layout_masks_prompt_and_ends_completions_with_eos(tokenizer):
    batch = build_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=128, max_prompt_length=64)
    pairs = len(PROMPTS)
    assert batch.num_pairs == pairs and batch.input_ids.shape[0] == 2 * pairs
    assert not batch.truncated.any()
    for row in range(2 * pairs):
        pair, completion_text = row % pairs, (CHOSEN + REJECTED)[row]
        prompt_ids = tokenizer(PROMPTS[pair])["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n_prompt, n_total = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        assert batch.prompt_lengths[row] == n_prompt
        assert batch.input_ids[row, :n_total].tolist() == prompt_ids + completion_ids
        assert batch.loss_mask[row, :n_prompt].sum() == 0, "prompt tokens must be masked out"
        assert batch.loss_mask[row, n_prompt:n_total].all() and batch.loss_mask[row, n_total:].sum() == 0
        assert batch.attention_mask[row].sum() == n_total
    chosen_ids, rejected_ids = PreferenceBatch.split(batch.input_ids)
    for pair in range(pairs):  # both rows of a pair carry the identical prompt tokens
        n = int(batch.prompt_lengths[pair])
        assert chosen_ids[pair, :n].tolist() == rejected_ids[pair, :n].tolist()


def test_plain_text_completion_keeps_text_after_an_inner_eos(tokenizer):
    """Only chat-templated completions are cut after their last EOS; plain text is kept whole."""
    batch = build_preference_batch(tokenizer, ["Q:"], [" a<|endoftext|> b"], [" c"], 32, 16)
    completion = batch.input_ids[0][batch.loss_mask[0].bool()].tolist()
    assert tokenizer.decode(completion) == " a<|endoftext|> b<|endoftext|>"


def test_prompt_tokens_do_not_count(model, tokenizer):
    """Changing the prompt's last word changes the completion's context but must not add prompt terms."""
    batch = build_preference_batch(tokenizer, PROMPTS, CHOSEN, REJECTED, max_length=128, max_prompt_length=64)
    out = preference_logps(model, batch)
    full_mask = batch.attention_mask.clone()  # score every token instead
    everything, _ = sequence_logps(model, batch.input_ids, batch.attention_mask, full_mask)
    chosen_all, _ = PreferenceBatch.split(everything)
    assert (chosen_all < out["chosen_logps"] - 1.0).all()  # prompt tokens would add (negative) log-probs
    counts_c, counts_r = PreferenceBatch.split(batch.loss_mask.sum(1))
    assert out["chosen_token_counts"].tolist() == counts_c.tolist()
    assert out["rejected_token_counts"].tolist() == counts_r.tolist()


def test_truncation_rules(tokenizer):
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(60)) + "\n\nAssistant:"
    long_completion = " " + " ".join(f"answer{i}" for i in range(60))
    prompt_ids = tokenizer(long_prompt)["input_ids"]
    long_ids = tokenizer(long_completion, add_special_tokens=False)["input_ids"]
    short_ids = tokenizer(" Fine.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    max_length, max_prompt = 48, 16
    batch = build_preference_batch(tokenizer, [long_prompt], [" Fine."], [long_completion], max_length, max_prompt)
    # Rule 1: the prompt keeps its LAST max_prompt_length tokens (the text nearest the response).
    assert batch.prompt_lengths.tolist() == [max_prompt, max_prompt]
    assert batch.input_ids[0, :max_prompt].tolist() == prompt_ids[-max_prompt:]
    assert batch.input_ids[1, :max_prompt].tolist() == prompt_ids[-max_prompt:]
    # Rule 2: the long completion keeps its FIRST tokens and loses the EOS; the short one is whole.
    budget = max_length - max_prompt
    assert batch.input_ids[1, max_prompt:].tolist() == long_ids[:budget]
    assert batch.attention_mask[1].sum() == max_length and batch.loss_mask[1].sum() == budget
    assert batch.input_ids[0, max_prompt : max_prompt + len(short_ids)].tolist() == short_ids
    assert batch.truncated.tolist() == [True, True]
    # A pair that fits keeps a prompt longer than max_prompt_length untouched.
    fits = build_preference_batch(tokenizer, [long_prompt], [" a"], [" b"], len(prompt_ids) + 8, max_prompt)
    assert fits.prompt_lengths.tolist() == [len(prompt_ids)] * 2 and not fits.truncated.any()


def test_chat_template_is_respected(tokenizer):
    templated = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    batch = build_preference_batch(templated, [messages], ["Hello!"], ["Go away."], 128, 64, chat_template=True)
    prompt_text = templated.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_prompt = int(batch.prompt_lengths[0])
    assert templated.decode(batch.input_ids[0, :n_prompt]) == prompt_text
    for row, text in enumerate(["Hello!", "Go away."]):
        completion = batch.input_ids[row][batch.loss_mask[row].bool()].tolist()
        # The template's trailing newline after the end-of-turn token is dropped: EOS ends the completion.
        assert completion[-1] == templated.eos_token_id
        assert templated.decode(completion) == text + "<|endoftext|>"
    with pytest.raises(ValueError, match="has no chat template"):
        build_preference_batch(tokenizer, ["x"], ["y"], ["z"], 32, 16, chat_template=True)


def test_ddp_wrapped_model_synchronises_gradients(tokenizer, tmp_path):
    """Two gloo ranks score half the rows each through DDP; DDP averages, so every rank must hold
    half the single-process gradient of all rows. Calling the decoder submodule directly would skip
    DDP's forward and leave each rank with its own, unsynchronised gradient."""
    batch = build_preference_batch(tokenizer, PROMPTS[:2], CHOSEN[:2], REJECTED[:2], max_length=96, max_prompt_length=48)
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "loss_mask": batch.loss_mask}
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), tensors, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    single = tiny_gpt2()
    sums, _ = sequence_logps(single, batch.input_ids, batch.attention_mask, batch.loss_mask)
    (sums.sum() / 2).backward()
    for name, param in single.named_parameters():
        for grads in ranks:
            relative = (grads[name] - param.grad).norm() / param.grad.norm().clamp(min=1e-12)
            assert relative < 1e-5, f"{name}: relative gradient error {relative:.2e}"


def test_bad_arguments_raise_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="equally long; got 2, 1, 1"):
        build_preference_batch(tokenizer, ["a", "b"], ["c"], ["d"], 32, 16)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        build_preference_batch(tokenizer, ["a"], ["c"], ["d"], 16, 16)
    with pytest.raises(ValueError, match="must all be"):
        sequence_logps(None, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), torch.ones(2, 3))
