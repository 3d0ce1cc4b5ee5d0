"""Preference training, worker side: setup, one step, the checkpoint hook, the end of the loop.

The loops themselves are in ``jobs/train_preference.py`` and read::

    worker = setup_policy_run(config, plan)                  # model, DDP, optimiser, schedule, resume
    for epoch, state, raw in train_batches(shard, config, plan, worker.start, worker.rank):
        values = preference_step(worker, raw, config, plan)  # forward, loss, backward, optimiser
        metrics = worker.log.step(state.step, epoch, worker.lr(), values)
        after_step(worker, metrics, state, config, plan)     # report; checkpoint every N steps
    finish_worker(worker, metrics, state, config, plan)      # history, eval, the `final` checkpoint

Resume: a checkpoint (a restarted worker group's, or ``plan.resume_checkpoint`` of a new attempt
after ``if_exists=resume``) supplies the weights, the optimiser's and LR schedule's state and the
data position (:class:`~whetstone.train.checkpoint.TrainerState`); :func:`train_batches` replays
the passes over the data already trained (unread) and skips the batches of the current epoch
already trained, so the resumed run sees the batches the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from whetstone.config.base import StorageConfig
from whetstone.config.preference import PreferenceJobConfig
from whetstone.data import schemas as S
from whetstone.models.policy import preference_logps
from whetstone.train.checkpoint import TrainerState, read_trainer_state, report_step, restore_optimizer
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference import (
    KTO_REFERENCE_POINT,
    PreferenceStepLog,
    apply_loss,
    build_loss,
    evaluate_reward_shard,
    evaluate_shard,
    kto_reference_point_of,
    load_policy,
    pair_metrics,
    reference_logps,
    save_policy,
    tokenize_pairs,
)
from whetstone.train.preference_data import TIME_STEP
from whetstone.train.schedule import optimiser_step, warmup_decay_schedule
from whetstone.train.tracking import metric_writer


@dataclass(kw_only=True)
class WorkerRun:
    """What one worker trains with; built by :func:`setup_policy_run` or :func:`setup_reward_run`."""

    model: nn.Module  # DDP-wrapped by prepare_model (a plain module with one worker)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: nn.Module
    log: PreferenceStepLog
    start: TrainerState  # where this attempt starts: step 0, or the checkpoint resumed from
    rank: int
    world: int

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: str) -> None:
        """Rank 0's checkpoint files besides the optimiser state: the model, the history so far."""
        self.save_model(folder)
        self.log.save_history(folder)

    def save_model(self, folder: str) -> None:
        raise NotImplementedError

    def evaluate(self, config: PreferenceJobConfig) -> dict[str, float]:
        raise NotImplementedError


@dataclass(kw_only=True)
class PolicyRun(WorkerRun):
    tokenizer: Any
    reference_model: nn.Module | None = None  # reference.mode=on_the_fly: a frozen copy on every worker

    def save_model(self, folder: str) -> None:
        save_policy(self.model, self.tokenizer, folder)

    def evaluate(self, config: PreferenceJobConfig) -> dict[str, float]:
        metrics = evaluate_shard(self.model, self.tokenizer, eval_batches(config), config, self.reference_model)
        if self.rank == 0:
            print(f"[eval] held-out reward accuracy {metrics['eval_reward_accuracy']:.3f} margin "
                  f"{metrics['eval_margin']:+.4f} on {metrics['eval_pairs']} pairs", flush=True)
        return metrics


@dataclass(kw_only=True)
class RewardRun(WorkerRun):
    reward: Any  # the unwrapped RewardModel (tokenize, save, score)

    def save_model(self, folder: str) -> None:
        self.reward.save(folder)

    def evaluate(self, config: PreferenceJobConfig) -> dict[str, float]:
        metrics = evaluate_reward_shard(self.reward, eval_batches(config))
        if self.rank == 0:
            print(f"[eval] held-out pairwise accuracy {metrics['eval_reward_accuracy']:.3f} on "
                  f"{metrics['eval_pairs']} pairs", flush=True)
        return metrics


