"""The contrastive job's driver stages, each a function the job's ``run`` calls in order.

``jobs/train_contrastive.py:run`` reads as::

    run = start_run(config)                          # paths, Ray, run folder, task data, resume point
    base = embed_base(run)                           # vectors to storage + nDCG (a resume reuses its first attempt's)
    version = publish_first_version(run, base)       # index v1 from those vectors (a resumed run keeps its newest)
    ... the job deploys the index service (Serve is the job's business, not the library's) ...
    refresher = start_refresher(run)                 # background re-embedding + swaps
    plan = plan_run(run, version, refresher)         # steps, epochs, where checkpoints go
    metrics = fit(run, plan, training_datasets(run), train_loop_per_worker)
    final = finish_model(run, plan, refresher)       # merge, embed, evaluate, promote
    return write_report(run, plan, base, final, metrics)

Everything here runs on the driver, which never holds the corpus' vectors: they stream from Ray
Data through the exact evaluation into vector chunks in storage, and the index shards are built
from there by Ray tasks.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from whetstone import storage as store
from whetstone.config.base import ConfigError, dump_config
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.config.extras import check_extras
from whetstone.data.store import require_store
from whetstone.models.assets import resolve_model_path
from whetstone.train.checkpoint import TrainerState, find_resume_checkpoint
from whetstone.train.memory import MemorySampler
from whetstone.train.plan import ContrastiveRunPlan
from whetstone.train.runtime import (
    Timer,
    init_ray,
    ordered_data_config,
    prepare_run_dir,
    train_run_config,
    worker_job_config,
)
from whetstone.train.tracking import RunTracking, start_tracking


@dataclass
class ContrastiveRun:
    """What the driver knows once the run has started (built by :func:`start_run`)."""

    config: ContrastiveJobConfig
    timer: Timer
    memory: MemorySampler
    base_model: str
    task_data: dict[str, Any] = field(default_factory=dict)
    resume: tuple[str, TrainerState] | None = None  # (checkpoint URI, its state) when resuming
    resumed_version: int | None = None  # the index version a resumed run keeps serving (its newest)
    eval_split: Any = None
    docs: Any = None  # the DocLookup (document texts in partition actors), once started
    docs_name: str | None = None
    tracking: RunTracking = field(default_factory=lambda: RunTracking(None))  # TensorBoard, MLflow

    @property
    def index_uri(self) -> str:
        return store.join(self.config.run_uri, "index")

    @property
    def attempt(self) -> str:
        """This attempt's Ray Train run name: ``train``, or ``train-from-<step>`` for a resume."""
        return f"train-from-{self.resume[1].step:06d}" if self.resume else "train"


@dataclass
class Embedded:
    """The corpus embedded by one model (its vector chunks in storage, when kept), and that model's
    retrieval quality on the eval split."""

    model_uri: str
    vectors_uri: str | None  # index_root/vectors/v{n} when an index version is built from them
    count: int  # documents embedded
    metrics: dict[str, float]


def absolute_local_paths(config: ContrastiveJobConfig) -> ContrastiveJobConfig:
    """Make local paths absolute on the driver: workers and actors run in other directories."""
    from whetstone.storage import absolute_local as fix

    # A base model that is not a local folder (an object-storage URI) stays as it is.
    base_model = fix(resolve_model_path(config.encoder.base_model), must_exist=True)
    encoder = config.encoder.model_copy(update={"base_model": base_model})
    loss = config.loss
    if loss.kind == "gist":
        loss = loss.model_copy(update={"guide_model": fix(resolve_model_path(loss.guide_model), must_exist=True)})
    tasks = [task.model_copy(update={"data": fix(task.data)}) for task in config.multitask.tasks]
    multitask = config.multitask.model_copy(update={"tasks": tasks})
    return config.model_copy(update={"store_uri": fix(config.store_uri), "output_uri": fix(config.output_uri),
                                     "encoder": encoder, "loss": loss, "multitask": multitask})


