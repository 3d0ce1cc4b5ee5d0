"""Progress lines and metric tracking, part by part: the rate-bounded progress line, rank 0's
TensorBoard / MLflow writer (local, and on S3), the MLflow URI rules and the missing-extra error.

The training jobs' own runs (tests/integration/test_contrastive_job.py, test_preference_job.py)
check the same files and runs end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.tensorboard_events import read_events, read_scalars


def test_progress_line_counts_rates_eta_and_totals():
    from whetstone.console import ProgressLine

    lines: list[str] = []
    progress = ProgressLine("corpus v2", "docs", total=1000, every_s=0.5, tag="[embed]", out=lines.append)
    progress.update(100)  # too soon after the start: no line
    assert lines == []
    time.sleep(0.55)
    progress.update(400)
    progress.update(450)  # too soon after that line
    assert len(lines) == 1 and lines[0].startswith("[embed] corpus v2: 400/1,000 docs (")
    assert " docs/s), eta " in lines[0] and lines[0].endswith(" s")
    time.sleep(0.55)
    progress.update(450)  # moved since the last line
    assert len(lines) == 2 and lines[1].startswith("[embed] corpus v2: 450/1,000 docs (")
    time.sleep(0.55)
    progress.update(450)  # the count did not move: nothing to say
    assert len(lines) == 2
    progress.update(1000)
    assert len(lines) == 3 and "1,000/1,000 docs" in lines[2] and "eta" not in lines[2]
    final = progress.done(" into /x")
    assert final == lines[-1] and final.startswith("[embed] corpus v2: done, 1,000 docs in ")
    assert final.endswith(" docs/s) into /x")
    progress.done()
    assert len(lines) == 4  # the closing line is printed once


def _history(steps: range) -> list[dict]:
    return [{"step": s, "epoch": 0, "loss": 1.0 / s, "lr": 1e-4, "t": time.time(), "fallback": "",
             "total_steps": s, "score_gap": float("nan")} for s in steps]


def test_rank0_writer_writes_one_scalar_per_metric_and_step_and_purges_on_restart(tmp_path):
    from whetstone.train.tracking import MetricWriter

    writer = MetricWriter(str(tmp_path / "tensorboard"), "train", flush_every_s=60, restartable=True)
    for metrics in _history(range(1, 6)):
        writer.add(metrics)
    writer.close()
    folder = tmp_path / "tensorboard" / "train"
    scalars = read_scalars(folder)
    # numeric metrics only; not the step, the wall time, running totals or NaNs
    assert sorted(scalars) == ["epoch", "loss", "lr"]
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    assert [value for _, value in scalars["loss"]] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert not any(e.HasField("session_log") for e in read_events(folder))
    # A restarted worker group trains steps 4.. again: its writer marks step 4 as restarted, so
    # TensorBoard drops the first group's events at steps >= 4.
    again = MetricWriter(str(tmp_path / "tensorboard"), "train", flush_every_s=60, restartable=True)
    for metrics in _history(range(4, 7)):
        again.add(metrics)
    again.close()
    starts = [e.step for e in read_events(folder) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [4]
    assert [step for step, _ in read_scalars(folder)["loss"]] == [1, 2, 3, 4, 5, 6]  # as TensorBoard shows it
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per writer, never shared
    # the driver's evaluation figures are not restartable: a first point past step 1 purges nothing
    evals = MetricWriter(str(tmp_path / "tensorboard"), "eval")
    evals.add({"ndcg@10": 0.5}, step=20)
    evals.close()
    assert not any(e.HasField("session_log") for e in read_events(tmp_path / "tensorboard" / "eval"))
    assert read_scalars(tmp_path / "tensorboard" / "eval") == {"ndcg@10": [(20, 0.5)]}


def test_mlflow_run_gets_the_metrics_in_batches(tmp_path, monkeypatch):
    from whetstone.train.tracking import MetricWriter, mlflow_client

    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow_client(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    writer = MetricWriter(None, "train", uri, run_id, flush_every_s=3600)
    for metrics in _history(range(1, 4)):
        writer.add(metrics)
    assert client.get_metric_history(run_id, "loss") == []  # buffered until the flush
    writer.close()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert writer.local_dir is None and writer.events is None  # no TensorBoard asked for: no files


def test_a_failing_mlflow_server_does_not_stop_training(tmp_path, capsys, monkeypatch):
    from whetstone.train.tracking import MetricWriter

    # Nothing listens on this port: every batch fails; the writer says so once and goes on.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    writer = MetricWriter(str(tmp_path / "tb"), "train", "http://127.0.0.1:9", "run-that-is-not-there",
                          flush_every_s=0)
    for metrics in _history(range(1, 3)):
        writer.add(metrics)
    writer.close()
    out = capsys.readouterr().out
    assert out.count("[tracking] MLflow logging failed") == 1
    assert [s for s, _ in read_scalars(tmp_path / "tb" / "train")["loss"]] == [1, 2]


def test_mlflow_uri_rules_and_the_missing_extra_error(monkeypatch):
    from whetstone.config.base import ConfigError, TrackingConfig
    from whetstone.train.tracking import mlflow_key, mlflow_uri, require_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_uri(TrackingConfig()) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert mlflow_uri(TrackingConfig()) == "http://mlflow:5000"  # the standard variable
    assert mlflow_uri(TrackingConfig(mlflow_uri="file:///m")) == "file:///m"  # the field wins
    assert mlflow_uri(TrackingConfig(mlflow_uri="")) is None  # empty: off, whatever the variable says
    assert mlflow_key("ndcg@10_at_index_length") == "ndcg_at_10_at_index_length"
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r'whetstone\[tracking\]'):
        require_mlflow("http://mlflow:5000")


def test_the_package_and_the_jobs_import_without_mlflow_or_tensorboardx():
    code = ("import sys, whetstone, whetstone.train.tracking, whetstone.train.progress, jobs.train_contrastive, "
            "jobs.train_preference; bad = [m for m in ('mlflow', 'tensorboardX') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'library'}:{REPO_ROOT}"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT, timeout=300)


def test_event_files_of_an_s3_run_are_uploaded_with_each_sync(s3_bucket, tmp_path):
    from whetstone import storage as store
    from whetstone.config.base import StorageConfig
    from whetstone.train.tracking import MetricWriter

    uri = f"s3://{s3_bucket}/runs/r/tensorboard"
    storage = StorageConfig()
    writer = MetricWriter(uri, "train", storage=storage, flush_every_s=60)
    for metrics in _history(range(1, 3)):
        writer.add(metrics)
    writer.sync()  # what rank 0 does with a checkpoint
    assert Path(writer.local_dir).is_dir() and writer.remote
    names = store.list_dir(f"{uri}/train", storage)
    assert len(names) == 1 and names[0].rsplit("/", 1)[-1].startswith("events.out.tfevents.")
    for metrics in _history(range(3, 5)):
        writer.add(metrics)
    writer.close()
    copy = tmp_path / "copy"
    store.download_dir(f"{uri}/train", copy, storage)
    assert [s for s, _ in read_scalars(copy)["loss"]] == [1, 2, 3, 4]
