"""Run plans: what the driver works out before training and every worker needs to know.

The driver builds one plan (steps, epoch boundaries, where checkpoints and history go, where a
resumed run starts, which refresher to poke); it crosses to the workers as JSON-safe data inside
``train_loop_config`` and each worker validates it again, so a missing or misspelt field fails at
the start of the run and names itself, not as a ``KeyError`` deep in the loop.
"""

from __future__ import annotations

import bisect
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RunPlan(BaseModel):
    """The fields both training jobs share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_steps: int = Field(ge=1, description="optimiser steps of the whole run (max_steps applied)")
    steps_per_epoch: int = Field(ge=1, description="steps one pass over the training rows takes")
    checkpoint_root: str = Field(description="this attempt's Ray Train run folder (step-N/ and final/ inside)")
    history_uri: str = Field(description="where rank 0 writes the per-step metrics (the driver plots them)")
    resume_checkpoint: str | None = Field(None, description="checkpoint a new attempt starts from (if_exists=resume)")
    resume_step: int = Field(0, ge=0, description="steps already trained by the checkpoint resumed from")
    tensorboard_uri: str | None = Field(None, description="<run>/tensorboard: rank 0 writes train/ there (None: off)")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI rank 0 sends its metrics to")
    mlflow_run_id: str | None = Field(None, description="the run's MLflow run (created by the driver)")


class ContrastiveRunPlan(RunPlan):
    """The contrastive job's plan (see ``jobs/train_contrastive.py``)."""

    base_model: str = Field(description="absolute path or URI of the model training starts from")
    train_rows: int = Field(ge=1, description="training rows in one epoch (one per query, or per (query, positive))")
    epoch_ends: list[int] = Field(description="the step at which each epoch ends (multi-task steps included)")
    task_shares: dict[str, float] | None = Field(None, description="Piccolo2 task mix; None: retrieval only")
    task_labels: dict[str, list[str]] = Field(default_factory=dict, description="labels of classification tasks")
    refresher: str | None = Field(None, description="name of the IndexRefresher actor rank 0 asks for refreshes")
    first_version: int = Field(1, ge=1, description="index version serving when this attempt starts")
    doc_lookup: str | None = Field(None, description="name prefix of the document-text partition actors")
    doc_partition_sizes: list[int] = Field(default_factory=list, description="documents in each text partition")

    def docs(self) -> Any:
        """The run's :class:`whetstone.data.doc_lookup.DocLookup` (found by name), or None."""
        if self.doc_lookup is None:
            return None
        import ray

        from whetstone.data.doc_lookup import DocLookup

        return DocLookup([ray.get_actor(f"{self.doc_lookup}-{p}") for p in range(len(self.doc_partition_sizes))],
                         self.doc_partition_sizes)

    def epoch_of(self, step: int) -> int:
        """The epoch that step ``step + 1`` belongs to (steps are counted from 0 done)."""
        return bisect.bisect_right(self.epoch_ends, step)


class PreferenceRunPlan(RunPlan):
    """The preference job's plan (see ``jobs/train_preference.py``)."""

    current_time_step: float = Field(description="NS-DPO's T: the newest time step + 1")
    has_eval: bool = Field(description="an `eval` dataset shard exists")
    generation_actors: list[str] = Field(default_factory=list, description="mode=online: names of the "
                                         "generation actors the workers sample from and rank 0 pushes weights to")
    reward_app: str | None = Field(None, description="mode=online: the Serve reward app the workers score with")
    reward_url: str | None = Field(None, description="mode=online: or the reward service's HTTP /score URL")
