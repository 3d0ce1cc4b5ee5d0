"""Index refresh (ANCE-style): re-embed the corpus with a checkpoint, publish a new index version.

Nothing here holds the whole corpus' vectors: ``embedded_batches`` is Ray Data batch inference
over the corpus shards (one encoder per actor, length-sorted batches) streamed batch by batch;
:class:`CorpusVectors` writes the batches to vector chunks in storage
(``index_root/vectors/v{n}/``) as they pass, for whoever reads them next (the evaluation's chunked
exact search, say); ``publish_index`` builds the version's shards from those chunks, one Ray task
per shard (``whetstone.index.build``). ``IndexRefresher`` is a Ray actor that the rank-0 training
worker pokes with each new checkpoint; it refreshes in the background while training goes on, one
refresh at a time, coalescing requests that arrive while one runs (only the newest checkpoint
matters), and swaps each new version into the index service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.console import DEFAULT_EVERY_S, ProgressLine, plural
from whetstone.data.schemas import document_text
from whetstone.index.retention import VECTORS_DIR

logger = logging.getLogger(__name__)
EMBED_BLOCK_BYTES = 4 * 1024**2  # largest block of the corpus embedding's pipeline (see embedded_batches)


class _EmbedBatch:
    """Ray Data UDF: load the encoder once per actor, embed a batch of corpus rows."""

    def __init__(self, model_uri: str, storage_wire: dict, max_length: int, batch_size: int,
                 dtype: str = "float32", use_gpu: bool = False, nice: int = 0):
        import os

        from whetstone.models.encoder import Encoder

        if nice:  # a refresh while training: the CPU goes to the training workers first
            os.nice(nice)
        # A GPU only when Ray gave this actor one (it then sees just that one as cuda:0).
        self.encoder = Encoder.load(model_uri, device="cuda" if use_gpu else "cpu", storage=StorageConfig(**storage_wire))
        self.max_length = max_length
        self.batch_size = batch_size
        self.dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        titles = batch.get("title")
        texts = [
            document_text(str(titles[i]) if titles is not None and titles[i] is not None else "", str(t))
            for i, t in enumerate(batch["text"])
        ]
        vectors = self.encoder.encode(texts, batch_size=self.batch_size, max_length=self.max_length,
                                      dtype=self.dtype)
        return {"doc_id": batch["doc_id"], "vector": vectors}


def embedded_batches(
    store_uri: str,
    model_uri: str,
    storage: StorageConfig | None = None,
    batch_size: int = 32,
    max_length: int = 256,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    dtype: str = "float32",
    num_gpus: float = 0.0,
    gpu_dtype: str = "float16",
    select: Any = None,
    nice: int = 0,
    map_batch_rows: int | None = None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Embed every corpus document (or those ``select`` picks) with ``model_uri`` using Ray Data, streamed.

    ``select``: a :class:`whetstone.train.partial_refresh.RefreshPlan` (a partial refresh); its rows
    are picked by a Ray Data task ahead of the embedding actors, so their batches stay full.
    ``nice``: the embedding actors' CPU priority (``os.nice``), for refreshes beside training.

    With ``num_gpus`` > 0 every embedding actor asks Ray for that many GPUs and embeds on its GPU
    under ``gpu_dtype`` autocast (half precision by default; the vectors stay float32 unit-norm);
    otherwise on CPU under ``dtype``.

    Yields:
        (doc ids, (n, D) float32 unit-norm vectors) per batch, as Ray Data hands them over (about
        128 rows each); the caller holds one batch at a time.

    Raises:
        ValueError: the corpus has no rows (raised once the stream is exhausted).
    """
    storage = storage or StorageConfig()
    corpus = store.resolve(store.join(store_uri, "corpus"), storage)
    shards = [uri for uri in store.list_dir(store.join(store_uri, "corpus"), storage) if uri.endswith(".parquet")]
    dataset = ray.data.read_parquet(corpus.path, filesystem=corpus.filesystem)
    # Reads, row picks and the actors together take at most the actors' CPUs plus one: Ray Data would
    # otherwise start a task per logical CPU (8 on a 2-core machine) beside training and the index.
    dataset.context.execution_options.resource_limits = dataset.context.execution_options.resource_limits.copy(
        cpu=concurrency * num_cpus + 1)
    # Blocks reach the consumer (and its progress line) as the actors fill them. At Ray Data's 128 MiB
    # target one block held ~80k MiniLM vectors (a minute apart on a CPU); at 4 MiB they come every few
    # seconds at the same throughput (20k docs, 384-d vectors, one actor: 19.6 s vs 19.1 s).
    limit = dataset.context.target_max_block_size
    dataset.context.target_max_block_size = min(limit, EMBED_BLOCK_BYTES) if limit else EMBED_BLOCK_BYTES
    if len(shards) < 4 * concurrency:
        # A small corpus is read as one block, which one actor would embed alone; splitting it
        # (no shuffle) gives every embedding actor work. Large corpora have enough shards.
        dataset = dataset.repartition(4 * concurrency, shuffle=False)
    if select is not None and not select.full:
        dataset = dataset.map_batches(_selected_rows, fn_kwargs={"plan_ref": ray.put(select)}, batch_format="pyarrow",
                                      num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=2))
    embedded = dataset.map_batches(
        _EmbedBatch,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "storage_wire": storage.resolved().to_wire(),
            "max_length": max_length,
            "batch_size": batch_size,
            "dtype": gpu_dtype if num_gpus else dtype,
            "use_gpu": bool(num_gpus),
            "nice": nice,
        },
        batch_size=map_batch_rows or max(128, 2 * batch_size),  # rows per actor call (encoded in batch_size)
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        **({"num_gpus": num_gpus} if num_gpus else {}),
    )
    rows = 0
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        ids = [str(x) for x in batch["doc_id"]]
        rows += len(ids)
        yield ids, np.asarray(batch["vector"], dtype=np.float32)
    if not rows and (select is None or select.full):
        raise ValueError(f"no corpus rows under {store.join(store_uri, 'corpus')}")


