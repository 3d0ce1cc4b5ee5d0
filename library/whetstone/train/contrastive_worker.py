"""The contrastive worker's parts around its step: setup, the step inputs, the checkpoint hook.

``jobs/train_contrastive.py`` reads as::

    run = setup_worker(config, plan)                # model, optimiser, loss, negatives, log
    hook = CheckpointHook(run)
    for item in StepInputs(run):                    # one StepInput per step, negatives fetched ahead
        metrics = contrastive_step(run, item)       # (or an auxiliary task's step)
        hook.after_step(item, metrics)              # report; checkpoint; ask for a refresh

Everything here runs inside a Ray Train worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.data import schemas as S
from whetstone.data.collate import collate_pairs
from whetstone.models.encoder import Encoder, autocast_dtype, set_dropout
from whetstone.train.checkpoint import TrainerState, read_optimizer_state, read_trainer_state, report_step
from whetstone.train.contrastive import (
    DualEncoder,
    LiveNegatives,
    NegativeBatch,
    build_loss,
)
from whetstone.train.plan import ContrastiveRunPlan
from whetstone.train.progress import StepLog
from whetstone.train.schedule import optimiser_step, warmup_decay_schedule
from whetstone.train.tracking import metric_writer


@dataclass
class WorkerRun:
    """What one worker holds for the whole run (built by :func:`setup_worker`)."""

    config: ContrastiveJobConfig
    plan: ContrastiveRunPlan
    rank: int
    world: int
    model: torch.nn.Module  # DualEncoder, wrapped by DDP when world > 1
    encoder: Encoder  # the trained (document) tower
    query_tower: Encoder | None  # frozen query tower, or None when queries share the encoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: torch.nn.Module
    log: StepLog
    start: TrainerState  # where this attempt starts (step 0 for a fresh run)
    guide: Encoder | None = None  # GIST's frozen guide
    negatives: LiveNegatives | None = None
    refresher: Any = None  # rank 0's handle on the IndexRefresher actor
    aux: Any = None  # AuxTasks of a multi-task run
    schedule: Any = None  # TaskScheduler of a multi-task run

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def optimise(self, loss: torch.Tensor) -> None:
        """Backward, clip, optimiser and scheduler step."""
        optimiser_step(self.model, self.optimizer, self.scheduler, loss, self.config.optim.max_grad_norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_model(self, folder: str) -> None:
        """sentence-transformers layout; with a frozen query tower, a Router model of both towers."""
        self.encoder.save(folder, query_tower=self.query_tower)


def _load_weights(config: ContrastiveJobConfig, plan: ContrastiveRunPlan, restarted: bool
                  ) -> tuple[Encoder, Encoder | None, TrainerState, dict | None]:
    """(encoder, frozen query tower or None, start state, optimiser state or None) from, in order:
    a restarted worker group's checkpoint (the one Ray Train registered last or, if the group died
    before Ray Train registered it, the newest complete one of this attempt), the checkpoint a new
    attempt resumes (``if_exists=resume``), or the base model."""
    import ray.train

    from whetstone.train.checkpoint import newest_complete_checkpoint

    frozen = config.encoder.query_tower == "frozen"
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return _load_checkpoint(folder, None, frozen)
    found = newest_complete_checkpoint(plan.checkpoint_root, config.storage) if restarted else None
    if found is not None:
        return _load_checkpoint(found[0], config.storage, frozen)
    if plan.resume_checkpoint:
        return _load_checkpoint(plan.resume_checkpoint, config.storage, frozen)
    encoder = Encoder.load(plan.base_model, device="cpu", storage=config.storage)
    tower = Encoder.load_query(plan.base_model, device="cpu", storage=config.storage) if frozen else None
    return encoder, tower, TrainerState(step=0), None


def _count_restart(config: ContrastiveJobConfig, plan: ContrastiveRunPlan, rank: int) -> int:
    """Restarts of this attempt's worker group so far (0: the first group). Rank 0 counts the
    group; the others learn the count through a collective."""
    import ray.train.torch
    import torch.distributed as dist

    from whetstone.train.checkpoint import count_worker_group

    count = count_worker_group(plan.checkpoint_root, config.storage) - 1 if rank == 0 else 0
    if dist.is_available() and dist.is_initialized():  # NCCL broadcasts from the GPU
        tensor = torch.tensor([count], device=ray.train.torch.get_device())
        dist.broadcast(tensor, src=0)
        count = int(tensor.item())
    return count


def _load_checkpoint(uri: str, storage, frozen: bool) -> tuple[Encoder, Encoder | None, TrainerState, dict | None]:
    state = read_trainer_state(uri, storage)
    if state is None:
        raise FileNotFoundError(f"{uri}: not a complete checkpoint (trainer_state.json missing or files torn)")
    encoder = Encoder.load(uri, device="cpu", storage=storage)
    tower = Encoder.load_query(uri, device="cpu", storage=storage) if frozen else None
    return encoder, tower, state, read_optimizer_state(uri, storage)


def setup_worker(config: ContrastiveJobConfig, plan: ContrastiveRunPlan) -> WorkerRun:
    """Model, DDP, optimiser and scheduler (restored on resume), loss, live negatives, log.

    Order matters: weights first (a resume replaces them), then DDP, then the optimiser over
    DDP's parameters, then its saved state.
    """
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.optim.seed)
    restarts = _count_restart(config, plan, rank)
    encoder, tower, start, optimizer_state = _load_weights(config, plan, restarts > 0)
    if restarts and rank == 0:
        limit = "unlimited" if config.max_failures < 0 else config.max_failures
        print(f"[train] worker group restarted after a failure (restart {restarts}, at most {limit}): "
              f"continuing from step {start.step}", flush=True)
    if config.encoder.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with inputs that need no grad.
        encoder.transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        encoder.transformer.config.use_cache = False  # an encoder has no cache; says so before transformers warns
    set_dropout(encoder, config.encoder.dropout)
    autocast = autocast_dtype(config.encoder.precision)
    model = ray.train.torch.prepare_model(DualEncoder(encoder, config.encoder.forward_chunk, autocast, tower))
    model.train()  # Encoder.load returns eval mode; the no-grad searches and evals restore train mode
    dual = model.module if hasattr(model, "module") else model
    encoder, tower = dual.encoder, dual.query_encoder
    if autocast is not None and encoder.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"encoder.precision=bfloat16: {torch.cuda.get_device_name(encoder.device)} has no "
                         "bfloat16 support (Ampere or newer); use encoder.precision=float32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    scheduler = warmup_decay_schedule(optimizer, plan.total_steps, config.optim.warmup_ratio)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        scheduler.load_state_dict(optimizer_state["scheduler"])
    else:  # a checkpoint from before optimiser state was saved: only the schedule can be replayed
        for _ in range(start.step):
            scheduler.step()
    log = StepLog(rank, plan.total_steps, config.optim.log_every, config.optim.batch_size * world)
    log.worker_nodes = _worker_nodes(world)
    log.writer = metric_writer(rank, plan, config.tracking, config.storage)  # rank 0: TensorBoard, MLflow
    if restarts:  # the history and totals of the steps before the restart
        log.restore(start.step, plan.history_uri, config.storage)
        log.totals["worker_restarts"] = restarts
    run = WorkerRun(config, plan, rank, world, model, encoder, tower, optimizer, scheduler,
                    build_loss(config.loss, config.optim.temperature, config.optim.symmetric), log, start)
    _attach_extras(run)
    return run


def _attach_extras(run: WorkerRun) -> None:
    """The optional parts: GIST's guide, live negatives, the refresher, auxiliary tasks."""
    import ray

    config, plan = run.config, run.plan
    if config.loss.kind == "gist":  # frozen, never wrapped in DDP, never saved
        run.guide = Encoder.load(config.loss.guide_model, device=str(run.device), storage=config.storage).eval()
        run.guide.requires_grad_(False)
    if config.negatives.source == "index":
        from whetstone.data.stream import DocStore
        from whetstone.index.client import IndexClient

        # The run's text partitions (a plan without them, from an older driver: the corpus, loaded here)
        docs = plan.docs() or DocStore.load(config.store_uri, config.storage)
        run.negatives = LiveNegatives(
            IndexClient.from_handle(timeout_s=config.negatives.search_timeout_s), docs, config.negatives.mining,
            config.optim.seed, run.rank, config.encoder.doc_max_length, config.negatives.search_timeout_s,
            config.staleness_bound, config.negatives.encode,
        )
    if plan.refresher:  # rank 0 asks it for refreshes; every rank reports the negatives it mined
        run.refresher = ray.get_actor(plan.refresher)
    if plan.task_shares:  # Piccolo2: each step's task is a function of (seed, step), the same on every worker
        from whetstone.losses.multitask import TaskScheduler
        from whetstone.train.multitask import AuxTasks

        run.schedule = TaskScheduler(plan.task_shares, config.optim.seed)
        run.aux = AuxTasks(config.multitask.tasks, plan.task_labels, run.encoder.tokenizer, run.device,
                           config.optim.batch_size, config.optim.shuffle_buffer, config.optim.seed, run.rank)
        run.log.multitask = True


