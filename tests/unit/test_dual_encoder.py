"""DualEncoder's chunked, length-sorted forward gives the same embeddings and gradients as one batch."""

from __future__ import annotations

import pytest
import torch
from whetstone.models.encoder import Encoder, set_dropout
from whetstone.train.contrastive import DualEncoder


def _ragged_batch(rows: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (rows,), generator=generator)
    ids = torch.randint(1000, 2000, (rows, width), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # right padding
    return ids * mask, mask


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_chunked_forward_equals_one_batch_in_values_and_gradients(tiny_encoder_dir, chunk_size):
    encoder = Encoder.load(str(tiny_encoder_dir)).eval()  # no dropout: the two runs must match exactly
    queries, docs = _ragged_batch(7, 12, seed=1), _ragged_batch(11, 40, seed=2)

    def run(chunk):
        encoder.zero_grad(set_to_none=True)
        q, d = DualEncoder(encoder, chunk)(*queries, *docs)
        (q @ d.T).logsumexp(dim=1).mean().backward()
        grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
        return q.detach(), d.detach(), grads

    q_ref, d_ref, g_ref = run(None)
    q, d, g = run(chunk_size)
    assert torch.allclose(q, q_ref, atol=1e-5) and torch.allclose(d, d_ref, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert torch.allclose(g[name], g_ref[name], atol=1e-5), name


def test_chunk_size_must_be_positive(tiny_encoder_dir):
    with pytest.raises(ValueError, match="chunk_size"):
        DualEncoder(Encoder.load(str(tiny_encoder_dir)), 0)


def test_load_is_eval_mode_and_encode_restores_the_mode_it_found(tiny_encoder_dir):
    # Regression: from_pretrained left only the transformer in eval mode, so encode()'s restore of
    # the wrapper's mode switched dropout on behind the trainer's back.
    encoder = Encoder.load(str(tiny_encoder_dir))
    assert not any(module.training for module in encoder.modules())
    encoder.encode(["a claim", "another"])
    assert not any(module.training for module in encoder.modules())
    encoder.train()
    encoder.encode(["a claim"])
    assert all(module.training for module in encoder.modules())


def test_set_dropout_controls_train_mode_noise(tiny_encoder_dir):
    encoder = Encoder.load(str(tiny_encoder_dir)).train()
    ids, mask = _ragged_batch(5, 16, seed=3)
    assert set_dropout(encoder, 0.0) > 0
    with torch.no_grad():
        first, second = encoder(ids, mask), encoder(ids, mask)
    assert torch.equal(first, second)  # no dropout: train mode is deterministic
    set_dropout(encoder, 0.3)
    with torch.no_grad():
        noisy = encoder(ids, mask)
    assert not torch.allclose(noisy, first, atol=1e-4)
    encoder.eval()  # eval mode ignores the probability
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), first, atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        set_dropout(encoder, 1.0)


def test_bfloat16_autocast_runs_the_transformer_in_bf16_and_keeps_float32_outside(tiny_encoder_dir):
    encoder = Encoder.load(str(tiny_encoder_dir)).eval()
    queries, docs = _ragged_batch(6, 12, seed=4), _ragged_batch(9, 40, seed=5)
    seen: list[torch.dtype] = []  # output dtypes of the transformer's linear layers (its final LayerNorm is fp32)
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in encoder.transformer.modules() if isinstance(m, torch.nn.Linear)]

    def run(autocast):
        encoder.zero_grad(set_to_none=True)
        q, d = DualEncoder(encoder, 4, autocast=autocast)(*queries, *docs)
        (q @ d.T / 0.05).logsumexp(dim=1).mean().backward()
        grads = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
        return q.detach(), d.detach(), grads

    q32, d32, g32 = run(None)
    assert set(seen) == {torch.float32}
    seen.clear()
    q16, d16, g16 = run(torch.bfloat16)
    for hook in hooks:
        hook.remove()
    assert set(seen) == {torch.bfloat16}  # the transformer really ran in bf16 ...
    assert q16.dtype == d16.dtype == g16.dtype == torch.float32  # ... embeddings and gradients did not
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert torch.allclose(q16.norm(dim=1), torch.ones(6), atol=1e-5)  # normalised in float32
    # Close to float32 but not identical (bf16 keeps 8 bits of mantissa).
    cosine = torch.nn.functional.cosine_similarity(torch.cat([q16, d16]), torch.cat([q32, d32]))
    assert cosine.min() > 0.99 and not torch.equal(q16, q32)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.95


def test_autocast_none_leaves_a_callers_autocast_in_force(tiny_encoder_dir):
    encoder = Encoder.load(str(tiny_encoder_dir)).eval()
    ids, mask = _ragged_batch(3, 10, seed=6)
    seen: list[torch.dtype] = []
    for module in encoder.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(ids, mask)
    assert seen and set(seen) == {torch.bfloat16} and out.dtype == torch.float32