def _selected_rows(batch: Any, plan_ref: Any) -> Any:
    """``map_batches`` task: the rows of a corpus batch that the partial refresh's plan re-embeds."""
    import pyarrow as pa

    from whetstone.data.process_cache import cached

    plan = cached(f"refresh-plan:{plan_ref.hex()}", lambda: ray.get(plan_ref))
    return batch.filter(pa.array(plan.selects(batch.column("doc_id").to_pylist())))


class CorpusVectors:
    """One pass over embedded batches that writes them to vector chunks under ``vectors_uri`` (when
    given) as they go by, and counts them. Iterate it once, e.g. through an exact evaluation; the
    chunks are complete (``manifest`` set) when the iteration ends.

    Args:
        batches: (ids, (n, D) float32) pairs, e.g. :func:`embedded_batches`.
        vectors_uri: where :class:`whetstone.index.vector_chunks.VectorChunkWriter` writes, typically
            ``index_root/vectors/v{n}`` (:func:`vectors_uri`); None: count only.
        num_shards: the shard count of the index these vectors will build; the chunks are then
            partitioned by shard, so each shard's builder downloads only its own rows.
        progress: counts the documents as they pass (periodic lines, the totals once the pass
            ends); :func:`embed_progress` makes one.
    """

    def __init__(self, batches: Iterator[tuple[list[str], np.ndarray]], vectors_uri: str | None = None,
                 storage: StorageConfig | None = None, *, num_shards: int = 1, step: int | None = None,
                 refresh: int | None = None, progress: ProgressLine | None = None) -> None:
        self.batches = batches
        self.progress = progress
        self.vectors_uri = vectors_uri
        self.storage = storage
        self.num_shards = num_shards
        self.step, self.refresh = step, refresh  # recorded on every chunk (the index's age)
        self.rows = 0
        self.dim: int | None = None
        self.manifest: Any = None  # the VectorChunksManifest once every batch is written

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        from whetstone.index.vector_chunks import VectorChunkWriter

        writer = None
        for ids, vectors in self.batches:
            if writer is None and self.vectors_uri is not None:
                writer = VectorChunkWriter(self.vectors_uri, int(vectors.shape[1]), storage=self.storage,
                                           num_shards=self.num_shards, step=self.step, refresh=self.refresh)
            if writer is not None:
                writer.write(ids, vectors)
            self.rows += len(ids)
            self.dim = int(vectors.shape[1])
            if self.progress is not None:
                self.progress.update(self.rows)
            yield ids, vectors
        if writer is not None:
            self.manifest = writer.close()
        if self.progress is not None:
            self.progress.done(f" into {self.vectors_uri}" if self.vectors_uri else "")

    def drain(self) -> CorpusVectors:
        """Consume the batches (write and count them) without looking at them."""
        for _ in self:
            pass
        return self


