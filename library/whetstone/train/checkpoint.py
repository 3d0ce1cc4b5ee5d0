"""Training checkpoints that a new attempt can continue: weights, optimiser, scheduler, data position.

A checkpoint folder holds what the job's ``save_model`` writes (sentence-transformers or HF
layout), ``optimizer_state.pt`` (the optimiser's and the LR scheduler's ``state_dict``) and,
written last, ``trainer_state.json``: the step, where the data stood (epoch and batches of the
epoch already trained on) and the size of every other file in the folder. A folder whose files do
not match that list was torn (the process died while it was being written or copied) and is
never resumed from.

Only rank 0 writes: under DDP every worker holds the same weights and optimiser state.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer_state.pt"


class TrainerState(BaseModel):
    """``trainer_state.json``: where a run stood when it saved this checkpoint."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0)
    epoch: int = Field(0, ge=0, description="epoch the next step belongs to")
    epoch_batches: int = Field(0, ge=0, description="training-shard batches of that epoch already trained on")
    metrics: dict[str, float] = Field(default_factory=dict)
    files: dict[str, int] = Field(default_factory=dict, description="every other file of the folder and its size")


def write_checkpoint(folder: str, save_model: Callable[[str], None], optimizer: Any, scheduler: Any,
                     state: TrainerState) -> None:
    """Fill ``folder``: the model, then the optimiser and scheduler (unless ``optimizer`` is None),
    then ``trainer_state.json``."""
    import torch

    save_model(folder)
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(folder, OPTIMIZER_STATE))
    files = store.file_sizes(folder)
    files.pop(TRAINER_STATE, None)
    with open(os.path.join(folder, TRAINER_STATE), "w") as fh:
        json.dump(state.model_copy(update={"files": files}).model_dump(), fh)


def report_step(metrics: dict, *, rank: int, checkpoint: bool, save_model: Callable[[str], None],
                optimizer: Any, scheduler: Any, state: TrainerState, name: str | None = None) -> None:
    """``ray.train.report`` this step's metrics; with ``checkpoint``, rank 0 attaches a checkpoint
    (named ``name``, default ``step-NNNNNN``)."""
    import ray.train

    if not checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if name == "final":  # the published model: a finished run is never resumed, AdamW's state (2x) stays out
        optimizer = None
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(folder, save_model, optimizer, scheduler, state.model_copy(update={"metrics": numbers}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name or f"step-{state.step:06d}")


def read_trainer_state(uri: str, storage: StorageConfig | None = None) -> TrainerState | None:
    """The checkpoint's state, or None when it is incomplete (missing, unreadable or torn)."""
    try:
        state = TrainerState.model_validate_json(store.read_bytes(store.join(uri, TRAINER_STATE), storage))
    except (FileNotFoundError, ValueError):
        return None
    if state.files:
        present = store.file_sizes(uri, storage)
        if any(present.get(name) != size for name, size in state.files.items()):
            return None
    return state


def read_optimizer_state(uri: str, storage: StorageConfig | None = None) -> dict | None:
    """``{"optimizer": ..., "scheduler": ...}`` state dicts saved in checkpoint ``uri`` (a local
    folder or a storage URI), or None when the checkpoint has none (an older checkpoint)."""
    import io

    import torch

    try:
        data = store.read_bytes(store.join(uri, OPTIMIZER_STATE), storage)
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def restore_optimizer(uri: str, optimizer: Any, scheduler: Any, storage: StorageConfig | None = None) -> bool:
    """Load the optimiser's and scheduler's state saved in checkpoint ``uri``. Returns False when
    the checkpoint has none (the caller then starts them fresh)."""
    saved = read_optimizer_state(uri, storage)
    if saved is None:
        return False
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return True


def _attempt_folders(run_uri: str, storage: StorageConfig | None) -> list[str]:
    """Each attempt is its own Ray Train run: ``train/`` first, then ``train-from-<step>/`` per resume."""
    out = []
    for uri in store.list_dir(run_uri, storage):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name == "train" or (name.startswith("train-from-") and name[11:].isdigit()):
            out.append(uri)
    return out


def newest_complete_checkpoint(attempt_uri: str, storage: StorageConfig | None = None
                               ) -> tuple[str, TrainerState] | None:
    """The newest complete ``step-N`` checkpoint in one attempt's folder (None: there is none).

    A restarted worker group uses it when Ray Train registered no checkpoint: the group died
    after a checkpoint was fully written but before the controller took the report."""
    found = []
    for uri in store.list_dir(attempt_uri, storage):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step-") and name[5:].isdigit():
            found.append((int(name[5:]), uri))
    for _, uri in sorted(found, reverse=True):
        state = read_trainer_state(uri, storage)
        if state is not None:
            return uri, state
        print(f"[run] skipping incomplete checkpoint {uri}", flush=True)
    return None


def count_worker_group(attempt_uri: str, storage: StorageConfig | None = None) -> int:
    """Rank 0 at setup: number this worker group within the attempt (1 for the first, 2 after the
    first restart, ...), kept in ``<attempt>.groups``, so a restart is counted even when it found
    no checkpoint to continue from."""
    uri = f"{attempt_uri.rstrip('/')}.groups"
    try:
        groups = int(store.read_bytes(uri, storage)) + 1
    except FileNotFoundError:
        groups = 1
    store.write_bytes(uri, str(groups).encode(), storage)
    return groups


def worker_restarts(attempt_uri: str, storage: StorageConfig | None = None) -> int:
    """The driver, after the attempt: how many times its worker group was restarted (0: never)."""
    try:
        return max(0, int(store.read_bytes(f"{attempt_uri.rstrip('/')}.groups", storage)) - 1)
    except FileNotFoundError:
        return 0


def find_resume_checkpoint(run_uri: str, storage: StorageConfig | None = None) -> tuple[str, TrainerState] | None:
    """The newest complete ``step-N`` checkpoint of any attempt of the run (None: start fresh).

    Raises:
        ConfigError: the run already finished (a ``final`` checkpoint exists).
    """
    newest: tuple[str, TrainerState] | None = None
    for attempt in _attempt_folders(run_uri, storage):
        if store.exists(store.join(attempt, "final"), storage):
            raise ConfigError(f"if_exists: {run_uri} already finished ({store.join(attempt, 'final')} exists); "
                              "use if_exists=overwrite or a new run_name")
        found = newest_complete_checkpoint(attempt, storage)
        if found is not None and (newest is None or found[1].step > newest[1].step):
            newest = found
    return newest
