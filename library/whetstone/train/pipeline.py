"""Driver side of the contrastive job: index v1, Serve, TorchTrainer, refreshes, eval, report.

Jobs call :func:`run_contrastive` with their ``train_loop_per_worker``; the loop itself stays in
the job file (the recipe). Everything here runs on the driver.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import ray

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig, dump_config, load_config
from whetstone.config.contrastive import ContrastiveJobConfig
from whetstone.models.assets import resolve_model_path
from whetstone.train.memory import MemorySampler

logger = logging.getLogger(__name__)
ConfigT = TypeVar("ConfigT")


def parse_job_args(cls: type[ConfigT], argv: Sequence[str] | None, doc: str | None) -> ConfigT:
    """``--config file.yaml key=value ...`` -> validated config; exits 2 naming the bad field."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's (which log every 10 s on a non-interactive stdout)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def init_ray(num_cpus: int, object_store_mb: int) -> None:
    """Join the cluster ``ray job submit`` runs us in, or start a local one sized for small hosts."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime env applies; adding ours would conflict with it.
        ray.init(log_to_driver=True)
    else:
        # More logical CPUs than cores: Train workers, a Serve replica and Ray Data tasks each ask
        # for CPUs and would otherwise wait on each other.
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                            "TOKENIZERS_PARALLELISM": "false"},
               "worker_process_setup_hook": quiet_state_api_warnings}
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 1024**2,
                 include_dashboard=False, runtime_env=env, log_to_driver=True)


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the local Ray, which runs without the dashboard (2 cores).

    Ray Train's placement-group cleaner asks the state API, served by the dashboard, every few
    seconds whether the train controller is alive, and without one logs "Failed to query Ray Train
    Controller actor state" each time (about 80 lines in one ``make demo``). Its only job is to
    remove placement groups after a controller crash, and a local Ray goes away with the job.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def train_run_config(name: str, storage_uri: str, storage: StorageConfig | None, log_level: str) -> Any:
    """``RunConfig`` for both training jobs: checkpoints under ``storage_uri``, Ray Train's console
    logging at ``log_level``, and workers' ``print`` left alone. Ray Train otherwise patches
    ``print`` into its logger, and every progress line reaches the console twice (once printed,
    once logged)."""
    from ray.train import LoggingConfig, RunConfig

    root = store.resolve(storage_uri, storage)
    return RunConfig(name=name, storage_path=root.path, storage_filesystem=root.filesystem,
                     logging_config=LoggingConfig(log_level=log_level),
                     worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})


class Timer:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str, since: float) -> float:
        self.marks[name] = round(time.monotonic() - since, 2)
        return self.marks[name]


def evaluate_model(model_uri: str, config: ContrastiveJobConfig, split, doc_ids: list[str],
                   doc_vectors: np.ndarray) -> dict[str, float]:
    """Embed the split's queries with ``model_uri`` and rank the embedded corpus exactly (and at
    every Matryoshka width the loss trained)."""
    from whetstone.eval.retrieval import evaluate_encoder
    from whetstone.models.encoder import Encoder

    encoder = Encoder.load_query(model_uri, storage=config.storage)  # the query tower, if the model has one
    return evaluate_encoder(encoder, split.queries, split.qrels, doc_ids, doc_vectors,
                            config.encoder.query_max_length, dims=config.loss.matryoshka_dims or ())


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


def _prepare_run_dir(config: ContrastiveJobConfig) -> None:
    if store.exists(config.run_uri, config.storage):
        if config.if_exists == "error":
            raise ConfigError(f"run_name: {config.run_uri} exists; set if_exists=overwrite or resume")
        if config.if_exists == "overwrite":
            print(f"[run] removing previous outputs at {config.run_uri}", flush=True)
            store.delete_dir(config.run_uri, config.storage)


def find_resume_checkpoint(config: ContrastiveJobConfig) -> tuple[str, int] | None:
    """The newest ``step-N`` checkpoint of this run when ``if_exists=resume`` (None: start fresh).

    Raises:
        ConfigError: the run already finished (``train/final`` exists).
    """
    if config.if_exists != "resume":
        return None
    found: list[tuple[int, str]] = []
    # Each attempt is its own Ray Train run: train/ first, then train-from-<step>/ per resume.
    for attempt in store.list_dir(config.run_uri, config.storage):
        name = attempt.rstrip("/").rsplit("/", 1)[-1]
        # attempt folders only: train/, train-from-<step>/ (not train-history.json and the like)
        if not (name == "train" or (name.startswith("train-from-") and name[11:].isdigit())):
            continue
        for uri in store.list_dir(attempt, config.storage):
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if name == "final":
                raise ConfigError(f"if_exists: {config.run_uri} already finished ({uri} exists); "
                                  "use if_exists=overwrite or a new run_name")
            if name.startswith("step-") and name[5:].isdigit() and \
                    store.exists(store.join(uri, "trainer_state.json"), config.storage):
                found.append((int(name[5:]), uri))
    if not found:
        return None
    step, uri = max(found)
    return uri, step


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


def _task_report(task_data: dict[str, Any], shares: dict[str, float] | None, metrics: dict) -> dict | None:
    """Per task: its data's accounting, its share of the schedule and the steps rank 0 trained on it."""
    if not task_data:
        return None
    total = sum(shares.values())
    out: dict[str, dict] = {"retrieval": {"kind": "retrieval", "share": shares["retrieval"] / total,
                                          "steps": metrics.get("total_steps_retrieval")}}
    for name, data in task_data.items():
        out[name] = {**data.summary(), "share": shares[name] / total, "steps": metrics.get(f"total_steps_{name}")}
    return out


