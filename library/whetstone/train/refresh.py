"""Index refresh (ANCE-style): re-embed the corpus with a checkpoint, publish a new index version.

``embed_corpus`` is Ray Data batch inference over the corpus shards (one encoder per actor,
length-sorted batches). ``publish_index`` writes a versioned FAISS snapshot to storage.
``IndexRefresher`` is a Ray actor that the rank-0 training worker pokes with each new checkpoint;
it refreshes in the background while training goes on, one refresh at a time, coalescing
requests that arrive while one runs (only the newest checkpoint matters), and swaps each new
version into the index service.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import ray

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.data.schemas import document_text

logger = logging.getLogger(__name__)


class _EmbedBatch:
    """Ray Data UDF: load the encoder once per actor, embed a batch of corpus rows."""

    def __init__(self, model_uri: str, storage_wire: dict, max_length: int, batch_size: int,
                 dtype: str = "float32"):
        from whetstone.models.encoder import Encoder

        self.encoder = Encoder.load(model_uri, storage=StorageConfig(**storage_wire))
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


def embed_corpus(
    store_uri: str,
    model_uri: str,
    storage: StorageConfig | None = None,
    batch_size: int = 32,
    max_length: int = 256,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    dtype: str = "float32",
) -> tuple[list[str], np.ndarray]:
    """Embed every corpus document with ``model_uri`` using Ray Data.

    Returns:
        (doc ids, (N, D) float32 unit-norm vectors) in the same order.
    """
    storage = storage or StorageConfig()
    corpus = store.resolve(store.join(store_uri, "corpus"), storage)
    shards = [uri for uri in store.list_dir(store.join(store_uri, "corpus"), storage) if uri.endswith(".parquet")]
    dataset = ray.data.read_parquet(corpus.path, filesystem=corpus.filesystem)
    if len(shards) < 4 * concurrency:
        # A small corpus is read as one block, which one actor would embed alone; splitting it
        # (no shuffle) gives every embedding actor work. Large corpora have enough shards.
        dataset = dataset.repartition(4 * concurrency, shuffle=False)
    embedded = dataset.map_batches(
        _EmbedBatch,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "storage_wire": storage.resolved().to_wire(),
            "max_length": max_length,
            "batch_size": batch_size,
            "dtype": dtype,
        },
        batch_size=128,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        ids.extend(str(x) for x in batch["doc_id"])
        chunks.append(np.asarray(batch["vector"], dtype=np.float32))
    if not ids:
        raise ValueError(f"no corpus rows under {store.join(store_uri, 'corpus')}")
    return ids, np.concatenate(chunks, axis=0)


def publish_index(
    ids: list[str],
    vectors: np.ndarray,
    index_uri: str,
    version: int,
    checkpoint: str,
    kind: str = "flat",
    storage: StorageConfig | None = None,
) -> str:
    """Build a FAISS index of (N, D) ``vectors`` and save it as ``index_uri/v{version}``."""
    from whetstone.index.ann import AnnConfig, AnnIndex

    index = AnnIndex.build(vectors, ids, AnnConfig(kind=kind))
    return index.save(index_uri, version=version, checkpoint=checkpoint, storage=storage)


@ray.remote(num_cpus=0, max_concurrency=4)
class IndexRefresher:
    """Background refreshes for one training run; one at a time, newest checkpoint wins."""

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

    def _evaluate(self, checkpoint_uri: str, ids: list[str], vectors: np.ndarray) -> dict:
        """nDCG@10 / Recall@100 of the checkpoint on the eval split, from the vectors just indexed.

        Periodic evaluation for free: the corpus was embedded for the index anyway, only the eval
        queries are encoded here (at the index's document length, which may be shorter than the
        final evaluation's, hence the ``_at_index_length`` names).
        """
        split_name = self.settings.get("eval_split")
        if not split_name:
            return {}
        from whetstone.data.stream import load_eval_split
        from whetstone.eval.retrieval import evaluate_encoder
        from whetstone.models.encoder import Encoder

        if self._eval_split is None:
            self._eval_split = load_eval_split(self.store_uri, split_name, self.storage)
        split = self._eval_split
        metrics = evaluate_encoder(Encoder.load_query(checkpoint_uri, storage=self.storage), split.queries, split.qrels,
                                   ids, vectors, self.settings["query_max_length"])
        return {"ndcg@10_at_index_length": metrics["ndcg@10"], "recall@100_at_index_length": metrics["recall@100"]}

    def _refresh(self, checkpoint_uri: str, step: int) -> dict:
        from whetstone.index.ann import latest_version
        from whetstone.index.client import IndexClient

        started = time.monotonic()
        ids, vectors = embed_corpus(
            self.store_uri,
            checkpoint_uri,
            self.storage,
            batch_size=self.settings["embed_batch_size"],
            max_length=self.settings["index_max_length"],
            concurrency=self.settings["embed_concurrency"],
            num_cpus=self.settings["embed_cpus"],
            dtype=self.settings["dtype"],
        )
        embedded = time.monotonic()
        old_version = latest_version(self.index_uri, self.storage) or 0
        new_version = old_version + 1
        publish_index(ids, vectors, self.index_uri, new_version, checkpoint_uri,
                      self.settings["kind"], self.storage)
        IndexClient.from_handle().swap(new_version)
        quality = self._evaluate(checkpoint_uri, ids, vectors)
        record = {
            "step": step,
            "checkpoint": checkpoint_uri,
            "old_version": old_version,
            "new_version": new_version,
            "documents": len(ids),
            "embed_s": round(embedded - started, 2),
            "total_s": round(time.monotonic() - started, 2),
            **quality,
        }
        print(f"[refresh] index v{old_version} -> v{new_version} from {checkpoint_uri} "
              f"(step {step}, {len(ids)} docs, {record['total_s']} s)", flush=True)
        return record
