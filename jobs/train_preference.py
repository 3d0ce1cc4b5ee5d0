"""Preference training on the data plane: the DPO family, NS-DPO, SimPO, ORPO, NPO, or a reward model.

What it does, top to bottom:
  1. reads the preference pairs' ids and prompts from the store and splits train / eval by a
     seeded hash of ``pair_id`` (or takes a named eval dataset); pairs ingest could not split
     (hh-rlhf) were kept aside in quarantine and are counted in the report;
  2. leakage guard: embeds the prompts (MiniLM), indexes the train prompts (FAISS) and reports,
     or removes, eval pairs whose prompt has a near-duplicate in training;
  3. reference log-probs: Ray Data batch inference runs the frozen reference model over every
     selected pair ONCE; the small result is joined to the streamed pairs by ``pair_id``, so no
     worker holds the reference (``reference.mode=on_the_fly`` keeps a frozen copy per worker);
  4. trains with a Ray Train ``TorchTrainer``: each worker streams its shard, tokenises the pairs
     (prompt masked out), computes chosen and rejected log-probs in ONE forward with chunked
     output-layer log-probs, applies the loss and AdamW; NS-DPO's time weights are normalised
     over the global batch (the loss all-reduces their sum);
  5. evaluates on the held-out pairs (reward accuracy, margin), checkpoints the policy in HF
     format, writes a JSON report and a PNG plot (the last printed line is the report's path).
  ``mode: reward_model`` trains an encoder + scalar head with the Bradley–Terry loss instead.

Papers: DPO (arXiv 2305.18290); IPO (2310.12036); NS-DPO (2407.18676); SimPO (2405.14734);
ORPO (2403.07691); NPO (2404.05868); reward models as in InstructGPT (2203.02155).

Launch:
  local:           python -m jobs.ingest --config jobs/configs/ingest/hh_rlhf.yaml
                   python -m jobs.train_preference --config jobs/configs/train_preference/hh-rlhf.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.train_preference \
                       --config jobs/configs/train_preference/hh-rlhf.yaml
  KubeRay:         a RayJob whose entrypoint is the line above (see k8s/ray-job.*.yaml)
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

import ray
import ray.train
import torch
from whetstone.config.preference import PreferenceJobConfig
from whetstone.data import schemas as S
from whetstone.models.policy import preference_logps
from whetstone.train.contrastive import linear_warmup_decay
from whetstone.train.preference import (
    PreferenceStepLog,
    apply_loss,
    build_loss,
    evaluate_shard,
    load_policy,
    pair_metrics,
    reference_logps,
    save_policy,
    tokenize_pairs,
)
from whetstone.train.preference_data import TIME_STEP
from whetstone.train.progress import apply_train_log_level


def train_loop_per_worker(raw_config: dict[str, Any]) -> None:
    config = PreferenceJobConfig.model_validate(raw_config["job"])
    apply_train_log_level(config.ray_train_log_level)
    plan = raw_config["plan"]  # steps, time steps and output locations the driver worked out
    if config.mode == "reward_model":
        return reward_loop_per_worker(config, plan)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.optim.seed)

    # Policy first (a resumed checkpoint replaces the weights; LoRA wraps it), then DDP, then the
    # optimiser over DDP's parameters.
    start_step, policy = 0, config.policy
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            policy = policy.model_copy(update={"path": folder, "gguf_file": None, "tokenizer": None})
            model, tokenizer = load_policy(policy, config.storage, config.lora)
            start_step = json.load(open(f"{folder}/trainer_state.json"))["step"]
    else:
        model, tokenizer = load_policy(policy, config.storage, config.lora)
    model = ray.train.torch.prepare_model(model)
    model.train()  # from_pretrained leaves it in eval mode (dropout, if kept, would never act)
    reference_model = None
    if config.needs_reference and config.reference.mode == "on_the_fly":
        reference_model, _ = load_policy(config.policy, config.storage)
        reference_model.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    total_steps, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    warmup = int(total_steps * config.optim.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total_steps, warmup))
    for _ in range(start_step):
        scheduler.step()
    loss_fn = build_loss(config.loss)
    chunk = config.policy.chunk_size
    log = PreferenceStepLog(rank, total_steps, config.optim.log_every, config.optim.batch_size * world)

    shard = ray.train.get_dataset_shard("train")
    step, metrics = start_step, {}
    for epoch in range(step // per_epoch, config.optim.epochs):
        for raw in shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                      prefetch_batches=2, **_shuffle_args(config, epoch, rank)):
            if step >= total_steps or step >= (epoch + 1) * per_epoch:
                break
            batch = tokenize_pairs(tokenizer, raw, config).to(ctx_device(model))
            logps = preference_logps(model, batch, chunk)  # chosen + rejected rows in one forward
            reference = reference_logps(raw, batch, reference_model, chunk)
            out = apply_loss(loss_fn, config.loss.name, logps, reference,
                             torch.as_tensor(raw[TIME_STEP]), plan["current_time_step"])
            # Weighted (NS-DPO) losses are normalised over the global batch and summed; DDP then
            # averages gradients over workers, so scale back by the world size.
            loss = out.reduce() * (world if out.weights is not None else 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = log.step(step, epoch, scheduler.get_last_lr()[0], pair_metrics(loss, out))
            every = config.optim.checkpoint_every
            if step < total_steps:
                _report(metrics, model, tokenizer, step, rank, checkpoint=bool(every and step % every == 0))

    log.finish(plan["history_uri"], config.storage)
    if plan["has_eval"]:
        eval_batches = ray.train.get_dataset_shard("eval").iter_batches(
            batch_size=config.optim.eval_batch_size, batch_format="numpy")
        metrics = {**metrics, **evaluate_shard(model, tokenizer, eval_batches, config, reference_model)}
        if rank == 0:
            print(f"[eval] held-out reward accuracy {metrics['eval_reward_accuracy']:.3f} margin "
                  f"{metrics['eval_margin']:+.4f} on {metrics['eval_pairs']} pairs", flush=True)
    _report({**metrics, "step": step}, model, tokenizer, step, rank, checkpoint=True, name="final")


def _shuffle_args(config: PreferenceJobConfig, epoch: int, rank: int) -> dict:
    """A seeded local shuffle buffer per epoch and worker: batches differ between epochs."""
    if not config.optim.shuffle_buffer:
        return {}
    return {"local_shuffle_buffer_size": config.optim.shuffle_buffer,
            "local_shuffle_seed": config.optim.seed + epoch + 1000 * rank}


def ctx_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _report(metrics: dict, model, tokenizer, step: int, rank: int, checkpoint: bool, name: str | None = None,
            save=save_policy) -> None:
    """Every worker reports; rank 0 attaches the model (HF layout) when checkpointing."""
    if not checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save(model, tokenizer, folder)
        with open(f"{folder}/trainer_state.json", "w") as fh:
            json.dump({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}, fh)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name or f"step-{step:06d}")


def reward_loop_per_worker(config: PreferenceJobConfig, plan: dict) -> None:
    """mode=reward_model: encoder + scalar head, Bradley–Terry loss, same data and reporting."""
    from whetstone.losses.bradley_terry import BradleyTerryLoss
    from whetstone.models.reward import RewardModel, reward_optimizer
    from whetstone.train.preference import evaluate_reward_shard

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.optim.seed)
    section = config.reward_model
    reward = RewardModel.from_encoder(section.encoder, section.max_length, section.max_prompt_length, config.storage,
                                      section.pooling)
    model = ray.train.torch.prepare_model(reward)
    optimizer = reward_optimizer(model, config.optim.lr, config.optim.lr * 30)
    total_steps, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    warmup = int(total_steps * config.optim.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total_steps, warmup))
    loss_fn = BradleyTerryLoss(section.gamma)
    log = PreferenceStepLog(rank, total_steps, config.optim.log_every, config.optim.batch_size * world)
    shard = ray.train.get_dataset_shard("train")
    step, metrics = 0, {}
    for epoch in range(config.optim.epochs):
        for raw in shard.iter_batches(batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True,
                                      **_shuffle_args(config, epoch, rank)):
            if step >= total_steps or step >= (epoch + 1) * per_epoch:
                break
            tokens = reward.tokenize(list(raw[S.PROMPT]) * 2, list(raw[S.CHOSEN]) + list(raw[S.REJECTED]))
            scores = model(**{k: v.to(reward.device) for k, v in tokens.items()})  # (2B,): chosen, then rejected
            chosen_scores, rejected_scores = scores.chunk(2)
            times = torch.as_tensor(raw[TIME_STEP]) if section.gamma else None
            out = loss_fn(chosen_scores, rejected_scores, time_steps=times,
                          current_step=plan["current_time_step"] if section.gamma else None)
            loss = out.reduce() * (world if out.weights is not None else 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = log.step(step, epoch, scheduler.get_last_lr()[0], pair_metrics(loss, out))
            if step < total_steps:
                ray.train.report(metrics)
    log.finish(plan["history_uri"], config.storage)
    if plan["has_eval"]:
        batches = ray.train.get_dataset_shard("eval").iter_batches(batch_size=config.optim.eval_batch_size,
                                                                   batch_format="numpy")
        metrics = {**metrics, **evaluate_reward_shard(reward, batches)}
        if rank == 0:
            print(f"[eval] held-out pairwise accuracy {metrics['eval_reward_accuracy']:.3f} on "
                  f"{metrics['eval_pairs']} pairs", flush=True)
    _report({**metrics, "step": step}, reward, None, step, rank, checkpoint=True, name="final",
            save=lambda m, _t, folder: m.save(folder))


def main(argv: list[str] | None = None) -> dict:
    from whetstone.train.pipeline import parse_job_args
    from whetstone.train.preference import run_preference

    config = parse_job_args(PreferenceJobConfig, argv, __doc__)
    return run_preference(config, train_loop_per_worker)


if __name__ == "__main__":
    main()
