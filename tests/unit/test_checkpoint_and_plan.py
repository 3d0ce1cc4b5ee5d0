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