def _deploy_index(config: ContrastiveJobConfig, index_uri: str) -> None:
    from ray import serve

    from services.index.app import APP_NAME, IndexServiceArgs, build_app

    args = IndexServiceArgs(index_uri=index_uri, storage=config.storage.resolved(),
                            num_cpus=config.index.num_cpus, num_replicas=config.index.num_replicas)
    # A no-op (with a warning) when Serve already runs in this cluster, e.g. under a RayService.
    # A Serve instance still shutting down (its proxy being force-killed) fails the start with
    # ActorDiedError: wait for it to go and start again, a few times.
    from ray.exceptions import ActorDiedError

    for attempt in range(4):
        try:
            serve.start(http_options={"host": config.index.http_host, "port": config.index.http_port})
            break
        except ActorDiedError as err:
            if attempt == 3:
                raise
            logger.warning("Serve start raced a shutting-down Serve instance (%s); retrying", err)
            time.sleep(2.0 * (attempt + 1))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/index", blocking=False)


def _worker_config(config: ContrastiveJobConfig) -> dict[str, Any]:
    # Only the contrastive job's fields: wrappers such as the quickstart add their own sections.
    job = {k: v for k, v in config.model_dump(mode="json").items() if k in ContrastiveJobConfig.model_fields}
    job["storage"] = config.storage.resolved().to_wire()  # workers need the real secrets
    return job


