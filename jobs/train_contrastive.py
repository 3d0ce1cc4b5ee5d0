"""Contrastive training of an embedding model with live hard negatives (ANCE-style refresh).

What it does, top to bottom:
  1. embeds the corpus with the base model (Ray Data batch inference) and evaluates it;
  2. publishes that as index v1 and deploys the index service (Ray Serve, FAISS);
  3. trains with a Ray Train ``TorchTrainer``: each worker streams its shard of the pairs, asks
     the index for its queries' neighbours every step, mines hard negatives from a rank window
     and minimises InfoNCE over in-batch plus hard negatives, gathered across workers. With
     ``multitask.tasks`` (Piccolo2) some steps train an auxiliary task instead (graded pairs with
     CoSENT, labelled texts with label contrast), drawn from (seed, step) alone so every worker
     trains the same one;
  4. every ``refresh.every_steps`` steps rank 0 checkpoints and the refresher re-embeds the
     corpus with that checkpoint and swaps a new index version in while training goes on;
  5. embeds the corpus with the final model, evaluates it, promotes that index version and
     writes a JSON report (the last printed line is its path).

Papers: InfoNCE / MultipleNegativesRankingLoss (arXiv 1807.03748); ANCE (arXiv 2007.00808);
STAR/ADORE dynamic negatives (arXiv 2104.08051);
Piccolo2 multi-task hybrid loss (arXiv 2405.06932).

Launch:
  local:           python -m jobs.train_contrastive --config jobs/configs/train_contrastive/smoke.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.train_contrastive \
                       --config jobs/configs/train_contrastive/scifact.yaml
  KubeRay:         k8s/ray-job.train-contrastive.yaml
"""

from __future__ import annotations

import bisect
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.data import schemas as S
from whetstone.data.collate import collate_pairs
from whetstone.data.stream import DocStore
from whetstone.losses.gather import gather_documents
from whetstone.losses.info_nce import false_negative_mask
from whetstone.losses.multitask import TaskScheduler
from whetstone.models.encoder import Encoder, autocast_dtype, set_dropout
from whetstone.train.contrastive import (
    DualEncoder,
    LiveNegatives,
    build_loss,
    linear_warmup_decay,
    stack_padded,
)
from whetstone.train.multitask import AuxTasks
from whetstone.train.progress import StepLog, apply_train_log_level
from whetstone.train.tas_balanced import TopicRegrouper


