"""Faults in the contrastive job, injected for real: a killed training worker, a killed run, a
stalled S3 server while a checkpoint is written, workers killed while a checkpoint is written.

Each faulty run is compared with one uninterrupted run of the same plan (8 steps, a checkpoint
every 2, no refresh): a restarted or resumed run must train the same steps to the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.faults import JobThread, train_worker_processes

pytestmark = pytest.mark.integration


def _run_until_killed(args: list[str], checkpoint: Path, timeout_s: float = 600.0) -> None:
    """Run the job as its own process (its own local Ray) and ``kill -9`` its whole process group
    (driver, Ray's processes, the training workers) once ``checkpoint`` is complete on disk."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from whetstone.train.checkpoint import read_trainer_state

    from tests.conftest import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    log = checkpoint.parent.parent.parent / "killed-job.log"  # beside the run folder
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.train_contrastive", *args], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while read_trainer_state(str(checkpoint)) is None:
            assert proc.poll() is None, (f"the job exited ({proc.returncode}) before writing {checkpoint}; "
                                         f"its output ends:\n{log.read_text(errors='replace')[-3000:]}")
            assert time.monotonic() < deadline, f"no {checkpoint} after {timeout_s} s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(300):  # Ray's processes share the driver's fate; wait until every one is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the killed job's group {proc.pid} are still alive")


def _resume_args(store: str, encoder: Path) -> list[str]:
    """8 steps, a checkpoint every 2, no refresh (the index stays at v1), a frozen query tower."""
    return ["--config", "jobs/configs/train_contrastive/smoke.yaml", f"store_uri={store}",
            f"encoder.base_model={encoder}", "refresh.every_steps=null", "optim.checkpoint_every=2",
            "optim.max_steps=8", "eval.split=null", "encoder.query_tower=frozen"]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, scifact_store, tiny_encoder_dir, tmp_path_factory) -> tuple[dict, list[dict]]:
    """The run the fault tests compare with: (report, per-step history), never interrupted."""
    from ray import serve

    from jobs.train_contrastive import main

    out = tmp_path_factory.mktemp("whole")
    report = main([*_resume_args(scifact_store, tiny_encoder_dir), f"output_uri={out}",
                   f"index.http_port={free_port()}"])
    serve.delete("whetstone-index")
    return report, json.loads(Path(report["history_uri"]).read_text())


def test_a_killed_training_worker_is_restarted_and_the_run_continues(ray_cluster, scifact_store, tiny_encoder_dir,
                                                                     tmp_path, uninterrupted):
    """kill -9 of one Ray Train worker mid-run, once the step-2 checkpoint is on disk: Ray Train
    restarts the worker group by itself (max_failures) from the newest registered checkpoint, and
    the job finishes with every step of the plan. The history holds each step once, and every
    loss equals the uninterrupted run's to 1e-5 (the same reasoning as the resume test below: the
    same float operations on the same data, so the tolerance only allows for thread scheduling)."""
    import os

    import numpy as np
    from ray import serve
    from whetstone.train.checkpoint import read_trainer_state

    from jobs.train_contrastive import main

    whole, history = uninterrupted
    run = tmp_path / "run"
    job = JobThread(main, [*_resume_args(scifact_store, tiny_encoder_dir), f"output_uri={run}",
                           f"index.http_port={free_port()}"])
    job.wait_for(lambda: read_trainer_state(str(run / "train" / "step-000002")) is not None, "its step-2 checkpoint")
    assert not (run / "train" / "final").exists(), "the run finished before the kill: nothing was tested"
    workers = train_worker_processes()
    assert len(workers) == 2, f"expected this run's 2 training workers, found {workers}"
    victim = min(workers, key=lambda p: p.pid)
    os.kill(victim.pid, 9)
    victim.wait(timeout=30)
    report = job.finished_report(cleanup=lambda: serve.delete("whetstone-index"))
    assert report["worker_restarts"] == 1 and report["steps"] == 8
    restored = json.loads(Path(report["history_uri"]).read_text())
    assert [m["step"] for m in restored] == list(range(1, 9))  # each step once, across the restart
    np.testing.assert_allclose([m["loss"] for m in restored], [m["loss"] for m in history], rtol=1e-5)
    np.testing.assert_allclose([m["lr"] for m in restored], [m["lr"] for m in history], rtol=1e-9)
    assert not Path(str(report["history_uri"]).removesuffix(".json") + ".parts").exists()


