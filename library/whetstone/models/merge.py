"""Merge a fine-tuned encoder with its base model by weight interpolation.

Fine-tuning an embedding model on one domain costs it some of its general ability (here: the
transfer set msmarco-dl19 loses about 0.6 nDCG@10 after three epochs on scifact). Averaging the
weights of the fine-tuned and the base model keeps much of the in-domain gain and gives back much
of the general ability: WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903) for zero-shot vision
models, LM-Cocktail (Xiao et al. 2023, arXiv 2311.13534) for embedding models and LLMs. Both
interpolate parameters linearly:

    merged = (1 - base_weight) * fine_tuned + base_weight * base

``base_weight`` 0 is the fine-tuned model, 1 the base; WiSE-FT reports its best robustness /
accuracy trade-offs around 0.3 to 0.7. The two models must share an architecture (the fine-tuned
model was trained from the base), which is checked tensor by tensor.

Measured here it trades poorly (``benchmarks/contrastive_transfer.py``: MiniLM, 15 steps of live
negatives on scifact): at base weight 0.5 the model keeps +3.1 of the +5.8 scifact nDCG@10 points
but still loses 0.58 of the 0.67 msmarco-dl19 points; the transfer loss comes early on the line
from the base, the in-domain gain late. Worth trying per task, not a default.
"""

from __future__ import annotations

import tempfile

import torch

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.models.encoder import Encoder


class MergeError(ValueError):
    """The two models cannot be merged (different tensors or shapes); names the first mismatch."""


def interpolate_state(fine_tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                      base_weight: float) -> dict[str, torch.Tensor]:
    """``(1 - w) * fine_tuned + w * base`` for every floating-point tensor; integer buffers (e.g.
    position ids) must be equal and are kept.

    Raises:
        MergeError: the state dicts hold different names or shapes, or differing integer buffers.
    """
    if not 0.0 <= base_weight <= 1.0:
        raise ValueError(f"base_weight must be in [0, 1], got {base_weight}")
    missing, extra = sorted(set(fine_tuned) - set(base)), sorted(set(base) - set(fine_tuned))
    if missing or extra:
        raise MergeError(f"the models hold different tensors: only in the fine-tuned model {missing[:5]}, "
                         f"only in the base {extra[:5]}")
    merged = {}
    for name, tuned in fine_tuned.items():
        other = base[name]
        if tuned.shape != other.shape:
            raise MergeError(f"tensor {name!r}: shape {tuple(tuned.shape)} in the fine-tuned model, "
                             f"{tuple(other.shape)} in the base")
        if tuned.is_floating_point():
            merged[name] = torch.lerp(tuned.float(), other.to(tuned.device).float(), base_weight).to(tuned.dtype)
        else:
            if not torch.equal(tuned, other.to(tuned.device)):
                raise MergeError(f"integer tensor {name!r} differs between the models")
            merged[name] = tuned
    return merged


def merge_with_base(fine_tuned_uri: str, base_uri: str, base_weight: float, out_uri: str,
                    storage: StorageConfig | None = None) -> str:
    """Write the merged encoder (sentence-transformers layout) to ``out_uri`` and return it."""
    tuned = Encoder.load(fine_tuned_uri, device="cpu", storage=storage)
    base = Encoder.load(base_uri, device="cpu", storage=storage)
    state = interpolate_state(tuned.transformer.state_dict(), base.transformer.state_dict(), base_weight)
    tuned.transformer.load_state_dict(state)
    # An asymmetric model's frozen query tower is carried over as it is.
    query_tower = Encoder.load_query_tower(fine_tuned_uri, device="cpu", storage=storage)
    if store.is_s3(out_uri):
        with tempfile.TemporaryDirectory() as folder:
            tuned.save(folder, query_tower=query_tower)
            store.upload_dir(folder, out_uri, storage)
    else:
        tuned.save(out_uri, query_tower=query_tower)
    return out_uri
