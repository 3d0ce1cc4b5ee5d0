"""Weight interpolation with the base model (WiSE-FT / LM-Cocktail)."""

from __future__ import annotations

import pytest
import torch
from whetstone.models.merge import MergeError, interpolate_state, merge_with_base


def test_interpolate_state_is_linear_and_keeps_integer_buffers():
    tuned = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1, 2])}
    base = {"w": torch.tensor([3.0, -1.0]), "ids": torch.tensor([0, 1, 2])}
    assert torch.equal(interpolate_state(tuned, base, 0.25)["w"], torch.tensor([1.5, 2.0]))
    assert torch.equal(interpolate_state(tuned, base, 0.0)["w"], tuned["w"])
    assert torch.equal(interpolate_state(tuned, base, 1.0)["w"], base["w"])
    assert interpolate_state(tuned, base, 0.5)["ids"] is tuned["ids"]


def test_interpolate_state_names_the_first_mismatch():
    with pytest.raises(MergeError, match="only in the base \\['extra'\\]"):
        interpolate_state({"w": torch.ones(2)}, {"w": torch.ones(2), "extra": torch.ones(1)}, 0.5)
    with pytest.raises(MergeError, match="tensor 'w': shape \\(2,\\).*\\(3,\\)"):
        interpolate_state({"w": torch.ones(2)}, {"w": torch.ones(3)}, 0.5)
    with pytest.raises(MergeError, match="integer tensor 'ids' differs"):
        interpolate_state({"ids": torch.tensor([0, 1])}, {"ids": torch.tensor([1, 0])}, 0.5)
    with pytest.raises(ValueError, match="base_weight"):
        interpolate_state({}, {}, 1.5)


def test_merge_with_base_writes_a_loadable_midpoint(tiny_encoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from whetstone.models.encoder import Encoder

    tuned = Encoder.load(str(tiny_encoder_dir), device="cpu")
    with torch.no_grad():
        for param in tuned.transformer.parameters():
            param.add_(0.5)
    tuned.save(tmp_path / "tuned")
    out = merge_with_base(str(tmp_path / "tuned"), str(tiny_encoder_dir), 0.5, str(tmp_path / "merged"))
    merged = Encoder.load(out, device="cpu").transformer.state_dict()
    base = Encoder.load(str(tiny_encoder_dir), device="cpu").transformer.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(merged[name], base[name] + 0.25, atol=1e-6)
    assert SentenceTransformer(out, device="cpu").encode(["a claim"]).shape == (1, 32)