def test_a_killed_run_resumes_from_its_last_checkpoint(ray_cluster, scifact_store, tiny_encoder_dir, tmp_path,
                                                        uninterrupted):
    """kill -9 of a whole run after its step-2 checkpoint; the resumed attempt continues it: its
    losses equal an uninterrupted run's step for step (weights, AdamW moments, the LR schedule
    and the epoch's data position all come back).

    Equality is to 1e-5 relative: both runs do the same float operations in the same order on
    the same data (Ray Data keeps the order, the mining draws come from (seed, rank, step), the
    index stays at v1), so the losses are expected to be bit-identical; the tolerance only
    allows for intra-op thread scheduling. With a fresh optimiser after the resume (the old
    behaviour) the first resumed loss already differs in the third decimal.

    Also an asymmetric run (encoder.query_tower=frozen): the query tower travels in every
    checkpoint, survives the resume unchanged, and only the document tower trains.
    """
    import numpy as np
    import torch
    from ray import serve
    from safetensors.torch import load_file
    from whetstone.models.encoder import TOWER_FOLDERS

    from jobs.train_contrastive import main

    args = _resume_args(scifact_store, tiny_encoder_dir)
    whole, history = uninterrupted
    run = tmp_path / "run"
    _run_until_killed([*args, f"output_uri={run}", f"index.http_port={free_port()}"],
                      run / "train" / "step-000002")
    assert not (run / "train" / "final").exists(), "the run finished before it was killed: nothing to resume"
    second = main([*args, f"output_uri={run}", f"index.http_port={free_port()}", "if_exists=resume"])
    serve.delete("whetstone-index")

    resumed_at = second["resumed_from_step"]
    assert resumed_at is not None and resumed_at % 2 == 0 and 2 <= resumed_at < 8
    assert second["steps"] == 8 and second["index_versions"][0] == 1
    # the resumed attempt serves the index it had and reuses the first attempt's base evaluation
    assert "embed_base_s" not in second["timings_s"] and second["before"] == whole["before"]
    attempt = run / f"train-from-{resumed_at:06d}"
    resumed = json.loads(Path(second["history_uri"]).read_text())
    assert [m["step"] for m in resumed] == list(range(resumed_at + 1, 9))
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in history[resumed_at:]], rtol=1e-5)
    np.testing.assert_allclose([m["lr"] for m in resumed], [m["lr"] for m in history[resumed_at:]], rtol=1e-9)
    assert whole["resumed_from_step"] is None and second["model_uri"] == str(attempt / "final")
    final = attempt / "final"
    # step checkpoints carry AdamW's state; the published final model does not
    assert (run / "train" / "step-000002" / "optimizer_state.pt").is_file()
    assert not (final / "optimizer_state.pt").exists()
    # the final model is a sentence-transformers Router model: each tower in its route's subfolder
    assert second["query_tower"] == "frozen" and second["query_model_uri"] == str(final / TOWER_FOLDERS["query"])
    base = load_file(tiny_encoder_dir / "model.safetensors")
    queries, docs = (load_file(final / TOWER_FOLDERS[route] / "model.safetensors") for route in ("query", "document"))
    assert all(torch.equal(queries[name], base[name]) for name in base)  # frozen through 8 steps and a kill
    assert not all(torch.equal(docs[name], base[name]) for name in base)  # the document tower trained
    # sentence-transformers routes queries to the frozen tower and documents to the trained one
    from sentence_transformers import SentenceTransformer
    from whetstone.models.encoder import Encoder

    st, texts = SentenceTransformer(str(final), device="cpu"), ["a claim about proteins", "cells divide"]
    np.testing.assert_allclose(st.encode_query(texts), Encoder.load(tiny_encoder_dir, device="cpu").encode(texts),
                               atol=1e-5)
    np.testing.assert_allclose(st.encode_document(texts), Encoder.load(final, device="cpu").encode(texts), atol=1e-5)
    assert "Router" in (final / "README.md").read_text()  # its model card, sentence-transformers' own




