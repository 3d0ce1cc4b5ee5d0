"""Checkpoints a run can continue from, and the typed plan the driver hands the workers."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from whetstone.config.base import ConfigError
from whetstone.train.checkpoint import (
    TRAINER_STATE,
    TrainerState,
    find_resume_checkpoint,
    read_trainer_state,
    restore_optimizer,
    write_checkpoint,
)
from whetstone.train.contrastive import linear_warmup_decay
from whetstone.train.plan import ContrastiveRunPlan


def _trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, 10, 2))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.ones(3, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _save(folder, model, optimizer, scheduler, step: int) -> None:
    folder.mkdir(parents=True)
    write_checkpoint(str(folder), lambda f: torch.save(model.state_dict(), f"{f}/model.pt"), optimizer, scheduler,
                     TrainerState(step=step, epoch=0, epoch_batches=step))


def test_a_restored_optimiser_takes_the_same_next_step(tmp_path):
    """AdamW's moments and the LR schedule come back: the next step equals the uninterrupted one's."""
    model, optimizer, scheduler = _trained(3)
    _save(tmp_path / "step-000003", model, optimizer, scheduler, 3)
    _trained_on, *_ = _trained(4)  # the uninterrupted run's fourth step

    resumed, fresh_optimizer, fresh_scheduler = _trained(0)
    resumed.load_state_dict(torch.load(tmp_path / "step-000003" / "model.pt"))
    assert restore_optimizer(str(tmp_path / "step-000003"), fresh_optimizer, fresh_scheduler)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    fresh_optimizer.zero_grad()
    resumed(torch.ones(3, 4)).square().sum().backward()
    fresh_optimizer.step()
    assert torch.equal(resumed.weight, _trained_on.weight)

    # Without the saved state (a fresh AdamW, the old behaviour) the same step lands elsewhere.
    plain, plain_optimizer, _ = _trained(0)
    plain.load_state_dict(torch.load(tmp_path / "step-000003" / "model.pt"))
    plain_optimizer.zero_grad()
    plain(torch.ones(3, 4)).square().sum().backward()
    plain_optimizer.step()
    assert not torch.allclose(plain.weight, _trained_on.weight)


def test_a_torn_checkpoint_is_never_resumed_from(tmp_path):
    model, optimizer, scheduler = _trained(2)
    run = tmp_path / "run"
    _save(run / "train" / "step-000002", model, optimizer, scheduler, 2)
    _save(run / "train-from-000002" / "step-000004", model, optimizer, scheduler, 4)
    state = read_trainer_state(str(run / "train-from-000002" / "step-000004"))
    assert state.step == 4 and set(state.files) == {"model.pt", "optimizer_state.pt"}
    uri, found = find_resume_checkpoint(str(run))
    assert uri.endswith("train-from-000002/step-000004") and found.epoch_batches == 4

    # The process died while the weights were written: the file is shorter than trainer_state says.
    weights = run / "train-from-000002" / "step-000004" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:10])
    assert read_trainer_state(str(weights.parent)) is None
    uri, found = find_resume_checkpoint(str(run))
    assert uri.endswith("train/step-000002") and found.step == 2
    # ... or before trainer_state.json was complete
    (run / "train" / "step-000002" / TRAINER_STATE).write_text('{"step": 2, "fil')
    assert find_resume_checkpoint(str(run)) is None


def test_a_finished_run_refuses_to_resume(tmp_path):
    (tmp_path / "run" / "train" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already finished"):
        find_resume_checkpoint(str(tmp_path / "run"))


def _plan(**overrides) -> dict:
    plan = {"total_steps": 15, "steps_per_epoch": 5, "checkpoint_root": "/runs/x/train",
            "history_uri": "/runs/x/train-history.json", "base_model": "/models/minilm", "train_rows": 188,
            "epoch_ends": [5, 10, 15]}
    return {**plan, **overrides}


def test_the_plan_crosses_to_workers_as_json_and_names_a_missing_field():
    plan = ContrastiveRunPlan.model_validate(_plan(refresher="whetstone-refresher-demo-1a2b3c"))
    again = ContrastiveRunPlan.model_validate(json.loads(json.dumps(plan.model_dump())))
    assert again == plan and again.first_version == 1 and again.resume_checkpoint is None
    assert [plan.epoch_of(step) for step in (0, 4, 5, 14)] == [0, 0, 1, 2]
    broken = _plan()
    del broken["epoch_ends"]
    with pytest.raises(ValidationError, match="epoch_ends"):
        ContrastiveRunPlan.model_validate(broken)
    with pytest.raises(ValidationError, match="first_verison"):
        ContrastiveRunPlan.model_validate(_plan(first_verison=2))


def test_a_restarted_worker_group_continues_the_history_from_the_registered_checkpoint(tmp_path):
    """Rank 0 saves the steps since the last checkpoint beside each one; a restarted group restores
    the steps up to the checkpoint Ray Train handed it, ignoring parts of later (unregistered)
    checkpoints, and the finished history holds every step once."""
    from whetstone.train.progress import StepLog, parts_uri

    history_uri = str(tmp_path / "train-history.json")
    first = StepLog(rank=0, total_steps=6, log_every=100, global_batch=4)
    for step in range(1, 6):
        first.history.append({"step": step, "loss": 1.0 / step})
        first.totals["fallback_steps"] += step == 3
        if step in (2, 4):  # checkpoints at 2 and 4; the one at 4 is then torn and never registered
            first.save_part(step, history_uri, None)
    assert sorted(p.name for p in (tmp_path / "train-history.parts").iterdir()) == \
        ["upto-000000002.json", "upto-000000004.json"]
    assert parts_uri(history_uri) == str(tmp_path / "train-history.parts")

    restarted = StepLog(rank=0, total_steps=6, log_every=100, global_batch=4)
    restarted.restore(2, history_uri, None)  # Ray Train restarts the group from step 2
    assert [m["step"] for m in restarted.history] == [1, 2] and restarted.totals["fallback_steps"] == 0
    for step in range(3, 7):
        restarted.history.append({"step": step, "loss": 1.0 / step})
    restarted.finish(history_uri, None)
    assert [m["step"] for m in json.loads((tmp_path / "train-history.json").read_text())] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "train-history.parts").exists()

    other_rank = StepLog(rank=1, total_steps=6, log_every=100, global_batch=4)
    first.save_part(4, history_uri, None)
    other_rank.restore(4, history_uri, None)
    assert other_rank.history == [] and other_rank.totals["fallback_steps"] == 1  # totals only; rank 0 keeps history


def test_training_jobs_restart_failed_workers_by_default():
    from whetstone.config.contrastive import ContrastiveJobConfig
    from whetstone.config.preference import PreferenceJobConfig
    from whetstone.train.runtime import train_run_config

    assert ContrastiveJobConfig().max_failures > 0
    assert PreferenceJobConfig.model_fields["max_failures"].default > 0
    with pytest.raises(ValidationError, match="max_failures"):
        ContrastiveJobConfig(max_failures=-2)
    config = train_run_config("train", "/tmp/run", None, "WARNING", max_failures=3)
    assert config.failure_config.max_failures == 3


def test_worker_groups_are_counted_and_a_restart_finds_the_newest_complete_checkpoint(tmp_path):
    """A group that died after writing step 4 but before Ray Train registered it: the restarted
    group counts itself as restart 1 and finds step 4 (a torn step 6 is skipped)."""
    from whetstone.train.checkpoint import count_worker_group, newest_complete_checkpoint

    attempt = str(tmp_path / "train")
    assert newest_complete_checkpoint(attempt) is None
    assert count_worker_group(attempt) == 1 and count_worker_group(attempt) == 2
    model, optimizer, scheduler = _trained(1)
    for step in (2, 4, 6):
        _save(tmp_path / "train" / f"step-{step:06d}", model, optimizer, scheduler, step)
    (tmp_path / "train" / "step-000006" / "model.pt").write_bytes(b"torn")  # not the size listed
    uri, state = newest_complete_checkpoint(attempt)
    assert state.step == 4 and uri.endswith("step-000004")
