"""Piccolo2's multi-task hybrid loss: one loss per task kind, task-homogeneous batches.

Piccolo2 (Huang et al. 2024, arXiv 2405.06932) trains one embedding model on retrieval, graded
similarity (STS) and classification data at once, with a loss suited to each:

- retrieval: InfoNCE with in-batch and hard negatives, τ = 0.01, weight 1;
- STS / graded pairs: CoSENT with s = cos / 0.05, weight 0.04;
- classification: label contrast at τ = 0.05, up to 10 other labels as negatives, no in-batch
  negatives, weight 0.2.

Each batch holds one task only (mixing would put, say, classification texts into the in-batch
negatives of retrieval queries), and with several workers every worker must take the same task at
the same step, or the gathered batch and DDP's collectives would mix losses with different graphs.
:class:`TaskScheduler` makes the choice a pure function of (seed, step), so workers agree without
communicating.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from whetstone.config.base import StrictModel
from whetstone.losses.cosent import CoSENTLoss
from whetstone.losses.info_nce import InfoNCELoss
from whetstone.losses.label_contrast import LabelContrastLoss

TaskKind = Literal["retrieval", "sts", "classification"]

# Piccolo2's settings per kind: (temperature, weight)
PICCOLO2_DEFAULTS: dict[str, tuple[float, float]] = {
    "retrieval": (0.01, 1.0),
    "sts": (0.05, 0.04),
    "classification": (0.05, 0.2),
}


class TaskLossConfig(StrictModel):
    """One task of the mix; unset temperature and weight take Piccolo2's value for the kind."""

    kind: TaskKind
    weight: float | None = Field(None, ge=0, description="loss multiplier; Piccolo2: 1 / 0.04 / 0.2")
    temperature: float | None = Field(None, gt=0, le=1, description="Piccolo2: 0.01 / 0.05 / 0.05")
    symmetric: bool = Field(False, description="retrieval only: add the document-to-query term")
    max_negatives: int = Field(10, ge=1, description="classification only: other labels per text")


@dataclass
class MultiTaskOutput:
    """The task's weighted per-example losses plus its own loss output (diagnostics)."""

    task: str
    losses: torch.Tensor  # (B,) or (1,) for CoSENT, already multiplied by ``weight``
    weight: float
    output: Any  # the task loss's output object, unweighted


class MultiTaskLoss(nn.Module):
    """Dispatch a task-homogeneous batch to its task's loss and apply the task's weight.

    Args:
        losses: task name -> loss module (any of this package's losses; forward signatures differ
            per kind: InfoNCE takes (queries, docs, positive_column[, exclude_mask]), CoSENT takes
            (a, b, labels), label contrast takes (texts, label_embeddings, labels[, negatives])).
        weights: task name -> multiplier >= 0; missing names get 1.0.

    Use :meth:`from_config` for Piccolo2's mix. Shapes follow the task loss; ``losses`` of the
    output is the task loss's ``losses`` times the weight.
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        if not losses:
            raise ValueError("MultiTaskLoss needs at least one task")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ValueError(f"weights name tasks without a loss: {unknown}")
        if any(weight < 0 for weight in weights.values()):
            raise ValueError(f"task weights must be >= 0, got {weights}")
        self.task_losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights.get(name, 1.0)) for name in losses}

    @classmethod
    def from_config(cls, tasks: Mapping[str, TaskLossConfig | Mapping[str, Any]]) -> MultiTaskLoss:
        """Build the Piccolo2 mix from ``{task name: TaskLossConfig}`` (dicts are validated)."""
        losses: dict[str, nn.Module] = {}
        weights: dict[str, float] = {}
        for name, raw in tasks.items():
            spec = raw if isinstance(raw, TaskLossConfig) else TaskLossConfig.model_validate(raw)
            default_temperature, default_weight = PICCOLO2_DEFAULTS[spec.kind]
            temperature = spec.temperature if spec.temperature is not None else default_temperature
            weights[name] = spec.weight if spec.weight is not None else default_weight
            if spec.kind == "retrieval":
                losses[name] = InfoNCELoss(temperature=temperature, symmetric=spec.symmetric)
            elif spec.kind == "sts":
                losses[name] = CoSENTLoss(temperature=temperature)
            else:
                losses[name] = LabelContrastLoss(temperature=temperature, max_negatives=spec.max_negatives)
        return cls(losses, weights)

    @property
    def tasks(self) -> list[str]:
        return list(self.task_losses.keys())

    def forward(self, task: str, *args: Any, **kwargs: Any) -> MultiTaskOutput:
        """Run task ``task``'s loss on this batch (all of whose rows belong to that task)."""
        if task not in self.task_losses:
            raise ValueError(f"unknown task {task!r}; this loss knows {self.tasks}")
        output = self.task_losses[task](*args, **kwargs)
        weight = self.weights[task]
        return MultiTaskOutput(task, weight * output.losses, weight, output)