def _s3_checkpoint_written(bucket: str, key: str):
    """A condition: ``key`` (a checkpoint's trainer_state.json, written last) is in the bucket."""
    import boto3

    client = boto3.client("s3")
    return lambda: client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


def _s3_job(scifact_store: str, encoder: Path, run: str) -> JobThread:
    from jobs.train_contrastive import main

    return JobThread(main, [*_resume_args(scifact_store, encoder), f"output_uri={run}",
                            f"index.http_port={free_port()}"])


def _finished_like_the_uninterrupted_run(job: JobThread, history: list[dict]) -> dict:
    import numpy as np
    from ray import serve
    from whetstone import storage as store

    report = job.finished_report(cleanup=lambda: serve.delete("whetstone-index"))
    assert report["steps"] == 8
    faulty = json.loads(store.read_bytes(report["history_uri"]))
    assert [m["step"] for m in faulty] == list(range(1, 9))  # each step once
    np.testing.assert_allclose([m["loss"] for m in faulty], [m["loss"] for m in history], rtol=1e-5)
    return report


def test_a_20_s_s3_stall_while_a_checkpoint_is_written_is_ridden_out(ray_cluster, scifact_store, tiny_encoder_dir,
                                                                      s3_server, s3_bucket, uninterrupted):
    """The run's checkpoints go to S3 (moto on loopback). Once the step-2 checkpoint's
    trainer_state.json is there, moto's process is stopped (SIGSTOP) for 20 s, while the rest of
    that checkpoint's upload (Ray Train's own records, the history part) and the next steps'
    writes are in flight. The job finishes by itself with every step, and its losses equal the
    uninterrupted local run's: nothing was trained twice or skipped."""
    import os
    import signal
    import time

    from tests.conftest import S3_SERVER_PIDS

    _, history = uninterrupted
    run = f"s3://{s3_bucket}/runs/stall"
    job = _s3_job(scifact_store, tiny_encoder_dir, run)
    job.wait_for(_s3_checkpoint_written(s3_bucket, "runs/stall/train/step-000002/trainer_state.json"),
                 "its step-2 checkpoint")
    pid = S3_SERVER_PIDS[s3_server]
    os.kill(pid, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        time.sleep(20)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert job.thread.is_alive(), "the run ended inside the stall: its writes did not wait for storage"
    report = _finished_like_the_uninterrupted_run(job, history)
    assert time.monotonic() - stalled_at > 20 and report["model_uri"].startswith(run)


def test_workers_killed_while_a_checkpoint_is_written_to_s3_resume_from_the_one_before(
        ray_cluster, scifact_store, tiny_encoder_dir, s3_server, s3_bucket, uninterrupted):
    """kill -9 of every training worker while a checkpoint is being written: moto is stopped once
    the step-2 checkpoint's trainer_state.json is there, so the rest of its upload and the next
    one hang in flight; after 12 s both workers are killed, then moto continues. Ray Train
    restarts the group from the newest complete checkpoint and the job finishes with the
    uninterrupted run's losses."""
    import os
    import signal
    import time

    from tests.conftest import S3_SERVER_PIDS

    _, history = uninterrupted
    job = _s3_job(scifact_store, tiny_encoder_dir, f"s3://{s3_bucket}/runs/torn")
    job.wait_for(_s3_checkpoint_written(s3_bucket, "runs/torn/train/step-000002/trainer_state.json"),
                 "its step-2 checkpoint")
    pid = S3_SERVER_PIDS[s3_server]
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(12)
        assert job.thread.is_alive(), "the run ended inside the stall: nothing was being written"
        workers = train_worker_processes()
        assert len(workers) == 2, f"expected this run's 2 training workers, found {workers}"
        for victim in workers:
            os.kill(victim.pid, signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    report = _finished_like_the_uninterrupted_run(job, history)
    assert report["worker_restarts"] >= 1
