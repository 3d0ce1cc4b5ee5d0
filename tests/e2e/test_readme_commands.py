"""The README's own command blocks, run as written, in a copy of the repository.

Each test takes a fenced ``bash`` block out of README.md (found by what it runs, not retyped here)
and runs it with ``bash -e`` in a fresh copy of the checkout (the files git tracks or would track,
with this checkout's ``.venv`` linked in), so the commands see what a user's clone has: no
``.whetstone/`` store from an earlier run, no ``../shared``. Only the environment is adapted: the
local cluster's state folder and token file go under the test's temp folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

README = REPO_ROOT / "README.md"


def readme_block(*must_contain: str) -> str:
    """The one ``bash`` block of README.md that contains every string in ``must_contain``."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M)
    found = [b for b in blocks if all(s in b for s in must_contain)]
    assert len(found) == 1, f"README.md has {len(found)} bash blocks with {must_contain}"
    return found[0]


def repo_copy(target: Path) -> Path:
    """The files a clone has (tracked, or untracked and not ignored), plus a link to ``.venv``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name, follow_symlinks=False)
    (target / ".venv").symlink_to(REPO_ROOT / ".venv")
    return target


def run_block(block: str, cwd: Path, env: dict, timeout: int) -> str:
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the README block failed ({result.returncode}):\n{block}\n---\n{output[-8000:]}"
    return output


def user_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST"))}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "RAY_USAGE_STATS_ENABLED": "0", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    env.pop("PYTHONPATH", None)
    return env


def test_readme_ray_job_submit_on_a_local_cluster(tmp_path):
    """"Running jobs", way 3: ingest, start a token-auth cluster, submit the smoke job, stop."""
    block = readme_block("cluster/local.sh start", "ray job submit")
    repo = repo_copy(tmp_path / "repo")
    env = user_env(tmp_path)
    # the cluster's state and token in a folder of the test's, not ~/.ray and /tmp/whetstone-cluster-*
    # (a short path: Ray's Unix socket paths under it must stay below 108 characters)
    state = Path(tempfile.mkdtemp(prefix="ws-readme-", dir="/tmp"))
    env.update({"WHETSTONE_CLUSTER_DIR": str(state), "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")})
    try:
        output = run_block(block, repo, env, timeout=1500)
    finally:
        subprocess.run([str(repo / "cluster" / "local.sh"), "stop"], cwd=repo, env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    assert re.search(r"Job '[^']+' succeeded", output), output[-4000:]
    run = repo / ".whetstone" / "store" / "scifact-subset" / "runs" / "smoke"
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 4 and report["negatives_served_by_index"] > 0
    assert (run / "train" / "final" / "model.safetensors").is_file()
    assert f"report: {run / 'report.json'}" in output

    # "Where the model lands": the README's Python snippet, on this run's model instead of the demo's
    snippet = re.search(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    demo_model = ".whetstone/store/scifact-subset/runs/quickstart/train/final"
    assert demo_model in snippet
    result = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "python"), "-c",
                             snippet.replace(demo_model, str(run / "train" / "final"))],
                            cwd=repo, env=user_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and re.search(r"tensor\(\[\[-?[01]\.\d+\]\]\)", result.stdout), (
        result.stdout + result.stderr[-3000:])


def test_readme_preference_quickstart(tmp_path):
    """The preference section's block: ingest the shipped hh-rlhf sample, DPO on the tiny GPT-2."""
    block = readme_block("jobs.train_preference", "train_preference/smoke.yaml")
    assert "<" not in block and "../shared" not in block, "the block must run as written"
    repo = repo_copy(tmp_path / "repo")
    output = run_block(block, repo, user_env(tmp_path), timeout=1500)
    store = repo / ".whetstone" / "store" / "hh-rlhf-harmless-base"
    report = json.loads((store / "runs" / "smoke" / "report.json").read_text())
    assert report["steps"] > 0 and report["train_pairs"] > 0
    assert (tmp_path / "cache" / "whetstone" / "tiny-gpt2-seed0" / ".complete").is_file()
    assert "report:" in output


def test_readme_online_preference_quickstart(tmp_path):
    """The online section's block: ingest the sample, train the MiniLM reward model, then online
    GRPO on the tiny GPT-2 with that model served by Ray Serve."""
    block = readme_block("train_preference/reward-smoke.yaml", "train_preference/online-smoke.yaml")
    assert "<" not in block and "../shared" not in block, "the block must run as written"
    repo = repo_copy(tmp_path / "repo")
    output = run_block(block, repo, user_env(tmp_path), timeout=1500)
    runs = repo / ".whetstone" / "store" / "hh-rlhf-harmless-base" / "runs"
    reward = json.loads((runs / "reward-smoke" / "report.json").read_text())
    assert reward["mode"] == "reward_model" and reward["steps"] > 0
    report = json.loads((runs / "online-smoke" / "report.json").read_text())
    online = report["online"]
    assert report["mode"] == "online" and report["steps"] == 8
    assert online["reward_model"] == str(runs / "reward-smoke" / "train" / "final")
    assert online["reward_model_version"].startswith("rm-") and online["policy_lag_max"] == 1
    assert online["held_out_before"]["prompts"] == online["held_out_after"]["prompts"] == 24
    assert "held-out (24 prompts, greedy): reward" in output and "report:" in output