def scheduled_task(step: int, seed: int, weights: Mapping[str, float]) -> str:
    """The task for ``step``: a draw proportional to ``weights`` seeded by (seed, step) only.

    Names are sorted first, so two workers that built ``weights`` in a different order still agree.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    names = sorted(weights)
    mass = np.array([float(weights[name]) for name in names], dtype=np.float64)
    # numpy's seed-sequence generator is the same on every platform and process
    draw = np.random.default_rng([int(seed), int(step)]).random() * mass.sum()
    index = int(np.searchsorted(np.cumsum(mass), draw, side="right"))
    return names[min(index, len(names) - 1)]


class TaskScheduler:
    """Which task every worker trains on at each step, without communication.

    Args:
        weights: task name -> sampling weight > 0 (e.g. dataset sizes, or given shares).
        seed: run seed; the same on every worker.

    Use :meth:`from_sizes` to weight by dataset size, optionally flattened with an exponent < 1
    (size ** 0.5 gives small tasks more steps than pure proportional sampling).
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0):
        if not weights:
            raise ValueError("TaskScheduler needs at least one task")
        bad = {name: weight for name, weight in weights.items() if not float(weight) > 0}
        if bad:
            raise ValueError(f"task sampling weights must be > 0, got {bad}")
        self.weights = {name: float(weight) for name, weight in weights.items()}
        self.seed = int(seed)

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, int], seed: int = 0, exponent: float = 1.0) -> TaskScheduler:
        """Weights ``size ** exponent`` per task (exponent 1: proportional to dataset size)."""
        empty = sorted(name for name, size in sizes.items() if size <= 0)
        if empty:
            raise ValueError(f"tasks {empty} have no examples")
        return cls({name: float(size) ** exponent for name, size in sizes.items()}, seed)

    def task_for_step(self, step: int) -> str:
        return scheduled_task(step, self.seed, self.weights)

    def schedule(self, start: int, count: int) -> list[str]:
        """Tasks for steps ``start .. start + count - 1``."""
        return [self.task_for_step(step) for step in range(start, start + count)]

    def shares(self) -> dict[str, float]:
        """Expected share of steps per task."""
        total = sum(self.weights.values())
        return {name: weight / total for name, weight in self.weights.items()}


    def epoch_ends(self, main_task: str, main_steps_per_epoch: int, epochs: int) -> list[int]:
        """Global step at which each epoch ends, an epoch being ``main_steps_per_epoch`` steps of
        ``main_task`` (the other tasks' steps fall in between, wherever the draws put them)."""
        if main_task not in self.weights:
            raise ValueError(f"main task {main_task!r} is not one of {sorted(self.weights)}")
        if main_steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"need >= 1 main step per epoch and >= 1 epoch, got {main_steps_per_epoch}, {epochs}")
        ends, step = [], 0
        for _ in range(epochs):
            seen = 0
            while seen < main_steps_per_epoch:
                seen += self.task_for_step(step) == main_task
                step += 1
            ends.append(step)
        return ends