def run_contrastive(config: ContrastiveJobConfig, train_loop: Callable[[dict], None]) -> dict:
    """Run the whole job; returns the report (also written to ``<run_uri>/report.json``)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from whetstone.data.stream import count_training_rows, load_eval_split, pairs_dataset, tokenize_pairs
    from whetstone.train.multitask import task_dataset_name
    from whetstone.train.refresh import IndexRefresher, embed_corpus, publish_index

    timer = Timer()
    memory = MemorySampler(include_ray=bool(os.environ.get("RAY_ADDRESS"))).start()
    config = absolute_local_paths(config)
    print(f"[run] resolved config:\n{dump_config(config)}", flush=True)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    _prepare_run_dir(config)
    task_data = load_tasks(config)  # before the slow parts: bad task data fails the run at once
    run_uri, index_uri = config.run_uri, store.join(config.run_uri, "index")
    base_model = resolve_model_path(config.encoder.base_model)
    embed_kwargs = dict(batch_size=config.refresh.embed_batch_size, max_length=config.eval.doc_max_length)

    t = time.monotonic()
    doc_ids, doc_vectors = embed_corpus(config.store_uri, base_model, config.storage,
                                        concurrency=config.index.initial_embed_concurrency, **embed_kwargs)
    print(f"[index] embedded {len(doc_ids)} documents with the base model in {timer.mark('embed_base_s', t)} s",
          flush=True)
    split = load_eval_split(config.store_uri, config.eval.split, config.storage) if config.eval.split else None
    before = evaluate_model(base_model, config, split, doc_ids, doc_vectors) if split else {}
    if before:
        print(f"[eval] before: nDCG@10 {before['ndcg@10']:.4f} Recall@100 {before['recall@100']:.4f}", flush=True)

    resume = find_resume_checkpoint(config)
    refresher_name, first_version = None, 1
    if config.negatives.source == "index":
        from whetstone.index.ann import latest_version

        t = time.monotonic()
        existing = latest_version(index_uri, config.storage) if resume else None
        if existing:  # a resumed run keeps serving its newest index version
            first_version = existing
        else:
            publish_index(doc_ids, doc_vectors, index_uri, 1, base_model, config.index.kind, config.storage)
        _deploy_index(config, index_uri)
        print(f"[index] v{first_version} deployed ({config.index.kind}, {len(doc_ids)} docs) in "
              f"{timer.mark('deploy_s', t)} s; "
              f"HTTP: http://{config.index.http_host}:{config.index.http_port}/index/stats", flush=True)
        refresher_name = f"whetstone-refresher-{config.run_name}-{uuid.uuid4().hex[:6]}"
        settings = {**config.refresh.model_dump(), "kind": config.index.kind,
                    "index_max_length": config.refresh.doc_max_length or config.eval.doc_max_length,
                    "eval_split": config.eval.split, "query_max_length": config.encoder.query_max_length}
        refresher = IndexRefresher.options(name=refresher_name).remote(
            config.store_uri, index_uri, config.storage.resolved().to_wire(), settings)

    attempt = f"train-from-{resume[1]:06d}" if resume else "train"  # one Ray Train run per attempt
    pairs = count_training_rows(config.store_uri, config.train_split, config.storage, config.loss.positives)
    world, batch = config.optim.num_workers, config.optim.batch_size
    steps_per_epoch = pairs // world // batch
    if steps_per_epoch == 0:
        raise ConfigError(f"optim.batch_size: {pairs} pairs cannot fill one step of {world} x {batch}")
    task_shares, epoch_ends = None, [
        steps_per_epoch * (epoch + 1) for epoch in range(config.optim.epochs)]
    if task_data:
        from whetstone.losses.multitask import TaskScheduler

        task_shares = config.multitask.shares()
        epoch_ends = TaskScheduler(task_shares, config.optim.seed).epoch_ends(
            "retrieval", steps_per_epoch, config.optim.epochs)
    total_steps = min(epoch_ends[-1], config.optim.max_steps or epoch_ends[-1])
    topics = query_topics(config, base_model) if config.optim.topic_clusters else None
    dataset = tokenize_pairs(pairs_dataset(config.store_uri, config.train_split, config.storage,
                                           seed=config.optim.seed, negatives_per_query=0,
                                           positives=config.loss.positives, topics=topics),
                             base_model, config.encoder.query_max_length, config.encoder.doc_max_length)
    plan = {"base_model": base_model, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "epoch_ends": epoch_ends, "task_shares": task_shares,
            "task_labels": {name: data.labels for name, data in task_data.items() if data.labels},
            "refresher": refresher_name, "checkpoint_root": store.join(run_uri, attempt),
            "first_version": first_version, "history_uri": store.join(run_uri, f"{attempt}-history.json")}
    print(f"[train] {pairs} pairs, {world} workers x batch {batch}: {steps_per_epoch} steps/epoch, "
          f"{total_steps} steps", flush=True)
    if resume:
        # Train V2 deprecates resume_from_checkpoint: the workers load this URI themselves.
        plan["resume_checkpoint"] = resume[0]
        print(f"[train] resuming from {resume[0]} (step {resume[1]}, index v{first_version}); the "
              "optimiser restarts from its defaults and the interrupted epoch's data order restarts", flush=True)
    t = time.monotonic()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": _worker_config(config), "plan": plan},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=config.optim.use_gpu,
                                     resources_per_worker={"CPU": config.optim.cpus_per_worker},
                                     placement_strategy=config.optim.placement_strategy),
        datasets={"train": dataset, **{task_dataset_name(name): ray.data.from_arrow(data.table)
                                       for name, data in task_data.items()}},
        run_config=train_run_config(attempt, run_uri, config.storage, config.ray_train_log_level),
    )
    result = trainer.fit()
    timer.mark("train_s", t)
    train_metrics = dict(result.metrics or {})

    refresh_status: dict = {"history": [], "errors": []}
    if refresher_name:
        refresh_status = ray.get(refresher.wait_idle.remote())
        for err in refresh_status["errors"]:
            print(f"[refresh] FAILED: {err}", flush=True)

    trained_model = final_model = store.join(run_uri, attempt, "final")
    if config.optim.merge_base_weight is not None:
        from whetstone.models.merge import merge_with_base

        t = time.monotonic()
        final_model = merge_with_base(trained_model, base_model, config.optim.merge_base_weight,
                                      store.join(run_uri, attempt, "final-merged"), config.storage)
        print(f"[train] merged with the base model (base weight {config.optim.merge_base_weight}) in "
              f"{timer.mark('merge_s', t)} s: {final_model}", flush=True)
    t = time.monotonic()
    final_ids, final_vectors = embed_corpus(config.store_uri, final_model, config.storage,
                                            concurrency=config.index.initial_embed_concurrency, **embed_kwargs)
    timer.mark("embed_final_s", t)
    after = evaluate_model(final_model, config, split, final_ids, final_vectors) if split else {}
    versions = [first_version] + [r["new_version"] for r in refresh_status["history"]]
    if refresher_name:
        from whetstone.index.client import IndexClient

        final_version = max(versions) + 1
        publish_index(final_ids, final_vectors, index_uri, final_version, final_model, config.index.kind,
                      config.storage)
        IndexClient.from_handle().swap(final_version)
        versions.append(final_version)
        print(f"[index] promoted v{final_version} built from the final model", flush=True)

    report = {
        "run_uri": run_uri,
        "model_uri": final_model,
        "trained_model_uri": trained_model,
        "merge_base_weight": config.optim.merge_base_weight,
        "eval_split": config.eval.split,
        "before": before,
        "after": after,
        "steps": total_steps,
        "train_rows_per_epoch": pairs,
        "steps_per_epoch": steps_per_epoch,
        "positives": config.loss.positives,
        "precision": config.encoder.precision,
        "query_tower": config.encoder.query_tower,
        "query_model_uri": (store.join(final_model, "query_encoder") if config.encoder.query_tower == "frozen"
                            else final_model),
        "topic_clusters": config.optim.topic_clusters,
        "tasks": _task_report(task_data, task_shares, train_metrics),
        "topic_pure_batch_share": train_metrics.get("topic_pure_batch_share"),
        "resumed_from_step": resume[1] if resume else None,
        "negatives_served_by_index": train_metrics.get("total_negatives_from_index"),
        "negatives_note": "rank-0 worker's count; every worker mines the same number per step",
        "negatives_served_all_workers": (train_metrics.get("total_negatives_from_index") or 0) * world,
        "fallback_steps_rank0": train_metrics.get("total_fallback_steps"),
        "negatives_random_fill": train_metrics.get("total_negatives_random_fill"),
        "negatives_dropped_as_false_negatives": train_metrics.get("total_negatives_dropped_margin"),
        "false_negative_dropped_share": (train_metrics.get("total_negatives_dropped_margin") or 0)
        / max(train_metrics.get("total_negative_candidates") or 0, 1),
        "final_loss": train_metrics.get("loss"),
        "worker_nodes": train_metrics.get("worker_nodes"),
        "data_wait_fraction": train_metrics.get("data_wait_fraction"),
        "index_versions": versions,
        "refreshes": refresh_status["history"],
        "refresh_errors": refresh_status["errors"],
        "timings_s": {**timer.marks, "total_s": round(time.monotonic() - timer.started, 2)},
        "peak_memory_gib": round(memory.stop() / 1024**3, 2),
        "peak_memory_top_processes_gib": memory.peak_breakdown,
    }
    report["plot_uri"] = _plot_run(config, plan, before, after, refresh_status["history"])
    report_uri = store.join(run_uri, "report.json")
    store.write_bytes(report_uri, json.dumps(report, indent=2).encode(), config.storage)
    _print_summary(report, report_uri)
    return report


def _plot_run(config: ContrastiveJobConfig, plan: dict, before: dict, after: dict, refreshes: list[dict]) -> str | None:
    """PNG of loss, score gap and nDCG@10 over steps, with refreshes marked (None if no history)."""
    from whetstone.train.plots import plot_metrics

    try:
        history = json.loads(store.read_bytes(plan["history_uri"], config.storage))
    except FileNotFoundError:
        return None
    points = list(history)
    if before:
        points.append({"step": 0, "ndcg@10": before["ndcg@10"]})
    points += [{"step": r["step"], "ndcg@10": r["ndcg@10_at_index_length"]} for r in refreshes
               if "ndcg@10_at_index_length" in r]
    if after:
        points.append({"step": plan["total_steps"], "ndcg@10": after["ndcg@10"]})
    points.sort(key=lambda m: m["step"])
    markers = [(r["step"], f"refresh v{r['old_version']}->v{r['new_version']}") for r in refreshes]
    task_losses = sorted({k for point in history for k in point if k.startswith("loss_")})
    keys = ["loss", "score_gap"] + task_losses + (["ndcg@10"] if before or after else [])
    uri = store.join(config.run_uri, "training.png")
    return plot_metrics(points, keys, uri, markers=markers, storage=config.storage,
                        title=f"{config.run_name}: loss, positive-negative gap, nDCG@10 (refreshes dashed)")


def _print_summary(report: dict, report_uri: str) -> None:
    before, after = report["before"], report["after"]
    lines = ["", "=== Whetstone contrastive run ==="]
    if before and after:
        lines.append(f"nDCG@10    before {before['ndcg@10']:.4f}  after {after['ndcg@10']:.4f}  "
                     f"({after['ndcg@10'] - before['ndcg@10']:+.4f})")
        lines.append(f"Recall@100 before {before['recall@100']:.4f}  after {after['recall@100']:.4f}")
    lines.append(f"steps {report['steps']}, hard negatives served by the index: "
                 f"{report['negatives_served_all_workers']} (fallback steps on rank 0: {report['fallback_steps_rank0']})")
    for r in report["refreshes"]:
        lines.append(f"refresh at step {r['step']}: index v{r['old_version']} -> v{r['new_version']} "
                     f"({r['total_s']} s)")
    lines.append(f"index versions {report['index_versions']}; peak memory {report['peak_memory_gib']} GiB; "
                 f"total {report['timings_s']['total_s']} s")
    lines.append(f"model: {report['model_uri']}")
    if report["query_model_uri"] != report["model_uri"]:
        lines.append(f"query tower (frozen; embed queries with it): {report['query_model_uri']}")
    if report.get("plot_uri"):
        lines.append(f"plot: {report['plot_uri']}")
    lines.append(f"report: {report_uri}")
    print("\n".join(lines), flush=True)
