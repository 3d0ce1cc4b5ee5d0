"""`ray job submit` against a two-node cluster started with `ray start` (cluster/local.sh),
token authentication on, every byte of data and every model in S3 (moto's server on loopback).

The contrastive smoke job runs with its 2 Train workers spread over both nodes, reads the base
model and the ingested shards from the bucket, and writes checkpoints, the final model, index
snapshots and its report back to it. Nothing is read from this machine's disk but the code.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def submit(env: dict, *command: str, timeout: int = 1200) -> str:
    submission_id = f"ws-{uuid.uuid4().hex[:8]}"
    ray = str(Path(REPO_ROOT) / ".venv" / "bin" / "ray")
    result = subprocess.run(
        [ray, "job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--", *command],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    status = subprocess.run([ray, "job", "status", submission_id], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"job '{submission_id}' succeeded" in status.stdout.lower(), (
        f"job {' '.join(command)} did not succeed:\n{status.stdout}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def test_submit_contrastive_job_on_two_nodes_with_s3(local_two_node_cluster, s3_server, tiny_encoder_dir):
    import boto3
    from whetstone import storage
    from whetstone.config import StorageConfig

    env = local_two_node_cluster
    bucket = f"ws-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    creds = StorageConfig(endpoint_url=s3_server, region="us-east-1", access_key_id="testing",
                          secret_access_key="testing")
    storage.upload_dir(tiny_encoder_dir, f"s3://{bucket}/models/tiny", creds)
    store = f"s3://{bucket}/store"

    out = submit(env, "python", "-m", "jobs.ingest", "--config", "jobs/configs/ingest/smoke.yaml",
                 f"store_uri={store}")
    assert "pairs/train" in out

    out = submit(env, "python", "-m", "jobs.train_contrastive", "--config",
                 "jobs/configs/train_contrastive/smoke.yaml", f"store_uri={store}",
                 f"encoder.base_model=s3://{bucket}/models/tiny", "optim.placement_strategy=STRICT_SPREAD",
                 "optim.max_steps=2", "refresh.every_steps=1", f"index.http_port={free_port()}")
    assert "report: s3://" in out

    report = json.loads(storage.read_bytes(f"{store}/runs/smoke/report.json", creds))
    assert report["steps"] == 2 and report["negatives_served_by_index"] > 0
    assert len(set(report["worker_nodes"])) == 2, report["worker_nodes"]
    assert [r["new_version"] for r in report["refreshes"]] == [2]
    keys = {obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket, Prefix="store/runs/smoke/")["Contents"]}
    assert "store/runs/smoke/train/final/model.safetensors" in keys
    assert "store/runs/smoke/train/final/modules.json" in keys
    for version in (1, 2, 3):
        assert f"store/runs/smoke/index/v{version}/manifest.json" in keys
