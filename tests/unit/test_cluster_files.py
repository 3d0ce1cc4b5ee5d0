"""The files in cluster/: scripts parse and run their no-cluster paths, the runtime env and the
cluster launcher YAML pass Ray's own validation, and every place that pins Ray or torch agrees.

Starting a real cluster with cluster/local.sh belongs to the e2e tests; here nothing starts Ray.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER = REPO_ROOT / "cluster"
LOCAL_SH = CLUSTER / "local.sh"


def run_local_sh(*args: str, state_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHETSTONE_CLUSTER_DIR": str(state_dir)}
    return subprocess.run([str(LOCAL_SH), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("script", sorted(CLUSTER.glob("*.sh")), ids=lambda p: p.name)
def test_scripts_are_executable_and_parse(script: Path):
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    assert script.read_text().startswith("#!/usr/bin/env bash"), f"{script} has no bash shebang"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n {script}:\n{result.stderr}"


def test_local_sh_commands_without_a_cluster(tmp_path: Path):
    help_text = run_local_sh("--help", state_dir=tmp_path)
    assert help_text.returncode == 0 and "local.sh start" in help_text.stdout

    unknown = run_local_sh("launch", state_dir=tmp_path)
    assert unknown.returncode == 2 and "Usage" not in unknown.stdout

    for command in ("env", "address"):
        result = run_local_sh(command, state_dir=tmp_path)
        assert result.returncode == 1
        assert f"no cluster recorded in {tmp_path}" in result.stderr

    bad_option = run_local_sh("start", "--num-cpu", "4", state_dir=tmp_path)
    assert bad_option.returncode == 1 and "unknown option '--num-cpu'" in bad_option.stderr

    # stop with nothing recorded touches nothing and succeeds.
    stopped = run_local_sh("stop", state_dir=tmp_path)
    assert stopped.returncode == 0 and "stopped 0 node(s)" in stopped.stderr


def test_local_sh_stop_signals_only_recorded_pids(tmp_path: Path):
    """stop ends the process whose PID was recorded, and leaves an unrelated one alone."""
    recorded = subprocess.Popen(["setsid", "sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (tmp_path / "head.pid").write_text(str(recorded.pid))
        (tmp_path / "head.env").write_text("GCS_ADDRESS=127.0.0.1:1\nDASHBOARD_PORT=1\nTOKEN_SOURCE=env\n")
        result = run_local_sh("stop", state_dir=tmp_path)
        assert result.returncode == 0 and "stopped 1 node(s)" in result.stderr
        assert recorded.wait(timeout=30) is not None
        assert bystander.poll() is None
        assert not (tmp_path / "head.pid").exists() and not (tmp_path / "head.env").exists()
    finally:
        for proc in (recorded, bystander):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_local_sh_keeps_token_auth_on():
    text = LOCAL_SH.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "RAY_AUTH_MODE=disabled" not in text
    # Never the machine-wide `ray stop`: other clusters may share the machine.
    assert not re.search(r'"\$RAY_BIN" stop|\bray stop\b', text.split("set -euo pipefail", 1)[1])


def test_runtime_env_is_valid_and_self_contained():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)
    assert data["working_dir"] == "."
    for module in data.get("py_modules", []):
        assert (REPO_ROOT / module / "__init__.py").is_file(), f"py_modules entry {module} is not a package"
    assert {".venv", ".git"} <= set(data["excludes"])
    assert data["env_vars"]["TRANSFORMERS_OFFLINE"] == "1"
    # The jobs' own ray.init(runtime_env=...) names these; a job runtime env naming them too
    # makes Ray refuse to start the driver. The nodes set them instead.
    assert not {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"} & set(data["env_vars"])
    assert 'HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"' in LOCAL_SH.read_text()
    assert not [k for k in data["env_vars"] if k.startswith("AWS_")], "credentials do not belong here"


def load_launcher() -> dict:
    return yaml.safe_load((CLUSTER / "launcher-aws.yaml").read_text())


def validate_launcher(config: dict) -> None:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(config)))


def test_launcher_config_passes_ray_schema():
    config = load_launcher()
    validate_launcher(config)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu-workers", "gpu-workers"}
    assert types["gpu-workers"]["min_workers"] == 0, "GPU workers are optional: none until asked for"

    misspelt = load_launcher()
    misspelt["available_node_types"]["cpu-workers"]["min_wrokers"] = 1
    with pytest.raises(Exception, match="min_wrokers"):
        validate_launcher(misspelt)


def test_launcher_installs_pins_and_keeps_token_auth():
    config = load_launcher()
    setup = "\n".join(config["setup_commands"])
    # torch (CPU wheel) before the project, then Ray and the project under the pins file.
    assert setup.index("torch==2.13.0") < setup.index("whetstone[models,gguf,lora,tracking,cpu]")
    gpu_setup = "\n".join(config["available_node_types"]["gpu-workers"]["worker_setup_commands"])
    assert "whetstone[models,gguf,lora,tracking,gpu]" in gpu_setup, "GPU workers take FAISS's CUDA build"
    assert "-c ~/whetstone/cluster/pins.txt" in setup
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]
    assert "**/.venv" in config["rsync_exclude"]


def test_dockerfile_pins_ray_and_installs_torch_first():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1) == ray.__version__
    assert re.search(r"^ARG PYTHON_TAG=py311$", text, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M), "the GPU build arg (VARIANT=gpu)"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{VARIANT\}$", text, re.M)
    assert text.index("torch==${TORCH_VERSION}") < text.index('".[models,gguf,lora,tracking,${VARIANT}]"')  # faiss-cpu or -gpu
    assert "download.pytorch.org/whl/cpu" in text
    assert (CLUSTER / "Dockerfile.dockerignore").read_text().count(".venv") == 1


def test_pins_agree_across_files():
    pins = dict(line.split("==") for line in (CLUSTER / "pins.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    # the library takes a range (what it supports); the nodes and the image pin the version tested
    ray_range = re.search(r'"ray\[train,data,serve\]([^"]+)"', pyproject).group(1)
    from packaging.specifiers import SpecifierSet

    assert "==" not in ray_range and pins["ray"] in SpecifierSet(ray_range), ray_range
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={pins['torch']}" in dockerfile
    assert f"ARG RAY_VERSION={pins['ray']}" in dockerfile
    launcher = (CLUSTER / "launcher-aws.yaml").read_text()
    assert launcher.count(f'"torch=={pins["torch"]}"') == 2
    makefile = REPO_ROOT / "Makefile"
    if makefile.is_file():
        assert f"torch=={pins['torch']}" in makefile.read_text()


def test_sync_serve_config_round_trips(tmp_path: Path):
    sys.path.insert(0, str(CLUSTER))
    try:
        import sync_serve_config as sync
    finally:
        sys.path.remove(str(CLUSTER))
    manifest = sync.RAY_SERVICE.read_text()
    new_config = "# a comment\nproxy_location: EveryNode\napplications:\n  - name: x\n    import_path: a.b:c\n"
    updated = sync.replace_block(manifest, new_config)
    assert sync.embedded_serve_config(updated) == yaml.safe_load(new_config)
    # Everything outside the block is untouched (the zero-downtime notes, the cluster spec).
    before, after = manifest.split("serveConfigV2: |", 1), updated.split("serveConfigV2: |", 1)
    assert before[0] == after[0]
    assert before[1][before[1].index("  rayClusterConfig:"):] == after[1][after[1].index("  rayClusterConfig:"):]