def corpus_size(store_uri: str, storage: StorageConfig | None = None) -> int | None:
    """Documents in the store's corpus, from its manifest (None when it cannot be read)."""
    from whetstone.data.store import read_manifest

    try:
        return read_manifest(store_uri, storage).dataset("corpus", store_uri).rows
    except (KeyError, OSError, ValueError):
        return None


def embed_progress(what: str, store_uri: str, storage: StorageConfig | None = None,
                   every_s: float = DEFAULT_EVERY_S, total: int | None = None) -> ProgressLine:
    """Progress of one corpus embedding: ``[embed] <what>: n/N docs (r docs/s), eta s`` at most every
    ``every_s`` seconds (N: ``total``, default the corpus size from the store's manifest)."""
    total = corpus_size(store_uri, storage) if total is None else total
    return ProgressLine(what, "docs", total=total, every_s=every_s, tag="[embed]")


def build_config(build: dict[str, Any] | Any) -> Any:
    """An index build's settings as an :class:`whetstone.config.contrastive.IndexBuildConfig`
    (given one, or its JSON as the refresher holds it)."""
    from whetstone.config.contrastive import IndexBuildConfig

    return build if isinstance(build, IndexBuildConfig) else IndexBuildConfig.model_validate(build)


def vectors_uri(index_uri: str, version: int) -> str:
    """Where version ``version``'s vector chunks go: ``index_root/vectors/v{version}``."""
    return store.join(index_uri, VECTORS_DIR, f"v{version}")


def next_version(index_uri: str, storage: StorageConfig | None = None) -> int:
    """One past every version under ``index_uri`` that has a manifest or vector chunks (a refresh that
    failed after writing its vectors leaves them behind; the next one must not write over them)."""
    from whetstone.index.snapshot import list_versions

    used = list_versions(index_uri, storage)
    vectors_root = store.join(index_uri, VECTORS_DIR)
    if store.exists(vectors_root, storage):
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in store.list_dir(vectors_root, storage))
        used += [int(name[1:]) for name in names if name.startswith("v") and name[1:].isdigit()]
    return max(used, default=0) + 1


def publish_index(
    vectors_uri: str,
    index_uri: str,
    version: int,
    checkpoint: str,
    build: dict[str, Any] | Any,
    storage: StorageConfig | None = None,
    *,
    set_latest: bool = True,
    extra: dict | None = None,
) -> Any:
    """Build index ``version`` of the vector chunks under ``vectors_uri``, shard by shard, and publish
    its manifest (and ``LATEST`` when ``set_latest``; a running service's two-phase swap writes it
    otherwise).

    Args:
        build: an :class:`whetstone.config.contrastive.IndexBuildConfig` or its JSON (kind, FAISS
            knobs, ``num_shards``, ``build_cpus``).

    Returns:
        The published :class:`whetstone.index.snapshot.SnapshotManifest`.
    """
    from whetstone.index.build import build_sharded_index

    settings, started = build_config(build), time.monotonic()
    manifest = build_sharded_index(vectors_uri, index_uri, version, settings.num_shards, settings.ann_config(),
                                   checkpoint, storage=storage, extra=extra, set_latest=set_latest,
                                   task_cpus=settings.build_cpus)
    elapsed = time.monotonic() - started
    print(f"[index] v{version} built: {settings.kind}, {plural(settings.num_shards, 'shard')}, {manifest.count:,} docs "
          f"in {elapsed:.1f} s ({manifest.count / max(elapsed, 1e-9):,.0f} docs/s)", flush=True)
    return manifest


