"""Small datasets shipped with the package, so the demo runs without any download."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Folder of a shipped dataset, e.g. ``path("scifact-subset")``."""
    folder = _HERE / name
    if not folder.is_dir():
        shipped = sorted(p.name for p in _HERE.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise FileNotFoundError(f"no shipped dataset {name!r}; shipped: {shipped}")
    return folder