def start_run(config: ContrastiveJobConfig) -> ContrastiveRun:
    """Resolve paths, log the config, join or start Ray, apply ``if_exists``, read the auxiliary
    tasks' data (bad task data fails the run before the slow parts) and find the resume point."""
    memory = MemorySampler(include_ray=bool(os.environ.get("RAY_ADDRESS"))).start()
    timer = Timer()
    check_extras(config)  # a missing extra fails here, naming the field, not on a worker
    given_store = config.store_uri
    config = absolute_local_paths(config)
    require_store(given_store, config.store_uri, config.storage)
    print(f"[run] resolved config:\n{dump_config(config)}", flush=True)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    prepare_run_dir(config)
    run = ContrastiveRun(config, timer, memory, resolve_model_path(config.encoder.base_model),
                         task_data=load_tasks(config))
    if config.if_exists == "resume":
        from whetstone.index.snapshot import latest_version

        run.resume = find_resume_checkpoint(config.run_uri, config.storage)
        run.resumed_version = latest_version(run.index_uri, config.storage) if run.resume else None
    if config.eval.split:
        from whetstone.data.stream import load_eval_split

        run.eval_split = load_eval_split(config.store_uri, config.eval.split, config.storage)
    # last: the MLflow run starts once nothing above can refuse the config (the job ends it, FAILED on an error)
    run.tracking = start_tracking(config, "train_contrastive", resume=config.if_exists == "resume")
    return run


def load_tasks(config: ContrastiveJobConfig) -> dict[str, Any]:
    """Read and validate every auxiliary task's data (bad rows to ``<run>/quarantine/task-<name>/``).

    Raises:
        ConfigError: a task cannot fill one step on every worker, or has no usable rows; the message
            names the task and its data.
    """
    from whetstone.data.tasks import TaskDataError, load_task_data

    out = {}
    world = config.optim.num_workers
    for task in config.multitask.tasks:
        t = time.monotonic()
        try:
            data = load_task_data(task.name, task.kind, task.data, config.run_uri, config.storage, config.optim.seed)
        except TaskDataError as err:
            raise ConfigError(f"multitask.tasks[{task.name}].data: {err}") from None
        batch = task.batch_size or config.optim.batch_size
        if data.table.num_rows // world < batch:
            raise ConfigError(f"multitask.tasks[{task.name}]: {data.table.num_rows} valid rows in {task.data} cannot "
                              f"fill one step of {world} workers x batch {batch}")
        labels = f", {len(data.labels)} labels" if data.labels else ""
        quarantined = f"; {data.quarantined} rows quarantined under {config.run_uri}/quarantine/task-{task.name}/" \
            if data.quarantined else ""
        print(f"[train] task {task.name} ({task.kind}): {data.table.num_rows} rows of {data.rows_read} from "
              f"{task.data}{labels}{quarantined} ({time.monotonic() - t:.1f} s)", flush=True)
        out[task.name] = data
    return out


def embed_and_evaluate(run: ContrastiveRun, model_uri: str, name: str = "base",
                       vectors_uri: str | None = None) -> Embedded:
    """Embed the corpus with ``model_uri`` (Ray Data batch inference) and rank it exactly for the
    eval split's queries (at every Matryoshka width the loss trains), batch by batch as the vectors
    stream in; with ``vectors_uri`` they are written there as vector chunks on the way (the next
    index version is built from them)."""
    from whetstone.eval.retrieval import evaluate_encoder
    from whetstone.models.encoder import Encoder
    from whetstone.train.refresh import CorpusVectors, embed_progress, embedded_batches

    config, t = run.config, time.monotonic()
    progress = embed_progress(f"corpus, {name} model", config.store_uri, config.storage, config.progress_every_s)
    corpus = CorpusVectors(embedded_batches(config.store_uri, model_uri, config.storage,
                                            concurrency=config.index.initial_embed_concurrency,
                                            batch_size=config.refresh.embed_batch_size,
                                            max_length=config.eval.doc_max_length, num_gpus=config.embed_gpus,
                                            gpu_dtype=config.refresh.gpu_dtype), vectors_uri, config.storage,
                            num_shards=config.index.num_shards, progress=progress)
    metrics: dict[str, float] = {}
    split = run.eval_split
    if split is None:
        corpus.drain()
    else:
        encoder = Encoder.load_query(model_uri, storage=config.storage)  # the query tower, if the model has one
        metrics = evaluate_encoder(encoder, split.queries, split.qrels, corpus, None,
                                   config.encoder.query_max_length, dims=config.loss.matryoshka_dims or ())
    run.timer.mark(f"embed_{name}_s", t)  # the progress line's closing line said how long it took
    if split is not None:
        print(f"[eval] {name}: nDCG@10 {metrics['ndcg@10']:.4f} Recall@100 {metrics['recall@100']:.4f}", flush=True)
    return Embedded(model_uri, vectors_uri, corpus.rows, metrics)


