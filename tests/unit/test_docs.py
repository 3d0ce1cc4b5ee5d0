"""Every reference the docs make exists: repository paths, ``python -m`` modules and Serve import
paths, config fields named in ``key=value`` overrides, and HTTP routes.

Read: README.md, docs/, cluster/, k8s/ and the shipped job configs (their header comments are
launch lines). Config fields are checked against every job's config model and the Serve apps'
argument models, so a field that exists in none (``train.use_gpu``) fails; HTTP routes against
the routes the index and embedding apps really register, under the prefixes of
services/index/serve_config.yaml.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

TOP_DIRS = ("library", "jobs", "services", "cluster", "k8s", "tests", "benchmarks", "docs", ".ci")
TOP_FILES = ("Makefile", "pyproject.toml", "README.md", "LICENSE", "NOTICE")
SERVE_BUILTIN_ROUTES = {"/-/healthz", "/-/routes"}
NOT_CONFIG_KEYS = {"key"}  # the placeholder in "`key=value` overrides"


def doc_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for folder in ("cluster", "k8s", "jobs/configs"):
        files += sorted(p for p in (REPO_ROOT / folder).rglob("*") if p.is_file() and p.suffix != ".pyc"
                        and not p.is_symlink())
    return files


def text_of(path: Path) -> str:
    """Markdown and YAML whole; for code, its comments and docstrings are what users read, but
    the whole file is small enough to scan and a path in code must exist too."""
    return path.read_text(errors="replace")


# ------------------------------------------------------------------------------- extractors

_DIRS = "|".join(re.escape(d) for d in TOP_DIRS)
_FILES = "|".join(re.escape(f) for f in TOP_FILES)
PATH_RE = re.compile(rf"(?<![\w./$~-])((?:{_DIRS})/[\w./\-]*|(?:{_FILES})(?![\w.]))")
MODULE_RE = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
IMPORT_PATH_RE = re.compile(r"\b((?:services|jobs|whetstone)(?:\.\w+)+):(\w+)")
OVERRIDE_RE = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=[`'\"(]))([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=(?![=\s])", re.M)
ROUTE_RE = re.compile(r"(?:(?<=[\s`'\"(])|(?<=:\d{4}))(/(?:index|embed|reward|-)(?:/[\w.\-]*)*)")


def repo_paths(text: str) -> set[str]:
    out = set()
    for match in PATH_RE.finditer(text):
        path = match.group(1).rstrip(".,:;)")
        if any(c in path for c in "<>{}*") or "..." in path:
            continue
        out.add(path)
    return out


def missing_paths(text: str) -> list[str]:
    return sorted(p for p in repo_paths(text) if not (REPO_ROOT / p.rstrip("/")).exists())


def missing_modules(text: str) -> list[str]:
    bad = [m for m in MODULE_RE.findall(text) if importlib.util.find_spec(m.rstrip(".")) is None]
    for module, attribute in IMPORT_PATH_RE.findall(text):
        try:
            if not hasattr(importlib.import_module(module), attribute):
                bad.append(f"{module}:{attribute}")
        except ImportError:
            bad.append(f"{module}:{attribute}")
    return sorted(set(bad))


@cache
def known_fields() -> frozenset[str]:
    """Every field of every job's config and of the Serve apps' arguments, dotted."""
    from whetstone.config.base import StrictModel, iter_fields

    fields: set[str] = set()
    for job in sorted(p.stem for p in (REPO_ROOT / "jobs").glob("*.py") if p.stem != "__init__"):
        module = importlib.import_module(f"jobs.{job}")
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, StrictModel) and name.endswith("Config"):
                fields |= {key for key, _ in iter_fields(value)}
    from services.embed.app import EmbedServiceArgs
    from services.index.app import IndexServiceArgs
    from services.reward.app import RewardServiceArgs

    for args in (IndexServiceArgs, EmbedServiceArgs, RewardServiceArgs):
        fields |= {key for key, _ in iter_fields(args)}
    return frozenset(fields)


def override_keys(text: str) -> set[str]:
    """Dotted ``a.b=`` words anywhere; plain ``key=`` words in an inline code span or on a job's
    command line (backslash continuations joined), where every ``key=value`` is an override."""
    keys = {k for k in OVERRIDE_RE.findall(text) if "." in k}
    keys |= set(re.findall(r"`([a-z_][a-z0-9_]*)=[^`\s]", text))  # `if_exists=resume` in prose
    for line in re.sub(r"\\\n\s*#?", " ", text).splitlines():
        if re.search(r"-m\s+jobs\.|\bwhetstone\s+[a-z-]+\s|\bserve\s+run\b", line):
            keys |= set(OVERRIDE_RE.findall(line))
    return keys


def unknown_fields(text: str) -> list[str]:
    return sorted(k for k in override_keys(text) if k not in known_fields() and k not in NOT_CONFIG_KEYS)


@cache
def known_routes() -> frozenset[str]:
    """``/index/...`` and ``/embed/...`` as the apps register them, under the Serve config's prefixes,
    and ``/reward/...`` under the reward service's default prefix."""
    from whetstone.online.reward_client import ROUTE_PREFIX

    from services.embed import app as embed
    from services.index import router as index
    from services.reward import app as reward

    prefixes = {a["import_path"].split(":")[0]: a["route_prefix"] for a in
                yaml.safe_load((REPO_ROOT / "services" / "index" / "serve_config.yaml").read_text())["applications"]}
    prefixes["services.reward.app"] = ROUTE_PREFIX
    routes = set(SERVE_BUILTIN_ROUTES)
    for module, app in (("services.index.app", index.fastapi_app), ("services.embed.app", embed.app),
                        ("services.reward.app", reward.app)):
        for route_path in _route_paths(app.routes):
            path = prefixes[module].rstrip("/") + route_path
            routes |= {path, path.rstrip("/") or "/"}
    return frozenset(routes)


