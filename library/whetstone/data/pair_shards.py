"""Training pairs streamed from storage, shard slice by shard slice (:func:`streamed_pairs`).

The driver holds the store's manifest only: Ray Data tasks read the pair shards (sha256 and row
counts checked), expand and permute them, and the order changes every epoch while repeating per
seed. ``whetstone.data.stream.pairs_dataset`` resolves the ids to texts and tokenises after this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import whetstone.storage as wstorage
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S
from whetstone.data.process_cache import cached
from whetstone.data.store import read_manifest, read_shard

if TYPE_CHECKING:
    import ray.data

# Streamed pairs: a store with few shards has its shards cut into slices (until the dataset has
# MIN_SLICES, at most MAX_SLICES per shard, none under MIN_SLICE_ROWS rows): a read task takes
# SLICE_GROUP consecutive slices of the epoch's seeded order, so which rows meet in a task changes
# every epoch. A shard is read once per slice (the sha256 check reads it whole), so a store of many
# shards is not sliced at all: a task then reads SLICE_GROUP whole shards, different ones each epoch.
MIN_SLICES, MAX_SLICES, MIN_SLICE_ROWS, SLICE_GROUP = 32, 4, 4, 4


def _slices(rows: int, num_shards: int) -> int:
    wanted = -(-MIN_SLICES // max(num_shards, 1))
    return max(1, min(wanted, MAX_SLICES, rows // MIN_SLICE_ROWS))


def streamed_pairs(store_uri: str, name: str, storage: StorageConfig | None = None, seed: int | None = None,
                   positives: str = "sample", topics: dict[str, int] | None = None) -> ray.data.Dataset:
    """The rows of dataset ``name``'s shards, streamed from storage: nothing is read on the driver.

    One item per shard slice (the shard's manifest entry: path, sha256, rows, and which slice).
    Every execution (epoch) visits the slices in a new seeded order (``randomize_block_order`` with
    ``reseed_after_execution``; the sequence of orders repeats per seed). A read task takes
    :data:`SLICE_GROUP` consecutive slices of that order, reads their shards (sha256 and row count
    checked against the manifest), applies ``positives="all"`` and ``topics``, and permutes the
    group's rows with a generator seeded by ``(seed, the slices' numbers)``: rows meet different
    rows every epoch, and the training loop's seeded local shuffle buffer mixes groups again. The
    driver holds the manifest only, so the pair set may be any size; a shard is read by at most as
    many tasks as it has slices (one when the store has 32 shards or more, at most four).
    """
    import ray
    import ray.data
    from ray.data import RandomSeedConfig

    manifest = read_manifest(store_uri, storage)
    shards = manifest.dataset(name, store_uri).shards
    items = []
    for number, shard in enumerate(shards):
        count = _slices(shard.rows, len(shards))
        items += [{"item": len(items) + k, "shard": number, "slice": k, "slices": count,
                   "path": wstorage.join(store_uri, shard.path), "entry": shard.model_dump_json()}
                  for k in range(count)]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    ds.context.execution_options.preserve_order = True  # the seeded order only repeats if kept
    reseed = RandomSeedConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    ds = ds.randomize_block_order(seed=reseed)
    topics_ref = ray.put(topics) if topics is not None else None
    storage_wire = storage.resolved().to_wire() if storage is not None else None
    return ds.map_batches(_read_pair_slices, fn_kwargs={"storage_wire": storage_wire, "seed": seed,
                                                        "positives": positives, "topics_ref": topics_ref},
                          batch_size=SLICE_GROUP, batch_format="pyarrow", num_cpus=0.25,
                          compute=ray.data.TaskPoolStrategy(size=2))


def _read_pair_slices(group: pa.Table, storage_wire: dict | None, seed: int | None, positives: str,
                      topics_ref: Any) -> pa.Table:
    """``map_batches`` task of :func:`streamed_pairs`: read, check, slice, expand and permute."""

    from whetstone.data.store import ShardEntry

    storage = StorageConfig(**storage_wire) if storage_wire is not None else None
    shards: dict[int, pa.Table] = {}
    parts = []
    for item in group.to_pylist():
        if item["shard"] not in shards:  # each shard once per task, its rows in a fixed seeded order
            table = read_shard(item["path"], ShardEntry.model_validate_json(item["entry"]), storage)
            order = np.random.default_rng(None if seed is None else [seed, item["shard"]]).permutation(table.num_rows)
            shards[item["shard"]] = table.take(pa.array(order))
        table = shards[item["shard"]]
        bounds = np.linspace(0, table.num_rows, item["slices"] + 1).astype(int)
        parts.append(table.slice(bounds[item["slice"]], bounds[item["slice"] + 1] - bounds[item["slice"]]))
    table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
    if positives == "all":
        table = explode_positives(table)
    if topics_ref is not None:
        import ray

        table = with_topics(table, cached(f"topics:{topics_ref.hex()}", lambda: ray.get(topics_ref)))
    numbers = group.column("item").to_pylist()
    rng = np.random.default_rng(None if seed is None else [seed, *numbers])
    return table.take(pa.array(rng.permutation(table.num_rows)))


def explode_positives(table: pa.Table) -> pa.Table:
    """One row per (query, labelled positive): the row's ``positive_id`` is fixed, and
    ``positive_ids`` keeps every positive of the query (for masking the others). Rows keep the
    input order, each query's positives in their listed order."""
    lengths = pc.list_value_length(table.column(S.POSITIVE_IDS)).to_numpy(zero_copy_only=False)
    parents = np.repeat(np.arange(table.num_rows), lengths)
    exploded = table.take(pa.array(parents))
    return exploded.append_column(S.POSITIVE_ID, pc.list_flatten(table.column(S.POSITIVE_IDS)).cast(pa.string()))


def with_topics(table: pa.Table, topics: dict[str, int]) -> pa.Table:
    """Append each row's ``topic`` (looked up by query id)."""
    query_ids = table.column(S.QUERY_ID).to_pylist()
    missing = [q for q in query_ids if q not in topics]
    if missing:
        raise KeyError(f"topics: {len(missing)} queries have no topic, e.g. {missing[:3]}")
    return table.append_column(S.TOPIC, pa.array([topics[q] for q in query_ids], pa.int32()))