BASE_EVAL_FILE = "base-eval.json"


def embed_base(run: ContrastiveRun) -> Embedded:
    """The base model's corpus vectors (index v1's chunks) and its nDCG before training. A resumed
    run whose newest index version is already served reuses the first attempt's evaluation
    (``<run>/base-eval.json``) instead of embedding the corpus again."""
    config = run.config
    uri = store.join(config.run_uri, BASE_EVAL_FILE)
    key = {"model": run.base_model, "split": config.eval.split, "dims": list(config.loss.matryoshka_dims or ())}
    if run.resumed_version and store.exists(uri, config.storage):
        saved = json.loads(store.read_bytes(uri, config.storage))
        if saved["key"] == key:
            print(f"[eval] base: the first attempt's evaluation ({uri}), nDCG@10 "
                  f"{saved['metrics'].get('ndcg@10', float('nan')):.4f}; the corpus is not embedded again", flush=True)
            return Embedded(run.base_model, None, saved["count"], saved["metrics"])
    base = embed_and_evaluate(run, run.base_model, "base", first_vectors_uri(run))
    run.tracking.log_eval(base.metrics, step=0)
    store.write_bytes(uri, json.dumps({"key": key, "count": base.count, "metrics": base.metrics}).encode(),
                      config.storage)
    return base


def first_vectors_uri(run: ContrastiveRun) -> str | None:
    """Where the base model's vectors go: index v1's vector chunks, or nowhere when the run serves
    no index or a resumed run keeps serving its newest version."""
    from whetstone.train.refresh import vectors_uri

    if run.config.negatives.source == "none" or run.resumed_version:
        return None
    return vectors_uri(run.index_uri, 1)


def publish_first_version(run: ContrastiveRun, base: Embedded) -> int:
    """Build index v1 from the base model's vector chunks (``index.num_shards`` shards, one Ray task
    each) and publish it; a resumed run keeps serving its newest version."""
    from whetstone.train.refresh import publish_index

    if run.resumed_version:
        return run.resumed_version
    if base.vectors_uri is None:
        raise ValueError("publish_first_version: the base model's vectors were not kept (embed_and_evaluate "
                         "needs vectors_uri=first_vectors_uri(run))")
    # extra.step: the step whose weights embedded it (the workers' staleness is counted from it)
    publish_index(base.vectors_uri, run.index_uri, 1, base.model_uri, run.config.index, run.config.storage,
                  extra={"step": 0})
    return 1


@dataclass
class Refresher:
    """The run's :class:`IndexRefresher` actor; rank 0 finds it by ``name``."""

    name: str
    actor: Any


def start_refresher(run: ContrastiveRun) -> Refresher:
    """Start the actor that re-embeds the corpus from each checkpoint rank 0 sends it and swaps the
    new index version in, in the background."""
    from whetstone.train.refresh import IndexRefresher

    config = run.config
    name = f"whetstone-refresher-{config.run_name}-{uuid.uuid4().hex[:6]}"
    settings = {**config.refresh.model_dump(), "embed_gpus_resolved": config.embed_gpus,
                "index": index_build_settings(config), "keep_versions": config.index.keep_versions,
                "index_max_length": config.refresh.doc_max_length or config.eval.doc_max_length,
                "eval_split": config.eval.split, "query_max_length": config.encoder.query_max_length,
                "resumed": run.resume is not None, "progress_every_s": config.progress_every_s}
    actor = IndexRefresher.options(name=name, num_cpus=config.refresh.coordinator_cpus).remote(config.store_uri, run.index_uri,
                                                     config.storage.resolved().to_wire(), settings)
    return Refresher(name, actor)


def index_build_settings(config: ContrastiveJobConfig) -> dict[str, Any]:
    """The index section's build part (kind, FAISS knobs, shards) as JSON, for the refresher."""
    from whetstone.config.contrastive import IndexBuildConfig

    return config.index.model_dump(mode="json", include=set(IndexBuildConfig.model_fields))


