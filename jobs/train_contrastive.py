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

from typing import Any

import torch
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.losses.gather import gather_documents
from whetstone.losses.info_nce import false_negative_mask
from whetstone.models.encoder import Encoder
from whetstone.train.contrastive import stack_padded
from whetstone.train.contrastive_run import ContrastiveRun
from whetstone.train.contrastive_worker import CheckpointHook, StepInput, StepInputs, WorkerRun, setup_worker
from whetstone.train.plan import ContrastiveRunPlan
from whetstone.train.progress import apply_train_log_level


def train_loop_per_worker(raw_config: dict[str, Any]) -> None:
    """One Ray Train worker: set up, then one step per :class:`StepInput` until the plan's end."""
    config = ContrastiveJobConfig.model_validate(raw_config["job"])
    plan = ContrastiveRunPlan.model_validate(raw_config["plan"])
    apply_train_log_level(config.ray_train_log_level)
    run = setup_worker(config, plan)  # model, DDP, optimiser (restored on resume), loss, negatives
    hook = CheckpointHook(run)
    for item in StepInputs(run):  # each step's batch; its hard negatives were fetched during the last step
        if item.task == "retrieval":
            metrics = contrastive_step(run, item)
        else:  # multi-task (Piccolo2): an auxiliary task's batch and loss, no negatives
            metrics = auxiliary_step(run, item)
        hook.after_step(item, metrics)  # report; checkpoint and ask for a refresh every refresh.every_steps
    run.log.finish(plan.history_uri, config.storage)


def contrastive_step(run: WorkerRun, item: StepInput) -> dict[str, Any]:
    """One retrieval step: forward, gather, mask, loss, backward, optimiser. Returns its metrics."""
    config, batch, hard, device = run.config, item.batch, item.hard, run.device
    doc_ids = list(batch["positive_id"])
    doc_tokens, doc_mask = batch["positive_input_ids"], batch["positive_attention_mask"]  # (B, Ld)
    if hard is not None and hard.input_ids is not None:  # re-encoded negatives: (B + B*N, L)
        doc_tokens, doc_mask = stack_padded(doc_tokens, doc_mask, hard.input_ids, hard.attention_mask,
                                            run.encoder.tokenizer.pad_token_id or 0)
        doc_ids += hard.ids
    # One forward for queries and documents (DDP sees one forward per backward).
    query_emb, doc_emb = run.model(item.queries["input_ids"], item.queries["attention_mask"],
                                   doc_tokens.to(device), doc_mask.to(device))  # (B, D), (M_w, D)
    if hard is not None and hard.vectors is not None:  # cached negatives: the index's vectors, no grad
        doc_emb = torch.cat([doc_emb, hard.vectors.to(device, doc_emb.dtype)])
        doc_ids += hard.ids
    if config.optim.gather_across_workers:  # every worker's documents become every query's candidates
        all_docs, all_ids, offset = gather_documents(doc_emb, doc_ids)  # (M, D)
    else:
        all_docs, all_ids, offset = doc_emb, doc_ids, 0
    positive_column = torch.arange(len(batch["positive_id"]), device=device) + offset  # (B,)
    mask = false_negative_mask(all_ids, positive_column, batch["positive_ids"])  # (B, M): other positives
    extra = {}
    if run.guide is not None:
        extra["guide_scores"] = _guide_scores(run.guide, item.queries, doc_tokens.to(device), doc_mask.to(device),
                                              doc_ids, config.optim.gather_across_workers)
    out = run.loss_fn(query_emb, all_docs, positive_column, exclude_mask=mask, **extra)
    loss = out.losses.mean()
    run.optimise(loss)
    metrics = run.log.step(item.step + 1, item.epoch, loss.item(), run.lr(), out, hard)
    if item.topic_pure_share is not None:
        metrics["topic_pure_batch_share"] = item.topic_pure_share
    return metrics


def auxiliary_step(run: WorkerRun, item: StepInput) -> dict[str, Any]:
    """One step of an auxiliary task (CoSENT on graded pairs, label contrast on labelled texts)."""
    loss, diagnostics = run.aux.loss_on(run.model, item.task, item.rows)
    run.optimise(loss)
    return run.log.task_step(item.step + 1, item.epoch, item.task, loss.item(), run.lr(), diagnostics)