@contextlib.contextmanager
def resume_folder(plan: PreferenceRunPlan, storage: StorageConfig | None) -> Iterator[str | None]:
    """The checkpoint this worker starts from: a restarted worker group's own (the one Ray Train
    registered last, or, if the group died before Ray Train registered a fully written one, the
    newest complete checkpoint of this attempt), else the plan's ``resume_checkpoint`` (a folder
    or storage URI), else None (fresh)."""
    from whetstone.train.checkpoint import newest_complete_checkpoint

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        found = newest_complete_checkpoint(plan.checkpoint_root, storage)  # none before this attempt's first
        yield found[0] if found else plan.resume_checkpoint
        return
    with checkpoint.as_directory() as folder:
        yield folder


def _count_worker_group(plan: PreferenceRunPlan, storage: StorageConfig | None, rank: int) -> None:
    """Rank 0 numbers this worker group within the attempt; the report's ``worker_restarts``."""
    from whetstone.train.checkpoint import count_worker_group

    if rank == 0:
        groups = count_worker_group(plan.checkpoint_root, storage)
        if groups > 1:
            print(f"[train] worker group restarted after a failure (restart {groups - 1}); continuing from the "
                  "newest complete checkpoint", flush=True)


def lr_schedule(optimizer: torch.optim.Optimizer, config: PreferenceJobConfig,
                plan: PreferenceRunPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``optim.warmup_ratio`` of the run, then linear decay to 0."""
    return warmup_decay_schedule(optimizer, plan.total_steps, config.optim.warmup_ratio)


def restore_training_state(folder: str | None, run: WorkerRun, plan: PreferenceRunPlan,
                           storage: StorageConfig | None, with_optimizer: bool = True) -> TrainerState:
    """Load the optimiser and schedule state and the history from checkpoint ``folder``; return
    where it stood (step 0 when ``folder`` is None). ``with_optimizer=False`` keeps a fresh
    optimiser and only moves the schedule to the checkpoint's step."""
    if folder is None:
        return TrainerState(step=0)
    state = read_trainer_state(folder, storage)
    if state is None:
        raise RuntimeError(f"{folder}: not a complete checkpoint (trainer_state.json missing, or files torn)")
    if "epoch" not in state.model_fields_set:  # written before checkpoints recorded the data position
        state = state.model_copy(update={"epoch": state.step // plan.steps_per_epoch,
                                         "epoch_batches": state.step % plan.steps_per_epoch})
    if not (with_optimizer and restore_optimizer(folder, run.optimizer, run.scheduler, storage)):
        if run.rank == 0:
            print(f"[train] {folder}: no optimizer state restored; the optimiser starts fresh at step {state.step}",
                  flush=True)
        run.scheduler.last_epoch = state.step
    # This attempt's schedule (its max_steps may differ from the saved run's) sets the next step's LR.
    for group, base, factor in zip(run.optimizer.param_groups, run.scheduler.base_lrs, run.scheduler.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(run.scheduler.last_epoch)
    run.log.resume_history(folder, state.step, storage)
    if run.rank == 0:
        print(f"[train] resumed from {folder}: step {state.step}, epoch {state.epoch}, "
              f"{state.epoch_batches} batches of it already trained", flush=True)
    return state


def _rank_world() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def eval_batches(config: PreferenceJobConfig):
    """This worker's held-out rows (pairs, or their prompts), in batches of optim.eval_batch_size."""
    return ray.train.get_dataset_shard("eval").iter_batches(batch_size=config.optim.eval_batch_size,
                                                            batch_format="numpy")


def setup_policy_run(config: PreferenceJobConfig, plan: PreferenceRunPlan,
                     log_cls: type[PreferenceStepLog] = PreferenceStepLog) -> PolicyRun:
    """The policy worker's training state, in dependency order (see the comments); ``log_cls``
    writes its progress lines (mode=online's says other things)."""
    rank, world = _rank_world()
    _count_worker_group(plan, config.storage, rank)
    torch.manual_seed(config.optim.seed)
    with resume_folder(plan, config.storage) as folder:
        # Policy first (a checkpoint replaces the weights; LoRA wraps them), then DDP, then the
        # optimiser over DDP's parameters and its schedule, then their saved state.
        policy = config.policy if folder is None else config.policy.model_copy(
            update={"path": folder, "gguf_file": None, "tokenizer": None})
        model, tokenizer = load_policy(policy, config.storage, config.lora)
        model = ray.train.torch.prepare_model(model)
        model.train()  # from_pretrained leaves it in eval mode (dropout, if kept, would never act)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                      weight_decay=config.optim.weight_decay)
        run = PolicyRun(model=model, tokenizer=tokenizer, optimizer=optimizer,
                        scheduler=lr_schedule(optimizer, config, plan), loss_fn=build_loss(config.loss, config.online),
                        log=_step_log(rank, world, config, plan, log_cls), start=TrainerState(step=0), rank=rank,
                        world=world)
        # A LoRA checkpoint holds the merged weights: new adapters start on them, so the saved
        # adapters' AdamW moments do not apply.
        run.start = restore_training_state(folder, run, plan, config.storage, with_optimizer=not config.lora.enabled)
    if config.needs_reference and (config.reference.mode == "on_the_fly" or config.mode == "online"):
        run.reference_model, _ = load_policy(config.policy, config.storage)
        run.reference_model.eval().requires_grad_(False).to(model_device(model))  # beside the policy (GPU)
    return run


def setup_reward_run(config: PreferenceJobConfig, plan: PreferenceRunPlan) -> RewardRun:
    """mode=reward_model: encoder + scalar head (or the checkpoint's), DDP, AdamW with the head at 30x LR."""
    from whetstone.losses.bradley_terry import BradleyTerryLoss
    from whetstone.models.reward import RewardModel, reward_optimizer

    rank, world = _rank_world()
    _count_worker_group(plan, config.storage, rank)
    torch.manual_seed(config.optim.seed)  # the head's initial weights
    section = config.reward_model
    with resume_folder(plan, config.storage) as folder:
        reward = (RewardModel.load(folder, config.storage) if folder is not None else
                  RewardModel.from_encoder(section.encoder, section.max_length, section.max_prompt_length,
                                           config.storage, section.pooling))
        model = ray.train.torch.prepare_model(reward)
        optimizer = reward_optimizer(model, config.optim.lr, config.optim.lr * 30)
        run = RewardRun(model=model, reward=reward, optimizer=optimizer, scheduler=lr_schedule(optimizer, config, plan),
                        loss_fn=BradleyTerryLoss(section.gamma), log=_step_log(rank, world, config, plan),
                        start=TrainerState(step=0), rank=rank, world=world)
        run.start = restore_training_state(folder, run, plan, config.storage)
    return run


def _step_log(rank: int, world: int, config: PreferenceJobConfig, plan: PreferenceRunPlan,
              log_cls: type[PreferenceStepLog] = PreferenceStepLog) -> PreferenceStepLog:
    log = log_cls(rank, plan.total_steps, config.optim.log_every, config.optim.batch_size * world)
    log.writer = metric_writer(rank, plan, config.tracking, config.storage)  # rank 0: TensorBoard, MLflow
    return log


def shuffle_args(config: PreferenceJobConfig, epoch: int, rank: int) -> dict:
    """A seeded local shuffle buffer per epoch and worker: batches differ between epochs."""
    if not config.optim.shuffle_buffer:
        return {}
    return {"local_shuffle_buffer_size": config.optim.shuffle_buffer,
            "local_shuffle_seed": config.optim.seed + epoch + 1000 * rank}


def train_batches(shard: Any, config: PreferenceJobConfig, plan: PreferenceRunPlan, start: TrainerState,
                  rank: int) -> Iterator[tuple[int, TrainerState, dict]]:
    """``(epoch, position after the step, numpy batch)`` for every step this attempt trains.

    Each epoch is one pass over the worker's shard, cut at ``plan.steps_per_epoch`` batches; the
    run stops at ``plan.total_steps``. From a resumed ``start``: the passes of epochs already done
    are replayed unread (the dataset's block order changes with every pass), and the batches of
    ``start.epoch`` already trained are read and dropped (same local shuffle seed: same batches).
    """
    per_epoch, step = plan.steps_per_epoch, start.step
    for _ in range(start.epoch):
        for _ in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
            pass
    for epoch in range(start.epoch, config.optim.epochs):
        if step >= plan.total_steps:
            return
        batches = shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                     prefetch_batches=2, **shuffle_args(config, epoch, rank))
        skip = start.epoch_batches if epoch == start.epoch else 0
        for done, raw in enumerate(itertools.islice(batches, skip, per_epoch), start=skip + 1):
            step += 1
            yield epoch, TrainerState(step=step, epoch=epoch + done // per_epoch, epoch_batches=done % per_epoch), raw
            if step >= plan.total_steps:
                return


def optimise(run: WorkerRun, loss: torch.Tensor, max_grad_norm: float) -> None:
    """Backward, clip, optimiser step, schedule step."""
    optimiser_step(run.model, run.optimizer, run.scheduler, loss, max_grad_norm)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def preference_step(run: PolicyRun, raw: dict, config: PreferenceJobConfig, plan: PreferenceRunPlan) -> dict:
    """One step of the policy: tokenise (prompt masked out), chosen and rejected log-probs in ONE
    forward, the reference's (precomputed columns or the frozen copy), loss, backward, optimiser."""
    chunk = config.policy.chunk_size
    batch = tokenize_pairs(run.tokenizer, raw, config).to(model_device(run.model))
    logps = preference_logps(run.model, batch, chunk)  # (B,) chosen and rejected, token counts
    reference = reference_logps(raw, batch, run.reference_model, chunk)
    if config.loss.name == "kto":  # z0 from mismatched pairs (reference.mode=on_the_fly: the copy is here)
        reference[KTO_REFERENCE_POINT] = kto_reference_point_of(run.model, run.reference_model, run.tokenizer, raw,
                                                                config)
    out = apply_loss(run.loss_fn, config.loss.name, logps, reference, torch.as_tensor(raw[TIME_STEP]),
                     plan.current_time_step)
    # Weighted (NS-DPO) losses are normalised over the global batch and summed; DDP then averages
    # gradients over workers, so scale back by the world size.
    loss = out.reduce() * (run.world if out.weights is not None else 1)
    optimise(run, loss, config.optim.max_grad_norm)
    return pair_metrics(loss, out)


def reward_step(run: RewardRun, raw: dict, config: PreferenceJobConfig, plan: PreferenceRunPlan) -> dict:
    """One step of the reward model: score chosen and rejected in one forward, Bradley-Terry, optimiser."""
    gamma = config.reward_model.gamma
    tokens = run.reward.tokenize(list(raw[S.PROMPT]) * 2, list(raw[S.CHOSEN]) + list(raw[S.REJECTED]))
    scores = run.model(**{k: v.to(run.reward.device) for k, v in tokens.items()})  # (2B,): chosen, then rejected
    chosen_scores, rejected_scores = scores.chunk(2)  # (B,), (B,)
    out = run.loss_fn(chosen_scores, rejected_scores, time_steps=torch.as_tensor(raw[TIME_STEP]) if gamma else None,
                      current_step=plan.current_time_step if gamma else None)
    loss = out.reduce() * (run.world if out.weights is not None else 1)
    optimise(run, loss, config.optim.max_grad_norm)
    return pair_metrics(loss, out)


def after_step(run: WorkerRun, metrics: dict, state: TrainerState, config: PreferenceJobConfig,
               plan: PreferenceRunPlan) -> None:
    """Report the step to Ray Train; every ``optim.checkpoint_every`` steps rank 0 attaches a
    checkpoint (weights, optimiser, schedule, data position). The last step reports nothing here:
    :func:`finish_worker` reports it with the ``final`` checkpoint."""
    if state.step >= plan.total_steps:
        return
    every = config.optim.checkpoint_every
    report_step(metrics, rank=run.rank, checkpoint=bool(every and state.step % every == 0), save_model=run.save,
                optimizer=run.optimizer, scheduler=run.scheduler, state=state)


def finish_worker(run: WorkerRun, metrics: dict, state: TrainerState, config: PreferenceJobConfig,
                  plan: PreferenceRunPlan) -> None:
    """Rank 0 writes the history; every worker evaluates its eval shard; the ``final`` checkpoint."""
    run.log.finish(plan.history_uri, config.storage)
    if plan.has_eval:
        metrics = {**metrics, **run.evaluate(config)}
    report_step({**metrics, "step": state.step}, rank=run.rank, checkpoint=True, save_model=run.save,
                optimizer=run.optimizer, scheduler=run.scheduler, state=state, name="final")
