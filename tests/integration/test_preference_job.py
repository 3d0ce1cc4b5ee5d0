"""The preference job end to end on a local Ray: DPO on a tiny random-init GPT-2, 2 workers.

Runs ``jobs.train_preference.main`` on real hh-rlhf pairs (ingested from the shared data) with
the real GPT-2 tokenizer, reference log-probs precomputed by Ray Data and joined by pair_id, a
leakage report, held-out evaluation, checkpoints, a JSON report and a PNG plot; then a copy of
that run, cut back to its step-12 checkpoint as if killed there, resumed with ``if_exists=resume``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.tensorboard_events import read_events, read_scalars

pytestmark = pytest.mark.integration

HH_RLHF = "preference/hh-rlhf-harmless-base/test.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A random-init 2-layer GPT-2 (width 64, full 50,257 vocabulary) with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=50257, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hh_store(tmp_path_factory, shared_data) -> str:
    from whetstone.data.ingest import ingest

    store = str(tmp_path_factory.mktemp("store") / "hh-rlhf")
    report = ingest(str(shared_data / HH_RLHF), store, "hh-rlhf", "preference/test", rows_per_shard=1000)
    assert report.datasets["preference/test"].rows_written == 2308
    return store


@pytest.fixture(scope="module")
def dpo_report(ray_cluster, hh_store, tiny_gpt2_dir, tiny_encoder_dir) -> dict:
    from jobs.train_preference import main

    return main([
        "--config", "jobs/configs/train_preference/smoke.yaml", "optim.checkpoint_every=6",  # steps 6, 12, 18
        f"store_uri={hh_store}", f"policy.path={tiny_gpt2_dir}", f"leakage.encoder={tiny_encoder_dir}",
    ])


def _history(report: dict) -> list[dict]:
    return json.loads(Path(report["history_uri"]).read_text())


def test_loss_falls(dpo_report):
    history = _history(dpo_report)
    assert len(history) == dpo_report["steps"] == 2 * (160 // (2 * 8))
    assert dpo_report["last_loss_mean"] < dpo_report["first_loss_mean"] - 0.05
    # The chosen-vs-rejected reward accuracy on the training stream improves with the loss.
    assert sum(m["reward_accuracy"] for m in history[-5:]) > sum(m["reward_accuracy"] for m in history[:5])


def test_reference_precompute_joined_by_pair_id(dpo_report):
    import pyarrow.parquet as pq

    reference = pq.read_table(dpo_report["reference"]["uri"])
    assert dpo_report["reference"]["mode"] == "precompute"
    assert reference.num_rows == 160 + 32
    assert len(set(reference.column("pair_id").to_pylist())) == reference.num_rows
    # Before the first update the policy IS the reference: if the joined log-probs belonged to
    # other pairs, the step-1 implicit rewards (beta * (policy - reference)) would be far from 0.
    first = _history(dpo_report)[0]
    assert abs(first["chosen_reward"]) < 1e-3 and abs(first["rejected_reward"]) < 1e-3
    assert abs(first["loss"] - 0.6931) < 1e-3  # -log sigmoid(0)


def test_eval_and_report(dpo_report):
    ev = dpo_report["eval"]
    assert ev["eval_pairs"] == 32
    assert 0.0 <= ev["eval_reward_accuracy"] <= 1.0
    assert dpo_report["kept_aside_at_ingest"] == {"preference/test": 4}
    leak = dpo_report["leakage"]
    assert leak["mode"] == "report" and leak["eval_prompts"] == 32 and leak["train_prompts"] == 160
    assert Path(dpo_report["plot_uri"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_file = Path(dpo_report["run_uri"]) / "report.json"
    assert json.loads(report_file.read_text())["steps"] == dpo_report["steps"]


def test_checkpoint_is_a_trained_hf_model(dpo_report, tiny_gpt2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(dpo_report["model_uri"])
    trained = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert AutoTokenizer.from_pretrained(final).eos_token == "<|endoftext|>"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == dpo_report["steps"]
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True)]
    assert all(moved)
    # the model card (README.md) names the base model, the steps and the held-out figures
    card = (final / "README.md").read_text()
    assert dpo_report["model_card_uri"] == str(final / "README.md") and card.startswith("---\n")
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card
    assert str(tiny_gpt2_dir) in card and f"| Steps | {dpo_report['steps']} |" in card
    assert f"{dpo_report['eval']['eval_reward_accuracy']:.4f}" in card and "AutoModelForCausalLM" in card


def test_tensorboard_holds_every_step_and_the_held_out_figures(dpo_report):
    """TensorBoard is on by default: rank 0's per-step metrics under tensorboard/train (one scalar per
    metric and step, the history's values), the driver's held-out figures under tensorboard/eval."""
    run = Path(dpo_report["run_uri"])
    history = _history(dpo_report)
    train = read_scalars(run / "tensorboard" / "train")
    assert [step for step, _ in train["loss"]] == list(range(1, dpo_report["steps"] + 1))
    assert [value for _, value in train["loss"]] == pytest.approx([m["loss"] for m in history], rel=1e-6)
    assert [value for _, value in train["reward_accuracy"]] == pytest.approx([m["reward_accuracy"] for m in history])
    assert {"margin", "lr", "pairs_per_s"} <= set(train)
    evals = read_scalars(run / "tensorboard" / "eval")
    assert evals["reward_accuracy"] == [(dpo_report["steps"], pytest.approx(dpo_report["eval"]["eval_reward_accuracy"]))]
    assert dpo_report["tensorboard_uri"] == str(run / "tensorboard") and dpo_report["mlflow_run_id"] is None


def test_resume_continues_data_and_optimiser(dpo_report, hh_store, tiny_gpt2_dir, tiny_encoder_dir, tmp_path):
    """A copy of the DPO run cut back to its step-12 checkpoint (epoch 1, 2 of its 10 batches done),
    as if killed there, resumed with if_exists=resume: steps 13..20 see the same batches with the
    same weights, AdamW moments and LR, so their losses equal the uninterrupted run's.

    Tolerance 1e-4: both runs do the same float32 CPU arithmetic in the same order on the same
    batches (the train stream keeps its order through Ray Train), so they agree exactly in practice
    (measured: 0.0); the margin is for reductions that may regroup on another machine. Resuming
    with a fresh AdamW instead moved steps 14..20 by up to 0.027 (measured), a wrong data position
    by up to 0.047.
    """
    from whetstone.train.checkpoint import read_trainer_state

    from jobs.train_preference import main

    killed = tmp_path / "killed"
    shutil.copytree(dpo_report["run_uri"], killed)
    for name in ("train/final", "train/step-000018"):
        shutil.rmtree(killed / name)
    for name in ("history.json", "report.json", "training.png"):
        (killed / name).unlink()
    state = read_trainer_state(str(killed / "train" / "step-000012"))
    assert state is not None and (state.step, state.epoch, state.epoch_batches) == (12, 1, 2)

    report = main([
        "--config", "jobs/configs/train_preference/smoke.yaml", "optim.checkpoint_every=6",
        f"store_uri={hh_store}", f"policy.path={tiny_gpt2_dir}", f"leakage.encoder={tiny_encoder_dir}",
        f"output_uri={killed}", "if_exists=resume",
    ])
    assert report["resumed_from_step"] == 12 and report["steps"] == dpo_report["steps"] == 20
    assert Path(report["model_uri"]) == killed / "train-from-000012" / "final"
    whole, resumed = _history(dpo_report), _history(report)
    assert [m["step"] for m in resumed] == list(range(1, 21))  # steps 1..12 carried in the checkpoint
    np.testing.assert_allclose([m["loss"] for m in resumed[12:]], [m["loss"] for m in whole[12:]], rtol=0, atol=1e-4)
    np.testing.assert_allclose([m["lr"] for m in resumed[12:]], [m["lr"] for m in whole[12:]], rtol=1e-6)
    # TensorBoard: the copy's events (steps 1..20) and the resumed writer's (13..20), which starts with a
    # restart marker at step 13 so that TensorBoard hides the first attempt's steps 13..20
    events = read_events(killed / "tensorboard" / "train")
    assert [e.step for e in events if e.HasField("session_log")] == [13]
    shown = read_scalars(killed / "tensorboard" / "train")["loss"]  # after TensorBoard drops 13..20 of the copy
    assert [step for step, _ in shown] == list(range(1, 21))
    assert [value for _, value in shown] == pytest.approx([m["loss"] for m in resumed], rel=1e-6)
    assert report["eval"]["eval_margin"] == pytest.approx(dpo_report["eval"]["eval_margin"], abs=1e-4)


def test_ns_dpo_with_on_the_fly_reference(ray_cluster, hh_store, tiny_gpt2_dir, tmp_path):
    """NS-DPO (hh-rlhf has no timestamps: every pair takes the newest step, weight 1) with the
    reference held by each worker instead of precomputed; leakage guard off."""
    from jobs.train_preference import main

    report = main([
        "--config", "jobs/configs/train_preference/smoke.yaml", f"store_uri={hh_store}",
        f"policy.path={tiny_gpt2_dir}", f"output_uri={tmp_path / 'ns'}", "loss.name=ns_dpo", "loss.gamma=0.9",
        "reference.mode=on_the_fly", "leakage.mode=off", "optim.epochs=1", "optim.max_steps=3",
        "data.max_eval_pairs=8",
    ])
    assert report["loss"] == "ns_dpo" and report["steps"] == 3
    assert report["reference"] == {"mode": "on_the_fly", "uri": None}
    first = _history(report)[0]
    # Global normalisation: weights sum to 1 over both workers, so the step-1 loss is -log sigmoid(0).
    assert abs(first["loss"] - 0.6931) < 1e-3 and abs(first["margin"]) < 1e-3
    assert report["eval"]["eval_pairs"] == 8


def test_reward_model_mode(ray_cluster, hh_store, tiny_encoder_dir, tmp_path):
    from whetstone.models.reward import RewardModel

    from jobs.train_preference import main

    report = main([
        "--config", "jobs/configs/train_preference/smoke.yaml", f"store_uri={hh_store}", "mode=reward_model",
        f"reward_model.encoder={tiny_encoder_dir}", "reward_model.max_length=64", "reward_model.max_prompt_length=32",
        f"output_uri={tmp_path / 'rm'}", "leakage.mode=off", "optim.epochs=1", "optim.max_steps=4",
        "data.max_eval_pairs=16", "optim.checkpoint_every=2",
    ])
    assert report["mode"] == "reward_model" and report["loss"] == "bradley_terry" and report["steps"] == 4
    step2 = tmp_path / "rm" / "train" / "step-000002"  # weights, optimiser and schedule, data position
    assert (step2 / "optimizer_state.pt").is_file() and RewardModel.load(step2) is not None
    assert report["eval"]["eval_pairs"] == 16
    model = RewardModel.load(report["model_uri"])
    prompts, responses = ["\n\nHuman: hi\n\nAssistant:"] * 2, ["Hello! How can I help?", "Go away."]
    scores = model.score(prompts, responses)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    # the saved folder is a transformers sequence-classification model (response pooling: its own code)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(report["model_uri"], trust_remote_code=True).eval()
    tokens = AutoTokenizer.from_pretrained(report["model_uri"])(prompts, responses, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(hf(**tokens).logits[:, 0].numpy(), scores, atol=1e-5)
    card = (Path(report["model_uri"]) / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "reward-model" in card
    assert str(tiny_encoder_dir) in card and "| Steps | 4 |" in card and "Bradley-Terry" in card
    assert f"{report['eval']['eval_reward_accuracy']:.4f}" in card and "trust_remote_code=True" in card


def test_a_killed_training_worker_is_restarted_and_the_dpo_run_continues(dpo_report, hh_store, tiny_gpt2_dir,
                                                                         tiny_encoder_dir, tmp_path):
    """kill -9 of one Ray Train worker of the DPO job once its step-6 checkpoint is complete: the
    worker group restarts by itself (max_failures, default 3) from the newest complete checkpoint,
    the run ends with all 20 steps, one history of each step once, and the losses of the uninterrupted
    run (to 1e-4, as the resume test above: the same float arithmetic on the same batches)."""
    import os
    import signal

    from whetstone.train.checkpoint import read_trainer_state

    from jobs.train_preference import main
    from tests.faults import JobThread, train_worker_processes

    run = tmp_path / "run"
    job = JobThread(main, ["--config", "jobs/configs/train_preference/smoke.yaml", "optim.checkpoint_every=6",
                           f"store_uri={hh_store}", f"policy.path={tiny_gpt2_dir}",
                           f"leakage.encoder={tiny_encoder_dir}", f"output_uri={run}"])
    job.wait_for(lambda: read_trainer_state(str(run / "train" / "step-000006")) is not None, "its step-6 checkpoint")
    assert not (run / "train" / "final").exists(), "the run finished before the kill: nothing was tested"
    workers = train_worker_processes()
    assert len(workers) == 2, f"expected this run's 2 training workers, found {workers}"
    os.kill(max(workers, key=lambda p: p.pid).pid, signal.SIGKILL)
    report = job.finished_report()
    assert report["worker_restarts"] == 1 and report["steps"] == 20
    whole, restarted = _history(dpo_report), _history(report)
    assert [m["step"] for m in restarted] == list(range(1, 21))
    np.testing.assert_allclose([m["loss"] for m in restarted], [m["loss"] for m in whole], rtol=0, atol=1e-4)
    # TensorBoard: the restarted rank 0 writes a second event file that starts with a restart marker at
    # the first step it trains again; shown, every step appears once with the history's loss
    events = read_events(run / "tensorboard" / "train")
    starts = [e.step for e in events if e.HasField("session_log")]
    assert len(starts) == 1 and starts[0] - 1 in (6, 12, 18)  # one past a checkpoint
    shown = read_scalars(run / "tensorboard" / "train")["loss"]
    assert [step for step, _ in shown] == list(range(1, 21))
    assert [value for _, value in shown] == pytest.approx([m["loss"] for m in restarted], rel=1e-6)