def _worker_nodes(world: int) -> list[str]:
    """Node id of every rank (rank order), for the report: where did the workers run?"""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return nodes


@dataclass
class StepInput:
    """Everything one step trains on.

    Attributes:
        step: steps already done; this one is step ``step + 1``.
        epoch_batches: training-shard batches of ``epoch`` consumed up to and including this step's.
        batch: a retrieval step's collated pairs (tokens, ids); ``queries`` its query tokens on the device.
        hard: its hard negatives (None without live negatives; a fallback carries the reason).
        rows: an auxiliary task's rows (multi-task runs).
    """

    step: int
    epoch: int
    task: str
    epoch_batches: int
    batch: dict[str, Any] | None = None
    queries: dict[str, torch.Tensor] | None = None
    hard: NegativeBatch | None = None
    rows: dict[str, np.ndarray] | None = None
    topic_pure_share: float | None = None  # TAS: share of rank 0's batches so far drawn from one topic


@dataclass
class _Pending:
    """A retrieval batch whose negatives are being fetched in the background."""

    batch: dict[str, Any]
    queries: dict[str, torch.Tensor]
    negatives: Future | None = field(default=None)
    static: NegativeBatch | None = None  # negatives that came with the batch (negatives.source=static)


def _static_negatives(batch: dict[str, Any]) -> NegativeBatch:
    """The batch's own (mined-once) negatives as the step's hard negatives: query i's at rows
    ``i * N .. i * N + N - 1``, as live ones are laid out."""
    ids = [doc_id for per_query in batch["negative_ids"] for doc_id in per_query]
    return NegativeBatch(ids, batch["negative_input_ids"], batch["negative_attention_mask"], from_index=len(ids))


