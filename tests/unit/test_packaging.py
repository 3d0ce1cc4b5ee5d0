"""Packaging: every runtime dependency is imported by the code that ships, a library takes version
ranges rather than exact pins, and the licence files the metadata names exist."""

from __future__ import annotations

import re

import tomllib

from tests.conftest import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# distribution name -> the module it installs, where the two differ
IMPORT_NAMES = {"pyyaml": "yaml", "sentence-transformers": "sentence_transformers", "tensorboardx": "tensorboardX"}
SHIPPED = ("library", "jobs", "services")


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()


def shipped_imports() -> set[str]:
    names = set()
    for folder in SHIPPED:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.M))
    return names


def test_every_runtime_dependency_is_imported():
    imported = shipped_imports()
    unused = [r for r in PYPROJECT["project"]["dependencies"]
              if IMPORT_NAMES.get(_name(r), _name(r).replace("-", "_")) not in imported]
    assert not unused, f"declared in pyproject.toml but imported nowhere in {SHIPPED}: {unused}"


def test_runtime_dependencies_are_ranges_not_pins():
    pinned = [r for r in PYPROJECT["project"]["dependencies"] if "==" in r]
    assert not pinned, f"a library takes ranges (cluster/pins.txt pins deployments): {pinned}"


def test_licence_files_exist():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    for pattern in PYPROJECT["project"]["license-files"]:
        assert list(REPO_ROOT.glob(pattern)), pattern
    assert "Apache License" in (REPO_ROOT / "LICENSE").read_text()
    notice = (REPO_ROOT / "NOTICE").read_text()
    for dataset in (REPO_ROOT / "library" / "whetstone" / "datasets").iterdir():
        if dataset.is_dir() and not dataset.name.startswith("_"):
            assert dataset.name in notice, f"NOTICE does not name the shipped dataset {dataset.name}"
            assert "licen" in (dataset / "README.md").read_text().lower()