@ray.remote(num_cpus=0, max_concurrency=4)
class IndexRefresher:
    """Background refreshes for one training run; one at a time, newest checkpoint wins.

    Started with ``.options(num_cpus=refresh.coordinator_cpus)``: it drives the Ray Data pipeline,
    writes the vector chunks as batches pass and evaluates each checkpoint, so it reserves the
    CPUs that work takes (the embedding actors and build tasks reserve their own)."""

    def __init__(self, store_uri: str, index_uri: str, storage_wire: dict, settings: dict):
        self.store_uri = store_uri
        self.index_uri = index_uri
        self.storage = StorageConfig(**storage_wire)
        self.settings = settings
        from whetstone.train.runtime import quiet_ray_data

        quiet_ray_data()
        self.pending: tuple[str, int] | None = None
        self.history: list[dict] = []
        self.errors: list[str] = []
        self.busy = False
        self._eval_split = None
        self.policy = None  # PartialRefreshPolicy with refresh.fraction < 1 (built at the first refresh)
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def request(self, checkpoint_uri: str, step: int) -> None:
        with self.lock:
            if self.pending is not None:
                logger.info("refresh for step %d superseded by step %d", self.pending[1], step)
            self.pending = (checkpoint_uri, step)
        self.wakeup.set()

    def note_served(self, ids: list[str]) -> None:
        """Training workers report the negatives they mined (a partial refresh re-embeds them first)."""
        if self.settings.get("fraction", 1.0) < 1.0:
            self._partial().served.note(ids)

    def _partial(self):
        with self.lock:
            if self.policy is None:
                from whetstone.train.partial_refresh import PartialRefreshPolicy, count_slices

                fraction = self.settings["fraction"]
                sizes = count_slices(self.store_uri, self.storage, fraction)
                self.policy = PartialRefreshPolicy(fraction, self.settings.get("served_share", 0.5), sum(sizes),
                                                   sizes, resumed=bool(self.settings.get("resumed")))
            return self.policy

    def status(self) -> dict:
        with self.lock:
            return {
                "busy": self.busy or self.pending is not None,
                "history": list(self.history),
                "errors": list(self.errors),
            }

    def wait_idle(self, timeout_s: float = 1800.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.status()["busy"]:
                break
            time.sleep(0.5)
        return self.status()

    def _run(self) -> None:
        while True:
            self.wakeup.wait()
            with self.lock:
                job, self.pending = self.pending, None
                self.wakeup.clear()
                self.busy = job is not None
            if job is None:
                continue
            try:
                self.history.append(self._refresh(*job))
            except Exception as err:  # noqa: BLE001 - reported to the driver, training goes on
                logger.exception("index refresh from %s failed", job[0])
                self.errors.append(f"step {job[1]}: {type(err).__name__}: {err}")
            finally:
                with self.lock:
                    self.busy = False

    def _evaluate(self, checkpoint_uri: str, vectors_at: str) -> dict:
        """nDCG@10 / Recall@100 of the checkpoint on the eval split, from the vectors just indexed.

        Periodic evaluation for free: the corpus was embedded for the index anyway (its chunks are
        read back from storage one at a time), only the eval queries are encoded here (at the
        index's document length, which may be shorter than the final evaluation's, hence the
        ``_at_index_length`` names).
        """
        split_name = self.settings.get("eval_split")
        if not split_name:
            return {}
        from whetstone.data.stream import load_eval_split
        from whetstone.eval.retrieval import evaluate_encoder
        from whetstone.index.vector_chunks import iter_vector_chunks
        from whetstone.models.encoder import Encoder

        if self._eval_split is None:
            self._eval_split = load_eval_split(self.store_uri, split_name, self.storage)
        split = self._eval_split
        metrics = evaluate_encoder(Encoder.load_query(checkpoint_uri, storage=self.storage), split.queries, split.qrels,
                                   iter_vector_chunks(vectors_at, self.storage), None, self.settings["query_max_length"])
        return {"ndcg@10_at_index_length": metrics["ndcg@10"], "recall@100_at_index_length": metrics["recall@100"]}

    def _refresh(self, checkpoint_uri: str, step: int) -> dict:
        from whetstone.index.snapshot import latest_version

        started = time.monotonic()
        self._started_at = time.time()
        old_version = latest_version(self.index_uri, self.storage) or 0
        new_version = next_version(self.index_uri, self.storage)
        policy = self._partial() if self.settings.get("fraction", 1.0) < 1.0 else None
        plan = None
        if policy is not None:  # a partial refresh layers on the served version's vector chunks: they must exist
            previous = store.join(vectors_uri(self.index_uri, old_version), "manifest.json")
            plan = policy.next_plan(full=not store.exists(previous, self.storage))
        print(f"[refresh] step {step}: re-embedding {'the corpus' if plan is None or plan.full else 'a slice'} "
              f"with {checkpoint_uri} for v{new_version}", flush=True)
        try:
            return self._embed_and_publish(checkpoint_uri, step, started, old_version, new_version, policy, plan)
        except BaseException:
            if plan is not None:
                policy.abandon(plan)  # the slice is re-embedded by the next refresh instead
            raise

    def _embed_and_publish(self, checkpoint_uri: str, step: int, started: float, old_version: int,
                           new_version: int, policy, plan) -> dict:
        from whetstone.index.client import IndexClient

        vectors_at = vectors_uri(self.index_uri, new_version)
        partial = plan is not None and not plan.full
        progress = embed_progress(f"corpus v{new_version}" + (f" (partial refresh {plan.number})" if partial else ""),
                                  self.store_uri, self.storage, self.settings.get("progress_every_s", DEFAULT_EVERY_S),
                                  total=policy.expected_documents(plan) if partial else None)
        embedded = CorpusVectors(embedded_batches(
            self.store_uri,
            checkpoint_uri,
            self.storage,
            batch_size=self.settings["embed_batch_size"],
            max_length=self.settings["index_max_length"],
            concurrency=self.settings["embed_concurrency"],
            num_cpus=self.settings["embed_cpus"],
            dtype=self.settings["dtype"],
            num_gpus=self.settings.get("embed_gpus_resolved", 0.0),
            gpu_dtype=self.settings.get("gpu_dtype", "float16"),
            select=plan,
            nice=self.settings.get("embed_nice", 0),
        ), vectors_at, self.storage, num_shards=build_config(self.settings["index"]).num_shards, step=step,
            refresh=plan.number if plan is not None else None, progress=progress).drain()
        embedded_s = time.monotonic() - started
        embedded_at = time.time()
        extra: dict = {"step": step}
        if plan is not None:  # a partial refresh: the new vectors on top of the chunks still current
            from whetstone.train.partial_refresh import layer_on_previous

            extra.update(layer_on_previous(policy, plan, step, embedded, vectors_at,
                                           vectors_uri(self.index_uri, old_version), self.storage))
        # The service's two-phase swap writes LATEST once every shard replica holds the new version.
        publish_index(vectors_at, self.index_uri, new_version, checkpoint_uri, self.settings["index"], self.storage,
                      set_latest=False, extra=extra)
        IndexClient.from_handle().swap(new_version)
        if plan is not None:
            policy.done(plan, step)
        if self.settings.get("keep_versions"):
            from whetstone.index.retention import retain_versions

            retained = retain_versions(self.index_uri, self.settings["keep_versions"], self.storage)
            if retained.removed or retained.removed_vectors:
                print(f"[refresh] retention: {retained.line()}", flush=True)
        # (a partial version's chunks hold superseded rows too: evaluated with full refreshes only)
        quality = self._evaluate(checkpoint_uri, vectors_at) if plan is None or plan.full else {}
        record = {
            "step": step,
            "checkpoint": checkpoint_uri,
            "old_version": old_version,
            "new_version": new_version,
            "documents": embedded.rows,
            "embed_s": round(embedded_s, 2),
            "embed_docs_per_s": round(embedded.rows / max(embedded_s, 1e-9), 1),
            **{key: extra[key] for key in ("partial", "age") if key in extra},
            "total_s": round(time.monotonic() - started, 2),
            "started_at": self._started_at, "embedded_at": embedded_at, "ended_at": time.time(),
            **quality,
        }
        print(f"[refresh] index v{old_version} -> v{new_version} from {checkpoint_uri} "
              f"(step {step}, {embedded.rows} docs, {record['total_s']} s)", flush=True)
        return record