def train_loop_per_worker(raw_config: dict[str, Any]) -> None:
    config = ContrastiveJobConfig.model_validate(raw_config["job"])
    apply_train_log_level(config.ray_train_log_level)
    plan = raw_config["plan"]  # steps and checkpoint locations the driver worked out
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.optim.seed)
    rng = np.random.default_rng([config.optim.seed, rank])

    # Model first (resume replaces the weights), then DDP, then the optimiser over DDP's params.
    # A frozen query tower is the base model's (its own copy in every checkpoint, so a resumed
    # run and every saved model carry it); only the document tower trains.
    frozen_queries = config.encoder.query_tower == "frozen"
    start_step, model_uri, query_tower = 0, plan["base_model"], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            encoder = Encoder.load(folder, device="cpu")
            query_tower = Encoder.load_query(folder, device="cpu") if frozen_queries else None
            with open(f"{folder}/trainer_state.json") as fh:
                start_step = int(json.load(fh)["step"])
    elif plan.get("resume_checkpoint"):  # a new attempt of a killed run (if_exists=resume)
        from whetstone import storage as store

        encoder = Encoder.load(plan["resume_checkpoint"], device="cpu", storage=config.storage)
        if frozen_queries:
            query_tower = Encoder.load_query(plan["resume_checkpoint"], device="cpu", storage=config.storage)
        state = store.read_bytes(store.join(plan["resume_checkpoint"], "trainer_state.json"), config.storage)
        start_step = int(json.loads(state)["step"])
    else:
        encoder = Encoder.load(model_uri, device="cpu", storage=config.storage)
        query_tower = Encoder.load_query(model_uri, device="cpu", storage=config.storage) if frozen_queries else None
    if config.encoder.gradient_checkpointing:
        # Non-reentrant checkpointing works with DDP and with inputs that need no grad.
        encoder.transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        encoder.transformer.config.use_cache = False  # an encoder has no cache; says so before transformers warns
    set_dropout(encoder, config.encoder.dropout)
    autocast = autocast_dtype(config.encoder.precision)
    model = ray.train.torch.prepare_model(DualEncoder(encoder, config.encoder.forward_chunk, autocast, query_tower))
    model.train()  # Encoder.load returns eval mode; the no-grad searches and evals restore train mode
    dual = model.module if hasattr(model, "module") else model
    encoder, query_tower = dual.encoder, dual.query_encoder
    device = encoder.device
    if autocast is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"encoder.precision=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                         "support (Ampere or newer); use encoder.precision=float32")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                                  weight_decay=config.optim.weight_decay)
    total_steps = plan["total_steps"]
    warmup = int(total_steps * config.optim.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, total_steps, warmup))
    for _ in range(start_step):
        scheduler.step()
    loss_fn = build_loss(config.loss, config.optim.temperature, config.optim.symmetric)
    guide = None
    if config.loss.kind == "gist":  # frozen, never wrapped in DDP, never saved
        guide = Encoder.load(config.loss.guide_model, device=str(device), storage=config.storage).eval()
        guide.requires_grad_(False)
    negatives = None
    if config.negatives.source == "index":
        from whetstone.index.client import IndexClient

        negatives = LiveNegatives(
            IndexClient.from_handle(timeout_s=config.negatives.search_timeout_s),
            DocStore.load(config.store_uri, config.storage), config.negatives.mining, rng,
            config.encoder.doc_max_length, config.negatives.search_timeout_s,
            config.negatives.max_versions_behind, config.negatives.encode,
        )
    refresher = ray.get_actor(plan["refresher"]) if (rank == 0 and plan.get("refresher")) else None
    every = config.refresh.every_steps
    log = StepLog(rank, total_steps, config.optim.log_every, config.optim.batch_size * world)
    log.worker_nodes = _worker_nodes(world)

    # Negatives for batch t+1 are searched and mined in a thread while batch t trains.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negatives")
    pad_id = encoder.tokenizer.pad_token_id or 0

    def prepare(raw_batch, for_step: int):
        batch = collate_pairs(raw_batch, pad_token_id=pad_id)
        queries = {"input_ids": batch["query_input_ids"].to(device),
                   "attention_mask": batch["query_attention_mask"].to(device)}
        future = None
        if negatives is not None:
            # The version this step should see: one refresh per `every` steps since this attempt began.
            expected_version = plan.get("first_version", 1) + ((for_step - start_step) // every if every else 0)
            vectors = negatives.embed_queries(query_tower if query_tower is not None else encoder, queries)
            future = prefetch.submit(negatives.fetch, vectors, batch["positive_ids"], expected_version,
                                     encoder.tokenizer)
        return batch, queries, future

    # Multi-task (Piccolo2): the task of each step is a function of (seed, step), the same on every
    # worker; an epoch ends after steps_per_epoch retrieval steps (plan["epoch_ends"]).
    schedule = TaskScheduler(plan["task_shares"], config.optim.seed) if plan.get("task_shares") else None
    aux = AuxTasks(config.multitask.tasks, plan.get("task_labels", {}), encoder.tokenizer, device,
                   config.optim.batch_size, config.optim.shuffle_buffer, config.optim.seed, rank) if schedule else None
    log.multitask = schedule is not None

    def task_at(s: int) -> str:
        return schedule.task_for_step(s) if schedule else "retrieval"

    def next_retrieval(s: int, end: int) -> int:  # first retrieval step >= s (end if none before it)
        while s < end and task_at(s) != "retrieval":
            s += 1
        return s

    def optimise(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()

    def after_step(metrics: dict) -> None:  # report; rank 0 checkpoints and asks for a refresh every `every`
        saving = rank == 0 and every and step % every == 0 and step < total_steps
        if saving or step == total_steps:
            _report_with_checkpoint(metrics, encoder, query_tower, step, rank,
                                    "final" if step == total_steps else None)
            if saving and refresher is not None:
                refresher.request.remote(f"{plan['checkpoint_root']}/step-{step:06d}", step)
        else:
            ray.train.report(metrics)

    shard = ray.train.get_dataset_shard("train")
    step = start_step
    topic_batches = None
    epoch_ends = plan["epoch_ends"]
    for epoch in range(bisect.bisect_right(epoch_ends, step), config.optim.epochs):
        epoch_end = min(total_steps, epoch_ends[epoch])
        batches = shard.iter_batches(
            batch_size=config.optim.batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=config.optim.shuffle_buffer or None,
            local_shuffle_seed=config.optim.seed + epoch + 1000 * rank,
        )
        if config.optim.topic_clusters:  # TAS: same rows, regrouped into one-topic batches
            topic_batches = TopicRegrouper(batches, config.optim.batch_size, S.TOPIC)
            batches = topic_batches
        batches = iter(batches)
        first_step = next_retrieval(step, epoch_end)
        log.start_wait()
        first = next(batches, None) if first_step < epoch_end else None
        log.end_wait()
        pending = prepare(first, first_step) if first is not None else None
        while step < epoch_end:
            task = task_at(step)
            if task != "retrieval":  # an auxiliary task's step: its own batch and loss, no negatives
                log.start_wait()
                rows = aux.fetch(task)
                log.end_wait()
                loss, diagnostics = aux.loss_on(model, task, rows)
                optimise(loss)
                step += 1
                after_step(log.task_step(step, epoch, task, loss.item(), scheduler.get_last_lr()[0], diagnostics))
                continue
            if pending is None:
                break
            upcoming_step = next_retrieval(step + 1, epoch_end)
            log.start_wait()
            upcoming_raw = next(batches, None) if upcoming_step < epoch_end else None
            log.end_wait()
            upcoming = prepare(upcoming_raw, upcoming_step) if upcoming_raw is not None else None
            batch, queries, future = pending
            hard = future.result() if future is not None else None
            doc_ids = list(batch["positive_id"])
            doc_tok, doc_mask = batch["positive_input_ids"], batch["positive_attention_mask"]
            if hard is not None and hard.input_ids is not None:
                doc_tok, doc_mask = stack_padded(doc_tok, doc_mask, hard.input_ids, hard.attention_mask, pad_id)
                doc_ids += hard.ids

            # One forward for queries and documents (DDP), then gather documents from all workers.
            query_emb, doc_emb = model(queries["input_ids"], queries["attention_mask"],
                                       doc_tok.to(device), doc_mask.to(device))
            if hard is not None and hard.vectors is not None:  # cached negatives: constants, no grad
                doc_emb = torch.cat([doc_emb, hard.vectors.to(device, doc_emb.dtype)])
                doc_ids += hard.ids
            if config.optim.gather_across_workers:
                all_docs, all_ids, offset = gather_documents(doc_emb, doc_ids)
            else:
                all_docs, all_ids, offset = doc_emb, doc_ids, 0
            positive_column = torch.arange(len(batch["positive_id"]), device=device) + offset
            mask = false_negative_mask(all_ids, positive_column, batch["positive_ids"])
            extra = {}
            if guide is not None:
                extra["guide_scores"] = _guide_scores(guide, queries, doc_tok.to(device), doc_mask.to(device),
                                                      doc_ids, config.optim.gather_across_workers)
            out = loss_fn(query_emb, all_docs, positive_column, exclude_mask=mask, **extra)
            loss = out.losses.mean()
            optimise(loss)
            step += 1

            metrics = log.step(step, epoch, loss.item(), scheduler.get_last_lr()[0], out, hard)
            if topic_batches is not None:
                metrics["topic_pure_batch_share"] = topic_batches.pure_share
            after_step(metrics)
            pending = upcoming
    prefetch.shutdown(wait=True)
    log.finish(plan.get("history_uri"), config.storage)


@torch.no_grad()
def _guide_scores(guide: Encoder, queries: dict, doc_ids_tokens: torch.Tensor, doc_mask: torch.Tensor,
                  doc_ids: list[str], gather: bool) -> torch.Tensor:
    """The guide's (B, M) similarities over the same (gathered) candidate columns as the loss."""
    guide_queries = guide(queries["input_ids"], queries["attention_mask"])  # (B, D)
    guide_docs = guide(doc_ids_tokens, doc_mask)  # (M_w, D)
    if gather:
        guide_docs, _, _ = gather_documents(guide_docs, doc_ids)  # (M, D)
    return guide_queries @ guide_docs.T


def _worker_nodes(world: int) -> list[str]:
    """Node id of every rank (rank order), for the report: where did the workers run?"""
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _report_with_checkpoint(metrics: dict, encoder: Encoder, query_tower: Encoder | None, step: int, rank: int,
                            name: str | None) -> None:
    """Rank 0 saves the model (sentence-transformers layout; a frozen query tower in query_encoder/)
    as a Ray Train checkpoint."""
    import tempfile

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        encoder.save(folder, query_tower=query_tower)
        with open(f"{folder}/trainer_state.json", "w") as fh:
            json.dump({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}, fh)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=name or f"step-{step:06d}")


def main(argv: list[str] | None = None) -> dict:
    from whetstone.train.pipeline import parse_job_args, run_contrastive

    config = parse_job_args(ContrastiveJobConfig, argv, __doc__)
    return run_contrastive(config, train_loop_per_worker)


if __name__ == "__main__":
    main()