def plan_run(run: ContrastiveRun, first_version: int, refresher: Refresher | None) -> ContrastiveRunPlan:
    """Steps per epoch (multi-task steps interleaved), total steps and where this attempt writes."""
    from whetstone.data.stream import count_training_rows

    config = run.config
    pairs = count_training_rows(config.store_uri, config.train_split, config.storage, config.loss.positives)
    world, batch = config.optim.num_workers, config.optim.batch_size
    steps_per_epoch = pairs // world // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"optim.batch_size: {pairs} pairs cannot fill one step of {world} x {batch}")
    task_shares, epoch_ends = None, [steps_per_epoch * (epoch + 1) for epoch in range(config.optim.epochs)]
    if run.task_data:
        from whetstone.losses.multitask import TaskScheduler

        task_shares = config.multitask.shares()
        epoch_ends = TaskScheduler(task_shares, config.optim.seed).epoch_ends(
            "retrieval", steps_per_epoch, config.optim.epochs)
    plan = ContrastiveRunPlan(
        total_steps=min(epoch_ends[-1], config.optim.max_steps or epoch_ends[-1]), steps_per_epoch=steps_per_epoch,
        checkpoint_root=store.join(config.run_uri, run.attempt),
        history_uri=store.join(config.run_uri, f"{run.attempt}-history.json"),
        resume_checkpoint=run.resume[0] if run.resume else None, resume_step=run.resume[1].step if run.resume else 0,
        base_model=run.base_model, train_rows=pairs, epoch_ends=epoch_ends, task_shares=task_shares,
        task_labels={name: data.labels for name, data in run.task_data.items() if data.labels},
        refresher=refresher.name if refresher else None, first_version=first_version,
        doc_lookup=run.docs_name, doc_partition_sizes=run.docs.sizes if run.docs is not None else [],
        **run.tracking.plan_fields())
    print(f"[train] {pairs} pairs, {world} workers x batch {batch}: {steps_per_epoch} steps/epoch, "
          f"{plan.total_steps} steps", flush=True)
    if run.resume:
        print(f"[train] resuming from {plan.resume_checkpoint} (step {plan.resume_step}, index v{first_version}) "
              "with its optimiser state and data position", flush=True)
    return plan


def start_docs(run: ContrastiveRun) -> Any:
    """The document-text partition actors the workers and the data pipeline resolve ids with
    (``doc_text.partitions`` of them; no process loads the whole corpus text)."""
    from whetstone.data.doc_lookup import start_doc_lookup

    config, t = run.config, time.monotonic()
    run.docs_name = f"whetstone-docs-{config.run_name}-{uuid.uuid4().hex[:6]}"
    run.docs = start_doc_lookup(config.store_uri, config.storage, config.doc_text.partitions,
                                config.doc_text.num_cpus, name=run.docs_name)
    run.timer.mark("doc_lookup_s", t)
    return run.docs


def mine_static(run: ContrastiveRun) -> Any:
    """``negatives.source=static``: mine every training query's negatives once, with the base model,
    through the index just deployed (``whetstone.train.static_negatives``); a resumed run reuses them."""
    from whetstone.train.static_negatives import mine_static_negatives

    t = time.monotonic()
    mined = mine_static_negatives(run.config, run.base_model, run.config.run_uri, reuse=run.resume is not None,
                                  docs=run.docs)
    run.timer.mark("mine_static_s", t)
    return mined


def training_datasets(run: ContrastiveRun, mined: Any = None) -> dict[str, Any]:
    """The tokenised training pairs (``train``; with ``mined``, the pairs carrying their static
    negatives, resolved to tokens here) and one dataset per auxiliary task."""
    import ray.data

    from whetstone.data.stream import pairs_dataset, tokenize_pairs
    from whetstone.train.multitask import task_dataset_name

    config = run.config
    topics = query_topics(config, run.base_model) if config.optim.topic_clusters else None
    pairs = pairs_dataset(config.store_uri, config.train_split, config.storage, seed=config.optim.seed,
                          negatives_per_query=config.negatives.mining.num_negatives if mined else 0,
                          positives=config.loss.positives, topics=topics,
                          pairs_store_uri=mined.store_uri if mined else None, docs=run.docs)
    train = tokenize_pairs(pairs, run.base_model, config.encoder.query_max_length, config.encoder.doc_max_length)
    return {"train": train, **{task_dataset_name(name): ray.data.from_arrow(data.table)
                               for name, data in run.task_data.items()}}


