"""Auxiliary-task steps of a multi-task contrastive run (Piccolo2), kept out of the job loop.

The job's main task is retrieval (its pairs, live negatives, the gathered InfoNCE). Each
auxiliary task (graded pairs with CoSENT, labelled texts with label contrast) has its own Ray
Data dataset, split across the workers like the pairs; :class:`AuxTasks` cycles through each
worker's shard of it (a new shuffled pass when one ends) and computes the task's loss on one
batch. Which task a step trains is :class:`whetstone.losses.multitask.TaskScheduler`'s call, a
pure function of (seed, step), so all workers run the same task at the same step: DDP's gradient
all-reduce then always joins identical graphs, and no task's batch mixes with another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from whetstone.config.contrastive import AuxTaskConfig
from whetstone.data import tasks as T
from whetstone.losses.label_contrast import NO_LABEL, sample_negative_labels
from whetstone.losses.multitask import MultiTaskLoss


def task_dataset_name(task: str) -> str:
    """The Ray Train dataset name of an auxiliary task (the pairs are ``train``)."""
    return f"task-{task}"


class AuxTasks:
    """Batches and losses of the auxiliary tasks, on one worker.

    Args:
        tasks: the job's ``multitask.tasks``.
        labels: classification task -> its label texts in id order (from the driver).
        tokenizer: the encoder's tokenizer.
        device: where the model runs.
        default_batch_size: ``optim.batch_size`` (rows per worker per step unless a task sets its own).
        shuffle_buffer: local shuffle buffer per pass (0: the driver's one shuffle only).
        seed, rank: make each worker's shuffles and negative-label draws distinct and repeatable.
        shards: task -> a Ray Data iterator (``ray.train.get_dataset_shard`` when omitted).
    """

    def __init__(self, tasks: Sequence[AuxTaskConfig], labels: dict[str, list[str]], tokenizer: Any,
                 device: torch.device, default_batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, shards: dict[str, Any] | None = None):
        self.specs = {task.name: task for task in tasks}
        self.loss = MultiTaskLoss.from_config({
            task.name: {"kind": task.kind, "weight": task.weight, "temperature": task.temperature,
                        "max_negatives": task.max_negatives} for task in tasks})
        missing = sorted(t.name for t in tasks if t.kind == "classification" and len(labels.get(t.name, [])) < 2)
        if missing:
            raise ValueError(f"classification tasks {missing} need their label texts (at least 2)")
        self.labels = labels
        self.tokenizer = tokenizer
        self.device = device
        self.default_batch_size = default_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank = seed, rank
        self.shards = dict(shards or {})
        self.passes: dict[str, int] = {name: 0 for name in self.specs}
        self._batches: dict[str, Any] = {}
        self.generator = torch.Generator().manual_seed(1_000_003 * seed + rank)

    def batch_size(self, task: str) -> int:
        return self.specs[task].batch_size or self.default_batch_size

    def _shard(self, task: str) -> Any:
        if task not in self.shards:
            import ray.train

            self.shards[task] = ray.train.get_dataset_shard(task_dataset_name(task))
        return self.shards[task]

    def fetch(self, task: str) -> dict[str, np.ndarray]:
        """The task's next batch of rows; a pass that ends starts the next (reshuffled) one."""
        if task not in self.specs:
            raise ValueError(f"unknown auxiliary task {task!r}; known: {sorted(self.specs)}")
        for fresh in (False, True):
            if self._batches.get(task) is None:
                self._batches[task] = iter(self._shard(task).iter_batches(
                    batch_size=self.batch_size(task), batch_format="numpy", drop_last=True, prefetch_batches=1,
                    local_shuffle_buffer_size=self.shuffle_buffer or None,
                    local_shuffle_seed=self.seed + 7919 * self.passes[task] + 1000 * self.rank))
            rows = next(self._batches[task], None)
            if rows is not None:
                return rows
            self._batches[task] = None
            self.passes[task] += 1
            if fresh:
                break
        raise RuntimeError(f"task {task!r}: this worker's share of the data holds no full batch of "
                           f"{self.batch_size(task)} rows")

    def _tokens(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                                 return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def loss_on(self, model: torch.nn.Module, task: str, rows: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict]:
        """Forward one batch of ``task`` through ``model`` (a :class:`DualEncoder`, DDP-wrapped or
        not: one call, both sides) and return the weighted mean loss and float diagnostics."""
        spec = self.specs[task]
        if spec.kind == "sts":
            first, second = self._tokens(rows[T.SENTENCE1], spec.max_length), self._tokens(rows[T.SENTENCE2], spec.max_length)
            a, b = model(*first, *second)  # (P, D), (P, D)
            scores = torch.as_tensor(np.asarray(rows[T.SCORE], dtype=np.float32), device=a.device)  # (P,)
            out = self.loss(task, a, b, scores)
            return out.losses.mean(), {"concordance": out.output.concordance}
        label_texts = self.labels[task]
        labels = torch.as_tensor(np.asarray(rows[T.LABEL_ID], dtype=np.int64))  # (B,)
        negatives = sample_negative_labels(labels, len(label_texts), spec.max_negatives, self.generator)  # (B, K)
        # Embed only the labels this batch uses (a label set can be large), then renumber into them.
        used = torch.unique(torch.cat([labels, negatives[negatives != NO_LABEL]]))  # (U,) sorted
        local_labels = torch.searchsorted(used, labels)  # (B,)
        local_negatives = torch.where(negatives == NO_LABEL, negatives,
                                      torch.searchsorted(used, negatives.clamp(min=0)))  # (B, K)
        texts = self._tokens(rows[T.TEXT], spec.max_length)
        label_tokens = self._tokens([label_texts[i] for i in used.tolist()], spec.max_length)
        text_emb, label_emb = model(*texts, *label_tokens)  # (B, D), (U, D)
        out = self.loss(task, text_emb, label_emb, local_labels.to(text_emb.device),
                        local_negatives.to(text_emb.device))
        inner = out.output
        return out.losses.mean(), {
            "score_gap": float((inner.positive_scores - inner.hardest_negative_scores).mean()),
            "label_accuracy": float((inner.positive_scores > inner.hardest_negative_scores).float().mean()),
        }