class StepInputs:
    """The run's remaining steps, in order, each with its batch and (fetched ahead) hard negatives.

    While step t trains, the negatives of the next retrieval step are searched and mined in a
    background thread: its queries are embedded (no grad) with the weights as they are before
    step t, the search goes to the index and the mined ids are tokenised. A resumed run starts at
    the checkpoint's step and skips the batches of its epoch that were already trained on, so the
    data order continues where it stopped.
    """

    def __init__(self, run: WorkerRun) -> None:
        self.run = run
        self.prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negatives")
        self.pad_id = run.encoder.tokenizer.pad_token_id or 0
        self.topic_batches = None

    def __iter__(self) -> Iterator[StepInput]:
        run, plan = self.run, self.run.plan
        step = run.start.step
        try:
            for epoch in range(plan.epoch_of(step), run.config.optim.epochs):
                done = run.start.epoch_batches if epoch == run.start.epoch and step == run.start.step else 0
                end = min(plan.total_steps, plan.epoch_ends[epoch])
                for item in self._epoch(epoch, step, end, done):
                    yield item
                    step = item.step + 1
        finally:
            self.prefetch.shutdown(wait=True)

    def task_at(self, step: int) -> str:
        return self.run.schedule.task_for_step(step) if self.run.schedule else "retrieval"

    def _next_retrieval(self, step: int, end: int) -> int:
        """The first retrieval step >= ``step`` (``end`` if none comes before it)."""
        while step < end and self.task_at(step) != "retrieval":
            step += 1
        return step

    def _batches(self, epoch: int, skip: int) -> Iterator[dict]:
        """This worker's shard for ``epoch``: seeded local shuffle, optional TAS regrouping, minus
        the first ``skip`` batches (trained on before a resume)."""
        import ray.train

        optim = self.run.config.optim
        batches = ray.train.get_dataset_shard("train").iter_batches(
            batch_size=optim.batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=optim.shuffle_buffer or None,
            local_shuffle_seed=optim.seed + epoch + 1000 * self.run.rank,
        )
        if optim.topic_clusters:  # TAS: same rows, regrouped into one-topic batches
            from whetstone.train.tas_balanced import TopicRegrouper

            batches = self.topic_batches = TopicRegrouper(batches, optim.batch_size, S.TOPIC)
        batches = iter(batches)
        for _ in range(skip):
            next(batches, None)
        return batches

    def _epoch(self, epoch: int, step: int, end: int, done: int) -> Iterator[StepInput]:
        log = self.run.log
        batches = self._batches(epoch, done)
        pending = self._prepare(batches, self._next_retrieval(step, end), end)
        while step < end:
            task = self.task_at(step)
            if task != "retrieval":  # an auxiliary task's step: its own batch and loss, no negatives
                log.start_wait()
                rows = self.run.aux.fetch(task)
                log.end_wait()
                yield StepInput(step, epoch, task, done, rows=rows)
                step += 1
                continue
            if pending is None:  # the shard ran out before the planned end of the epoch
                return
            upcoming = self._prepare(batches, self._next_retrieval(step + 1, end), end)
            hard = pending.negatives.result() if pending.negatives is not None else pending.static
            done += 1
            yield StepInput(step, epoch, task, done, pending.batch, pending.queries, hard,
                            topic_pure_share=self.topic_batches.pure_share if self.topic_batches else None)
            step += 1
            pending = upcoming

    def _prepare(self, batches: Iterator[dict], for_step: int, end: int) -> _Pending | None:
        """Read the batch of retrieval step ``for_step`` and start fetching its negatives."""
        if for_step >= end:
            return None
        run = self.run
        run.log.start_wait()
        raw = next(batches, None)
        run.log.end_wait()
        if raw is None:
            return None
        batch = collate_pairs(raw, pad_token_id=self.pad_id)
        queries = {"input_ids": batch["query_input_ids"].to(run.device),
                   "attention_mask": batch["query_attention_mask"].to(run.device)}
        if "negative_input_ids" in batch:  # static negatives, mined once and resolved by the data pipeline
            return _Pending(batch, queries, static=_static_negatives(batch))
        if run.negatives is None:
            return _Pending(batch, queries)
        # The lag is counted against `for_step`, the steps trained before this batch's (the current step may
        # still be training: the queries are embedded with the weights one step older).
        vectors = run.negatives.embed_queries(run.query_tower or run.encoder, queries)
        future = self.prefetch.submit(run.negatives.fetch, vectors, batch["positive_ids"], run.encoder.tokenizer,
                                      for_step)
        return _Pending(batch, queries, future)


