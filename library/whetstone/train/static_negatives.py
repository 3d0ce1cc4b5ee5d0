"""Static hard negatives (``negatives.source=static``): mine once with the base model, train on them.

The fair baseline for live negatives: the same index (the run's v1, built from the base model's
vectors and served by the same service), the same rank window, the same false-negative margin and
random mix (:func:`whetstone.index.mining.mine_negatives` with the run's ``negatives.mining``), mined
once before training instead of every step. Ray Data streams the training pairs through a pool of
mining actors (each embeds its batch of queries with the base model's query tower, searches the
index through the Serve handle and mines), and the driver writes the mined pairs, ids only, as a
store of their own (``<run>/static-negatives``: ``pairs/<split>`` shards plus a manifest); the
training data pipeline then reads the pairs from there and resolves the negatives' texts by id,
as it resolves the positives'. Nothing is held whole: pairs stream in, mined shards stream out.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S

MINED_STORE = "static-negatives"


@dataclass
class MinedPairs:
    """Where the mined pairs are (a store holding ``pairs/<split>``) and what mining found."""

    store_uri: str
    pairs: int
    negatives_from_index: int
    negatives_random_fill: int
    negatives_dropped_margin: int
    index_version: int | None
    seconds: float
    reused: bool = False

    def summary(self) -> dict[str, Any]:
        return {"store_uri": self.store_uri, "pairs": self.pairs, "negatives_from_index": self.negatives_from_index,
                "negatives_random_fill": self.negatives_random_fill,
                "negatives_dropped_as_false_negatives": self.negatives_dropped_margin,
                "index_version": self.index_version, "mine_s": round(self.seconds, 2), "reused": self.reused}


class _MineQueries:
    """Ray Data actor: embed a batch of training queries, search the index, mine its negatives."""

    def __init__(self, model_uri: str, storage_wire: dict, store_uri: str, query_max_length: int, mining: dict,
                 seed: int, app_name: str, timeout_s: float, docs: Any = None) -> None:
        from whetstone.data.store import read_dataset_table
        from whetstone.index.client import IndexClient
        from whetstone.index.mining import MiningConfig
        from whetstone.models.encoder import Encoder

        storage = StorageConfig(**storage_wire)
        self.encoder = Encoder.load_query(model_uri, device="cpu", storage=storage)
        self.client = IndexClient.from_handle(app_name=app_name, timeout_s=timeout_s)
        self.mining = MiningConfig.model_validate(mining)
        self.seed, self.query_max_length, self.timeout_s = seed, query_max_length, timeout_s
        # The random-fill pool (documents drawn when the window has too few candidates): the run's text
        # partitions, or (without them) the corpus' ids read here.
        self.doc_ids = docs if docs is not None else read_dataset_table(
            store_uri, "corpus", storage, columns=[S.DOC_ID]).column(S.DOC_ID).to_pylist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        from whetstone.index.mining import mine_negatives
        from whetstone.train.contrastive import positive_reference_scores

        query_ids = batch.column(S.QUERY_ID).to_pylist()
        positives = batch.column(S.POSITIVE_IDS).to_pylist()
        vectors = self.encoder.encode(batch.column(S.QUERY).to_pylist(), batch_size=64,
                                      max_length=self.query_max_length)
        guard = bool(self.mining.relative_margin or self.mining.absolute_margin)
        result = self.client.search(vectors, k=self.mining.rank_end, exclude_ids=positives,
                                    timeout_s=self.timeout_s, score_excluded=guard)
        rng = np.random.default_rng([self.seed, zlib.crc32("\x1f".join(query_ids).encode("utf-8"))])
        mined = mine_negatives(result.ids, result.scores, self.mining, rng, self.doc_ids,
                               positive_scores=positive_reference_scores(result.excluded_scores) if guard else None,
                               exclude=[set(p) for p in positives])
        out = batch.set_column(batch.schema.get_field_index(S.NEGATIVE_IDS), S.NEGATIVE_IDS,
                               pa.array(mined.ids, pa.list_(pa.string())))
        counts = {"_from_index": mined.from_index, "_random_fill": mined.random_fill,
                  "_dropped_margin": mined.dropped_by_margin, "_version": result.version}
        for name, value in counts.items():  # batch totals on the first row, zeros elsewhere
            out = out.append_column(name, pa.array([value] + [0] * (out.num_rows - 1), pa.int64()))
        return out


def mined_store_uri(run_uri: str) -> str:
    return store.join(run_uri, MINED_STORE)


def mine_static_negatives(config, base_model: str, run_uri: str, reuse: bool = False,
                          app_name: str | None = None, docs: Any = None) -> MinedPairs:
    """Mine ``negatives.mining.num_negatives`` negatives for every training query of
    ``config.train_split`` through the deployed index, write them as ``<run>/static-negatives``.

    Args:
        config: the run's :class:`whetstone.config.contrastive.ContrastiveJobConfig`.
        base_model: the model whose query tower embeds the queries (the index's v1 was built with it).
        reuse: keep a complete earlier mining of this run (a resumed run trains on what it mined).

    Raises:
        ValueError: the split has no pairs.
    """
    import ray.data

    from whetstone.data.store import ShardWriter, new_manifest, read_manifest, write_manifest
    from whetstone.data.stream import streamed_pairs
    from whetstone.index.wire import APP_NAME

    started, out_uri, name = time.monotonic(), mined_store_uri(run_uri), f"pairs/{config.train_split}"
    if reuse and store.exists(store.join(out_uri, "manifest.json"), config.storage):
        entry = read_manifest(out_uri, config.storage).dataset(name, out_uri)
        print(f"[mine] reusing {entry.rows} mined pairs under {out_uri}", flush=True)
        return MinedPairs(out_uri, entry.rows, 0, 0, 0, None, 0.0, reused=True)
    pairs = streamed_pairs(config.store_uri, name, config.storage, seed=config.optim.seed)
    mined = pairs.map_batches(
        _MineQueries, batch_format="pyarrow", batch_size=256,
        fn_constructor_kwargs={"model_uri": base_model, "storage_wire": config.storage.resolved().to_wire(),
                               "store_uri": config.store_uri, "query_max_length": config.encoder.query_max_length,
                               "mining": config.negatives.mining.model_dump(), "seed": config.optim.seed,
                               "app_name": app_name or APP_NAME, "timeout_s": 60.0, "docs": docs},
        compute=ray.data.ActorPoolStrategy(size=config.index.initial_embed_concurrency), num_cpus=0.5)
    writer = ShardWriter(out_uri, name, S.PAIRS_SCHEMA, rows_per_shard=1000, storage_config=config.storage)
    totals = {"_from_index": 0, "_random_fill": 0, "_dropped_margin": 0}
    versions: set[int] = set()
    for batch in mined.iter_batches(batch_size=None, batch_format="pyarrow"):
        for column in totals:
            totals[column] += int(pc.sum(batch.column(column)).as_py() or 0)
        versions.update(v for v in batch.column("_version").to_pylist() if v)
        writer.add_table(batch)
        if writer.rows_written and writer.rows_written % 100_000 < batch.num_rows:
            print(f"[mine] {writer.rows_written} pairs mined ({time.monotonic() - started:.0f} s)", flush=True)
    entry = writer.close()
    if entry.rows == 0:
        raise ValueError(f"{name} in {config.store_uri}: no training pairs to mine negatives for")
    write_manifest(out_uri, new_manifest(f"mined from {config.store_uri} with {base_model}", {name: entry}, {}),
                   config.storage)
    result = MinedPairs(out_uri, entry.rows, totals["_from_index"], totals["_random_fill"], totals["_dropped_margin"],
                        max(versions) if versions else None, time.monotonic() - started)
    print(f"[mine] {result.pairs} pairs, {result.negatives_from_index} negatives from index v{result.index_version} "
          f"(+{result.negatives_random_fill} random, {result.negatives_dropped_margin} dropped as likely false "
          f"negatives) in {result.seconds:.1f} s -> {out_uri}", flush=True)
    return result
