"""The preference job's run plan and resume pieces, without Ray: the plan's JSON round trip, the data
position a resumed worker continues from, and a checkpoint that restores the optimiser and schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from whetstone.config.base import load_config
from whetstone.config.preference import PreferenceJobConfig
from whetstone.train.checkpoint import TrainerState, write_checkpoint
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference import PreferenceStepLog, build_loss, load_policy
from whetstone.train.preference_data import TIME_STEP
from whetstone.train.preference_worker import (
    PolicyRun,
    lr_schedule,
    preference_step,
    restore_training_state,
    train_batches,
)


def _plan(**update) -> PreferenceRunPlan:
    fields = {"total_steps": 4, "steps_per_epoch": 4, "checkpoint_root": "/runs/r/train",
              "history_uri": "/runs/r/history.json", "current_time_step": 3.0, "has_eval": True}
    return PreferenceRunPlan(**{**fields, **update})


def test_plan_round_trips_through_json_and_names_a_missing_field():
    plan = _plan(resume_checkpoint="s3://b/runs/r/train/step-000002", resume_step=2)
    wire = json.loads(json.dumps(plan.model_dump(mode="json")))  # what crosses to the workers
    assert PreferenceRunPlan.model_validate(wire) == plan
    del wire["current_time_step"]
    with pytest.raises(ValidationError, match="current_time_step"):
        PreferenceRunPlan.model_validate(wire)
    with pytest.raises(ValidationError, match="has_evals"):  # a misspelt field fails too
        PreferenceRunPlan.model_validate({**plan.model_dump(), "has_evals": False})


class FakeShard:
    """``iter_batches`` like a Ray Train shard: each call is one pass; batch k of pass p is (p, k)."""

    def __init__(self, batches_per_pass: int) -> None:
        self.batches_per_pass, self.passes = batches_per_pass, 0

    def iter_batches(self, **kwargs):
        index = self.passes
        self.passes += 1
        return iter([{"id": (index, k)} for k in range(self.batches_per_pass)])


def _config(*overrides: str) -> PreferenceJobConfig:
    return load_config(PreferenceJobConfig, None, ["policy.path=x", "optim.epochs=3", *overrides])


def test_train_batches_resume_continues_the_uninterrupted_sequence():
    config, plan = _config(), _plan(total_steps=8, steps_per_epoch=3)
    whole = [(epoch, state, raw["id"]) for epoch, state, raw in
             train_batches(FakeShard(4), config, plan, TrainerState(step=0), rank=0)]
    # 3 steps per epoch (the 4th batch of a pass is cut), stopped at total_steps
    assert [item[2] for item in whole] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert [(s.step, s.epoch, s.epoch_batches) for _, s, _ in whole][2:5] == [(3, 1, 0), (4, 1, 1), (5, 1, 2)]
    for checkpoint in (whole[1][1], whole[2][1], whole[4][1]):  # mid-epoch, at an epoch's end, in epoch 1
        shard = FakeShard(4)
        resumed = list(train_batches(shard, config, plan, checkpoint, rank=0))
        assert [(e, s, raw["id"]) for e, s, raw in resumed] == whole[checkpoint.step:]
    assert list(train_batches(FakeShard(4), config, plan, whole[-1][1], rank=0)) == []


def _pairs(rows: range) -> dict[str, np.ndarray]:
    return {"prompt": np.array([f"Question {i}: what is {i} plus {i}?" for i in rows], dtype=object),
            "chosen": np.array([f" It is {2 * i}." for i in rows], dtype=object),
            "rejected": np.array([f" Maybe {i + 7}, or not." for i in rows], dtype=object),
            TIME_STEP: np.zeros(len(rows))}


def _policy_run(config: PreferenceJobConfig, plan: PreferenceRunPlan, path: str) -> PolicyRun:
    model, tokenizer = load_policy(config.policy.model_copy(update={"path": path}), None)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    return PolicyRun(model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=lr_schedule(optimizer, config, plan),
                     loss_fn=build_loss(config.loss), log=PreferenceStepLog(0, plan.total_steps, 100, 4),
                     start=TrainerState(step=0), rank=0, world=1)


def test_checkpoint_restores_optimizer_schedule_and_history(tmp_path, gpt2_tokenizer_dir):
    """Two steps, checkpoint, two more; a run restored from the checkpoint repeats the last two
    exactly (same process and inputs, so bit-for-bit up to 1e-6); without the optimiser's state
    it does not."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50257, n_positions=64)).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)).save_pretrained(base)
    config = _config(f"policy.path={base}", "loss.name=simpo", "optim.lr=1e-2", "optim.warmup_ratio=0.25",
                     "data.max_length=32", "data.max_prompt_length=16")
    plan = _plan(total_steps=4, steps_per_epoch=4)
    batches = [_pairs(range(4 * s, 4 * s + 4)) for s in range(4)]
    run = _policy_run(config, plan, str(base))
    losses = []
    for step, raw in enumerate(batches, start=1):
        values = preference_step(run, raw, config, plan)
        run.log.step(step, 0, run.lr(), values)
        losses.append(values["loss"])
        if step == 2:
            folder = tmp_path / "step-000002"
            folder.mkdir()
            state = TrainerState(step=2, epoch=0, epoch_batches=2)
            write_checkpoint(str(folder), run.save, run.optimizer, run.scheduler, state)
            lr_after_two = run.lr()

    resumed = _policy_run(config, plan, str(folder))
    resumed.start = restore_training_state(str(folder), resumed, plan, None)
    assert (resumed.start.step, resumed.start.epoch, resumed.start.epoch_batches) == (2, 0, 2)
    assert resumed.scheduler.last_epoch == 2 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr_after_two)
    assert [m["step"] for m in resumed.log.history] == [1, 2]  # the history continues
    again = [preference_step(resumed, raw, config, plan)["loss"] for raw in batches[2:]]
    np.testing.assert_allclose(again, losses[2:], rtol=0, atol=1e-6)

    fresh = _policy_run(config, plan, str(folder))  # the checkpoint's weights, a new optimiser
    fresh.scheduler.last_epoch, fresh.optimizer.param_groups[0]["lr"] = 2, lr_after_two
    cold = [preference_step(fresh, raw, config, plan)["loss"] for raw in batches[2:]]
    assert cold[0] == pytest.approx(losses[2], abs=1e-6) and abs(cold[1] - losses[3]) > 1e-3