def query_topics(config: ContrastiveJobConfig, base_model: str) -> dict[str, int]:
    """TAS: k-means topic of every training query, from the base model's query embeddings.

    Embedded on the driver (queries are short and, next to the corpus, few); FAISS k-means with
    the run's seed, so a rerun draws the same topics.
    """
    from whetstone.data.store import read_dataset_table
    from whetstone.models.encoder import Encoder
    from whetstone.train.tas_balanced import cluster_queries

    started = time.monotonic()
    table = read_dataset_table(config.store_uri, f"pairs/{config.train_split}", config.storage,
                               columns=["query_id", "query"])
    queries = dict(zip(table.column("query_id").to_pylist(), table.column("query").to_pylist(), strict=True))
    k = config.optim.topic_clusters
    if k > len(queries):
        raise ConfigError(f"optim.topic_clusters: {k} topics for {len(queries)} training queries")
    encoder = Encoder.load(base_model, storage=config.storage)
    vectors = encoder.encode(list(queries.values()), batch_size=128, max_length=config.encoder.query_max_length)
    labels = cluster_queries(vectors, k, seed=config.optim.seed)
    sizes = np.bincount(labels, minlength=k)
    print(f"[train] topic-aware batches: {len(queries)} queries in {k} topics (sizes min {sizes.min()}, "
          f"median {int(np.median(sizes))}, max {sizes.max()}), {time.monotonic() - started:.1f} s", flush=True)
    return dict(zip(queries, labels.tolist(), strict=True))


def fit(run: ContrastiveRun, plan: ContrastiveRunPlan, datasets: dict[str, Any],
        train_loop: Callable[[dict], None]) -> dict[str, Any]:
    """Ray Train: ``num_workers`` workers run ``train_loop`` on the config and the plan (as JSON-safe
    data); returns the last reported metrics (rank 0's)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    config, t = run.config, time.monotonic()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": worker_job_config(config, ContrastiveJobConfig), "plan": plan.model_dump()},
        scaling_config=ScalingConfig(num_workers=config.optim.num_workers, use_gpu=config.optim.use_gpu,
                                     resources_per_worker={"CPU": config.optim.cpus_per_worker},
                                     placement_strategy=config.optim.placement_strategy),
        datasets=datasets,
        dataset_config=ordered_data_config(),  # the same batches in the same order: a resume skips the right ones
        run_config=train_run_config(run.attempt, config.run_uri, config.storage, config.ray_train_log_level,
                                    config.max_failures),
    )
    result = trainer.fit()
    run.timer.mark("train_s", t)
    return dict(result.metrics or {})


@dataclass
class FinalModel:
    """The trained model, embedded and evaluated, and what the refresher did during training."""

    trained_uri: str
    embedded: Embedded
    versions: list[int]
    refreshes: list[dict]
    refresh_errors: list[str]


def finish_model(run: ContrastiveRun, plan: ContrastiveRunPlan, refresher: Refresher | None) -> FinalModel:
    """Wait for the last refresh, merge with the base (if asked), embed and evaluate the final
    model and promote it as the newest index version."""
    import ray

    config = run.config
    status: dict = {"history": [], "errors": []}
    if refresher is not None:
        status = ray.get(refresher.actor.wait_idle.remote())
        for err in status["errors"]:
            print(f"[refresh] FAILED: {err}", flush=True)
    trained = final = store.join(config.run_uri, run.attempt, "final")
    if config.optim.merge_base_weight is not None:
        from whetstone.models.merge import merge_with_base

        t = time.monotonic()
        final = merge_with_base(trained, run.base_model, config.optim.merge_base_weight,
                                store.join(config.run_uri, run.attempt, "final-merged"), config.storage)
        print(f"[train] merged with the base model (base weight {config.optim.merge_base_weight}) in "
              f"{run.timer.mark('merge_s', t)} s: {final}", flush=True)
    versions = [plan.first_version] + [r["new_version"] for r in status["history"]]
    promoted = None
    if refresher is not None:
        from whetstone.train.refresh import next_version, vectors_uri

        promoted = next_version(run.index_uri, config.storage)
    embedded = embed_and_evaluate(run, final, "final", vectors_uri(run.index_uri, promoted) if promoted else None)
    if promoted is not None:
        from whetstone.index.client import IndexClient
        from whetstone.train.refresh import publish_index

        versions.append(promoted)
        publish_index(embedded.vectors_uri, run.index_uri, promoted, final, config.index, config.storage,
                      set_latest=False, extra={"step": plan.total_steps, "final": True})
        IndexClient.from_handle().swap(promoted)
        print(f"[index] promoted v{promoted} built from the final model", flush=True)
    return FinalModel(trained, embedded, versions, status["history"], status["errors"])