@torch.no_grad()
def _guide_scores(guide: Encoder, queries: dict, doc_tokens: torch.Tensor, doc_mask: torch.Tensor,
                  doc_ids: list[str], gather: bool) -> torch.Tensor:
    """The guide's (B, M) similarities over the same (gathered) candidate columns as the loss."""
    guide_queries = guide(queries["input_ids"], queries["attention_mask"])  # (B, D)
    guide_docs = guide(doc_tokens, doc_mask)  # (M_w, D)
    if gather:
        guide_docs, _, _ = gather_documents(guide_docs, doc_ids)  # (M, D)
    return guide_queries @ guide_docs.T


def run(config: ContrastiveJobConfig) -> dict:
    """The driver, stage by stage; returns the report (also at ``<run_uri>/report.json``)."""
    from whetstone.train import contrastive_run as stage

    run = stage.start_run(config)  # paths, Ray, run folder, task data, resume point; TensorBoard, MLflow
    with run.tracking:  # the MLflow run ends FAILED if a stage raises
        return stages(run)


def stages(run: ContrastiveRun) -> dict:
    """Everything after the start, in order (see the module docstring)."""
    from whetstone.train import contrastive_run as stage
    from whetstone.train.contrastive_report import write_report

    config = run.config
    # corpus vectors streamed to storage (index v1's chunks) through the exact evaluation: nDCG before training
    base = stage.embed_base(run)  # a resumed run reuses its first attempt's evaluation
    version, refresher, mined = 1, None, None
    stage.start_docs(run)  # document texts in partition actors: resolved by id, never loaded per worker
    if config.negatives.source != "none":
        version = stage.publish_first_version(run, base)  # v1's shards built from those chunks, or the newest resumed
        deploy_index(run, version, base.count)
    if config.negatives.source == "index":
        refresher = stage.start_refresher(run)  # re-embeds from rank 0's checkpoints while training goes on
    elif config.negatives.source == "static":
        mined = stage.mine_static(run)  # once, with the base model, through the index just deployed
    plan = stage.plan_run(run, version, refresher)  # steps, epochs, where this attempt writes
    metrics = stage.fit(run, plan, stage.training_datasets(run, mined), train_loop_per_worker)
    final = stage.finish_model(run, plan, refresher)  # last refresh, merge, embed, evaluate, promote
    return write_report(run, plan, base, final, metrics, mined)


def deploy_index(run: ContrastiveRun, version: int, documents: int) -> None:
    """Start Serve's HTTP proxy and deploy the index service on the run's index (it loads LATEST):
    ``index.num_shards`` shard deployments of ``index.replicas_per_shard`` replicas each (with GPUs
    when ``index.use_gpu``) behind one router."""
    import time

    from services.index.app import IndexServiceArgs, deploy, start_serve

    config, t, index = run.config, time.monotonic(), run.config.index
    start_serve(index.http_host, index.http_port)  # a no-op when Serve already runs (RayService)
    deploy(IndexServiceArgs(index_uri=run.index_uri, storage=config.storage.resolved(), num_shards=index.num_shards,
                            replicas_per_shard=index.replicas_per_shard, num_cpus=index.num_cpus,
                            use_gpu=index.use_gpu, gpus_per_replica=index.gpus_per_replica,
                            router_replicas=index.router_replicas, swap_mode=index.swap_mode))
    print(f"[index] v{version} deployed ({index.kind}, {index.num_shards} shard(s) x {index.replicas_per_shard} "
          f"replica(s), {documents} docs) in {run.timer.mark('deploy_s', t)} s; "
          f"HTTP: http://{index.http_host}:{index.http_port}/index/stats", flush=True)


def main(argv: list[str] | None = None) -> dict:
    from whetstone.train.runtime import parse_job_args

    return run(parse_job_args(ContrastiveJobConfig, argv, __doc__))


if __name__ == "__main__":
    main()
