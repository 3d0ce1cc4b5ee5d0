"""Every job's command line: ``--help`` lists the job's config fields (dotted, with type, default and
description, by section) and ``--version`` prints the package version; the ``whetstone`` command
passes both through."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from whetstone.config.base import iter_fields

from tests.conftest import REPO_ROOT


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'library'}:{REPO_ROOT}"}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def _help(job: str, capsys) -> str:
    module = importlib.import_module(f"jobs.{job}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_contrastive_help_lists_every_field_with_type_default_and_description(capsys):
    from whetstone.config.contrastive import ContrastiveJobConfig

    text = _help("train_contrastive", capsys)
    assert "  optim.batch_size  int = 16\n      queries per worker per step\n" in text
    assert "  negatives.mining.rank_end  int = 30\n      one past the last rank kept\n" in text
    assert "  if_exists  {error,overwrite,resume} = \"error\"\n" in text
    assert "  tracking.tensorboard  bool = true\n" in text and "  progress_every_s  float = 10.0\n" in text
    assert "\nnegatives.mining:\n" in text and "\noptim:\n" in text  # grouped by section
    assert "  multitask.tasks[].share  float required\n" in text  # list items' fields, required ones marked

    missing = [key for key, _ in iter_fields(ContrastiveJobConfig) if f"\n  {key}  " not in text]
    assert missing == []


@pytest.mark.parametrize("job, config", [
    ("ingest", "jobs.ingest:IngestJobConfig"),
    ("train_preference", "whetstone.config.preference:PreferenceJobConfig"),
    ("refresh_index", "jobs.refresh_index:RefreshIndexJobConfig"),
    ("evaluate", "jobs.evaluate:EvaluateJobConfig"),
    ("quickstart", "whetstone.config.contrastive:QuickstartConfig"),
])
def test_every_job_lists_its_own_fields(job, config, capsys):
    from whetstone.config.base import describe_fields

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    text = _help(job, capsys)
    assert "\n".join(describe_fields(cls)) in text
    assert "\n  progress_every_s  float = 10.0\n" in text


@pytest.mark.parametrize("job", sorted(path.stem for path in (REPO_ROOT / "jobs").glob("*.py")
                                        if path.stem != "__init__"))
def test_every_config_field_of_every_job_has_a_description(job):
    """--help stays complete: a field added without ``description=`` shows only its type and default."""
    from whetstone.config.base import StrictModel

    module = importlib.import_module(f"jobs.{job}")
    configs = {name: value for name, value in vars(module).items()
               if isinstance(value, type) and issubclass(value, StrictModel)
               and (name.endswith("JobConfig") or name == "QuickstartConfig")}
    assert configs, f"jobs.{job} names no job config"
    for name, config in configs.items():
        undescribed = [key for key, info in iter_fields(config) if not (info.description or "").strip()]
        assert undescribed == [], f"{name}: fields without a description: {undescribed}"


def test_version_of_a_job_and_of_the_whetstone_command():
    from whetstone import version

    expected = f"whetstone {version()}"
    assert expected.split()[1][0].isdigit()
    for result in (_run("jobs.train_contrastive", "--version"), _run("whetstone.cli", "--version"),
                   _run("whetstone.cli", "evaluate", "--version")):
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_whetstone_job_help_names_the_command_and_the_fields():
    result = _run("whetstone.cli", "train-contrastive", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: whetstone train-contrastive ")
    assert "  optim.batch_size  int = 16\n" in result.stdout and "  negatives.mining.rank_end  int = 30\n" in result.stdout
    top = _run("whetstone.cli", "--help")
    assert top.returncode == 0 and "--version" in top.stdout and "train-contrastive" in top.stdout