class CheckpointHook:
    """After each step: report its metrics (every ``optim.log_every`` steps); checkpoint on refresh
    steps, every ``optim.checkpoint_every`` steps and at the end (rank 0 writes); ask for a refresh."""

    def __init__(self, run: WorkerRun) -> None:
        self.run = run

    def after_step(self, item: StepInput, metrics: dict) -> None:
        run, step = self.run, item.step + 1
        final = step == run.plan.total_steps
        every_refresh, every_checkpoint = run.config.refresh.every_steps, run.config.optim.checkpoint_every
        refresh = bool(every_refresh and step % every_refresh == 0 and not final)
        save = final or refresh or bool(every_checkpoint and step % every_checkpoint == 0)
        # Where the data stands for the next step: the same epoch, or the start of the next one.
        epoch = run.plan.epoch_of(step)
        state = TrainerState(step=step, epoch=epoch, epoch_batches=item.epoch_batches if epoch == item.epoch else 0)
        if save and not final:  # the steps' metrics since the last checkpoint, for a restarted group
            run.log.save_part(step, run.plan.history_uri, run.config.storage)
        # ray.train.report waits until the controller has taken the previous report (about a second
        # apart in Ray 2.60): a step of a few hundred ms waited on it every step. Metrics are reported
        # every log_every steps and with every checkpoint; the per-step history is kept by run.log.
        if save or step % run.config.optim.log_every == 0:
            report_step(metrics, rank=run.rank, checkpoint=save, save_model=run.save_model,
                        optimizer=run.optimizer, scheduler=run.scheduler, state=state,
                        name="final" if final else None)
        if run.refresher is not None and item.hard is not None and item.hard.ids and run.config.refresh.fraction < 1:
            run.refresher.note_served.remote(item.hard.ids)  # a partial refresh re-embeds these first
        if refresh and run.rank == 0 and run.refresher is not None:
            run.refresher.request.remote(f"{run.plan.checkpoint_root}/step-{step:06d}", step)
