"""Shared fixtures: one local Ray per session, tiny random-init models, a real S3 server on loopback.

Fixtures that start things are session-scoped so the whole suite pays for them once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (CI and developers have ../shared beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, with more logical CPUs than this 2-core machine has.

    Train workers, Serve replicas and Ray Data tasks each ask for CPUs; with num_cpus=2 they
    deadlock waiting for each other.
    """
    import ray
    from whetstone.train.runtime import quiet_state_api_warnings

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=8,
            object_store_memory=768 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                         # no dashboard, so no state API: as the jobs' own local Ray does
                         "worker_process_setup_hook": quiet_state_api_warnings},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort at session end
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from whetstone.models.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random-init BERT (2 layers, width 32) with MiniLM's real tokenizer, saved as a
    sentence-transformers folder: fast enough for any test that does not judge quality."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from whetstone.models.encoder import write_sentence_transformers_files

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_sentence_transformers_files(out, dim=32, max_seq_length=128)
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    from whetstone.models.assets import gpt2_tokenizer_dir

    return gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2-tokenizer"))


S3_SERVER_PIDS: dict[str, int] = {}  # endpoint -> pid of the moto server answering it


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server in its own process on a loopback port.

    Yields the endpoint URL; credentials are dummies moto accepts. Tests create their own buckets.
    """
    port = free_port()
    env = dict(os.environ)
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    S3_SERVER_PIDS[endpoint] = proc.pid  # fault tests stall it (SIGSTOP / SIGCONT)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the moto server; sets the AWS env vars so every process sees them."""
    import uuid

    import boto3

    name = f"whetstone-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def local_two_node_cluster(s3_server):
    """A two-node Ray cluster on this machine, started with cluster/local.sh, token auth on.

    The head has 4 logical CPUs and resource ``node_a``; the second node 4 CPUs and ``node_b``
    (ask for ``{"node_b": 0.01}`` to pin work there). Both nodes see moto's S3 through the AWS_*
    variables. Yields the environment for ``ray job submit`` (RAY_ADDRESS, RAY_AUTH_MODE=token,
    RAY_AUTH_TOKEN_PATH, plus the AWS_* variables); stops both nodes, by PID, afterwards.
    """
    import shutil
    import tempfile

    # A short root: Ray's Unix socket paths under it must stay below 108 characters.
    state_dir = Path(tempfile.mkdtemp(prefix="ws-ray-", dir="/tmp"))
    env = dict(os.environ)
    env.update({
        "WHETSTONE_CLUSTER_DIR": str(state_dir),
        "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "HF_HUB_OFFLINE": "1",
    })
    env.pop("RAY_ADDRESS", None)
    script = str(REPO_ROOT / "cluster" / "local.sh")

    def local_sh(*args: str) -> str:
        result = subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"cluster/local.sh {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    try:
        local_sh("start", "--num-cpus", "4", "--object-store-mb", "256", "--resources", '{"node_a": 1}')
        local_sh("join", "--num-cpus", "4", "--object-store-mb", "256", "--resources", '{"node_b": 1}')
        submit_env = dict(env)
        for line in local_sh("env").splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                submit_env[key] = value
        yield submit_env
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
