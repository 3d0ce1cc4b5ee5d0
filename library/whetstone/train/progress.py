"""Per-step metrics and progress lines for training workers (a hook, so the loop stays short).

Every worker computes the same metrics (they go to ``ray.train.report``); rank 0 prints a line
every ``log_every`` steps: step, loss, learning rate, pairs/s, the share of time spent waiting
for data, the index version the negatives came from, and fallbacks.
"""

from __future__ import annotations

import logging
import time
from typing import Any


def apply_train_log_level(level: str) -> None:
    """Worker side of ``ray_train_log_level`` (the driver passes it to ``ray.train.LoggingConfig``).

    Ray Train's per-report line ("Reporting training result N: TrainingReport(...)", the whole
    metrics dict, from every worker at every step) comes from a logger named after its source file
    rather than one under ``ray.train``, so ``LoggingConfig``'s level filter misses it (Ray 2.60);
    this sets that logger's level too. A Ray without that module is left alone.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(getattr(logging, level))


class StepLog:
    def __init__(self, rank: int, total_steps: int, log_every: int, global_batch: int):
        self.rank = rank
        self.total_steps = total_steps
        self.log_every = log_every
        self.global_batch = global_batch
        self.started = time.monotonic()
        self.wait_started: float | None = None
        self.last_step_end = time.monotonic()
        self.wait_s = 0.0
        self.step_wait_s = 0.0
        self.busy_s = 0.0
        self.totals: dict[str, float] = {
            "negatives_from_index": 0, "negatives_random_fill": 0, "negatives_dropped_margin": 0,
            "fallback_steps": 0, "steps": 0, "negative_candidates": 0,
        }
        self.versions_seen: set[int] = set()
        self.worker_nodes: list[str] = []
        self.history: list[dict[str, float]] = []  # rank 0: the scalar metrics of every step
        self.multitask = False  # True: count steps per task (retrieval and the auxiliary ones)
        self.saved = 0  # history entries already in a part (save_part)
        self.writer = None  # rank 0: TensorBoard / MLflow (whetstone.train.tracking.metric_writer)

    def start_wait(self) -> None:
        self.wait_started = time.monotonic()

    def end_wait(self) -> None:
        if self.wait_started is not None:
            self.step_wait_s = time.monotonic() - self.wait_started
            self.wait_s += self.step_wait_s
            self.wait_started = None

    def _tick(self) -> float:
        """Seconds since the last step ended; counts the step."""
        now = time.monotonic()
        step_s = now - self.last_step_end
        self.last_step_end = now
        self.busy_s += step_s
        self.totals["steps"] += 1
        return step_s

    def _record(self, metrics: dict[str, Any]) -> None:
        """Add the running totals; rank 0 keeps the step's scalars for the history."""
        metrics.update({f"total_{k}": v for k, v in self.totals.items()})
        if self.rank == 0:
            self.history.append({k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not k.startswith("total_")})
            if self.writer is not None:
                self.writer.add(self.history[-1])
        metrics["worker_nodes"] = self.worker_nodes

    def step(self, step: int, epoch: int, loss: float, lr: float, out, hard) -> dict[str, Any]:
        step_s = self._tick()
        if self.multitask:
            self.totals["steps_retrieval"] = self.totals.get("steps_retrieval", 0) + 1
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "step_s": step_s,
            "t": time.time(),  # when the step ended (wall clock: lines steps up with refreshes)
            "data_wait_s": self.step_wait_s,
            "data_wait_fraction": self.wait_s / max(self.busy_s, 1e-9),
            "pairs_per_s": self.global_batch / max(step_s, 1e-9),
            "score_gap": float((out.positive_scores - out.hardest_negative_scores).mean()),
            "masked_fraction": out.masked_fraction,
        }
        if hard is not None:
            self.totals["negatives_from_index"] += hard.from_index
            self.totals["negatives_random_fill"] += hard.random_fill
            self.totals["negatives_dropped_margin"] += hard.dropped_by_margin
            self.totals["negative_candidates"] += hard.candidates
            if hard.fallback_reason:
                self.totals["fallback_steps"] += 1
                kind = f"fallback_steps_{hard.fallback_kind or 'other'}"
                self.totals[kind] = self.totals.get(kind, 0) + 1
            if hard.version is not None:
                self.versions_seen.add(hard.version)
            if hard.steps_behind is not None:
                self.totals["max_index_steps_behind"] = max(self.totals.get("max_index_steps_behind", 0),
                                                            hard.steps_behind)
            metrics.update(index_version=hard.version if hard.version is not None else -1,
                           index_steps_behind=hard.steps_behind if hard.steps_behind is not None else -1,
                           false_negative_dropped_share=hard.dropped_by_margin / max(hard.candidates, 1),
                           search_s=hard.search_s, fallback=hard.fallback_reason or "")
        self._record(metrics)
        if self.rank == 0 and (step % self.log_every == 0 or step == self.total_steps):
            index = ""
            if hard is not None:
                lag = "" if hard.steps_behind is None else f", {hard.steps_behind} steps old"
                index = (f" | index v{hard.version}{lag} negs {hard.from_index}"
                         f"+{hard.random_fill}rnd, fn-dropped {100 * metrics['false_negative_dropped_share']:.0f}%")
                if hard.fallback_reason:
                    index = f" | FALLBACK to in-batch ({hard.fallback_reason})"
            print(
                f"[train] step {step}/{self.total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.2e} "
                f"{metrics['pairs_per_s']:.1f} pairs/s wait {100 * metrics['data_wait_fraction']:.1f}% "
                f"gap {metrics['score_gap']:+.3f}{index}",
                flush=True,
            )
        return metrics

    def task_step(self, step: int, epoch: int, task: str, loss: float, lr: float,
                  diagnostics: dict[str, float]) -> dict[str, Any]:
        """Metrics of an auxiliary-task step (multi-task runs): its loss is ``loss_<task>``, so the
        retrieval loss curve stays one task's."""
        step_s = self._tick()
        self.totals[f"steps_{task}"] = self.totals.get(f"steps_{task}", 0) + 1
        metrics: dict[str, Any] = {"step": step, "epoch": epoch, "task": task, f"loss_{task}": loss, "lr": lr,
                                   "step_s": step_s, "data_wait_s": self.step_wait_s,
                                   "data_wait_fraction": self.wait_s / max(self.busy_s, 1e-9),
                                   **{f"{task}_{k}": v for k, v in diagnostics.items()}}
        self._record(metrics)
        if self.rank == 0 and (step % self.log_every == 0 or step == self.total_steps):
            extra = " ".join(f"{k} {v:.3f}" for k, v in diagnostics.items())
            print(f"[train] step {step}/{self.total_steps} epoch {epoch} task {task} loss {loss:.4f} lr {lr:.2e} "
                  f"{step_s:.1f} s/step {extra}", flush=True)
        return metrics

    def save_part(self, step: int, history_uri: str, storage=None) -> None:
        """Rank 0, beside the checkpoint of ``step``: persist the steps since the last part and the
        running totals, so a restarted worker group continues the history (:meth:`restore`)."""
        if self.rank != 0:
            return
        import json

        from whetstone import storage as store

        part = {"history": self.history[self.saved:], "totals": self.totals,
                "versions_seen": sorted(self.versions_seen)}
        store.write_bytes(store.join(parts_uri(history_uri), f"upto-{step:09d}.json"), json.dumps(part).encode(),
                          storage)
        self.saved = len(self.history)
        if self.writer is not None:  # the event files of an s3:// run go up with each checkpoint
            self.writer.sync()

    def restore(self, step: int, history_uri: str, storage=None) -> None:
        """Rank 0 of a restarted worker group: the history and totals of steps 1..``step`` from the
        parts the killed group saved (parts past ``step`` belong to checkpoints Ray Train never
        registered and are ignored)."""
        import json

        from whetstone import storage as store

        folder = parts_uri(history_uri)
        names = sorted(uri.rstrip("/").rsplit("/", 1)[-1] for uri in store.list_dir(folder, storage))
        parts = [name for name in names if name.startswith("upto-") and int(name[5:-5]) <= step]
        history: list[dict[str, float]] = []
        for name in parts:
            part = json.loads(store.read_bytes(store.join(folder, name), storage))
            history += [m for m in part["history"] if m.get("step", 0) <= step]
            self.totals.update(part["totals"])
            self.versions_seen.update(part["versions_seen"])
        if self.rank == 0:
            self.history, self.saved = history, len(history)

    def finish(self, history_uri: str | None = None, storage=None) -> None:
        """Rank 0 prints the closing line and writes the per-step history (the driver plots it)."""
        if self.writer is not None:
            self.writer.close()
        if self.rank == 0 and history_uri:
            import json

            from whetstone import storage as store

            store.write_bytes(history_uri, json.dumps(self.history).encode(), storage)
            store.delete_dir(parts_uri(history_uri), storage)  # the parts are in the history now
        if self.rank == 0:
            elapsed = time.monotonic() - self.started
            print(
                f"[train] done: {int(self.totals['steps'])} steps in {elapsed:.1f} s, "
                f"data wait {100 * self.wait_s / max(self.busy_s, 1e-9):.1f}%, "
                f"negatives from index {int(self.totals['negatives_from_index'])} (rank 0), "
                f"fallback steps {int(self.totals['fallback_steps'])}, index versions {sorted(self.versions_seen)}",
                flush=True,
            )


def parts_uri(history_uri: str) -> str:
    """Where the history's parts wait until the run ends (``<history>.parts/upto-<step>.json``)."""
    return f"{history_uri.removesuffix('.json')}.parts"