def _route_paths(routes) -> list[str]:
    """Paths of a FastAPI app's routes, through routers included into it (Serve's ingress class)."""
    out = []
    for route in routes:
        if hasattr(route, "path"):
            out.append(route.path)
        elif hasattr(route, "original_router"):
            out += _route_paths(route.original_router.routes)
    return out


def unknown_routes(text: str) -> list[str]:
    return sorted({r.rstrip(".,:;)") for r in ROUTE_RE.findall(text)} - known_routes() - {"/index", "/embed", "/reward"})


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_reference_in_the_docs_exists(path: Path):
    text = text_of(path)
    problems = {
        "paths that do not exist": missing_paths(text),
        "modules or import paths that do not import": missing_modules(text),
        "key=value overrides naming no config field": unknown_fields(text),
        "HTTP routes no app serves": unknown_routes(text),
    }
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"{path.relative_to(REPO_ROOT)}: {problems}"


def test_the_checks_catch_the_broken_references_that_shipped():
    """The references issue #25 found broken: each is reported by the check that covers it."""
    assert missing_paths("python -m jobs.train_contrastive --config jobs/configs/train_contrastive/s3.yaml") == [
        "jobs/configs/train_contrastive/s3.yaml"]
    assert unknown_fields("for `train.use_gpu=true` runs") == ["train.use_gpu"]
    assert unknown_fields("for `optim.use_gpu=true` runs") == []
    assert unknown_routes("curl -s localhost:8000/index/health") == ["/index/health"]
    assert unknown_routes("curl -s localhost:8000/index/healthz") == []
    assert missing_modules("python -m jobs.train_contrastiv --config x") == ["jobs.train_contrastiv"]
    assert missing_modules("serve run services.index.app:build_ap") == ["services.index.app:build_ap"]


def test_the_cluster_walkthrough_joins_up():
    """docs/deploy.md's order: ingest -> train -> refresh/evaluate -> RayService. One store, one run."""
    configs = REPO_ROOT / "jobs" / "configs"

    def load(name: str) -> dict:
        return yaml.safe_load((configs / name).read_text())

    store = load("ingest/s3.yaml")["store_uri"]
    train = load("train_contrastive/scifact.yaml")
    assert store.startswith("s3://") and train["store_uri"] == store
    run = f"{store}/runs/{train['run_name']}"
    assert load("refresh_index/scifact.yaml")["store_uri"] == store
    assert load("refresh_index/scifact.yaml")["index_uri"] == f"{run}/index"
    assert load("evaluate/scifact.yaml")["store_uri"] == store
    rayjob = yaml.safe_load((REPO_ROOT / "k8s" / "base" / "ray-job.train-contrastive.yaml").read_text())
    assert "train_contrastive/scifact.yaml" in rayjob["spec"]["entrypoint"]
    assert f"store_uri={store}" in rayjob["spec"]["entrypoint"] or "store_uri=" not in rayjob["spec"]["entrypoint"]
    serve = yaml.safe_load((REPO_ROOT / "services" / "index" / "serve_config.yaml").read_text())
    for app in serve["applications"]:
        if "index_uri" in app.get("args", {}):
            assert app["args"]["index_uri"] == f"{run}/index", app["name"]
