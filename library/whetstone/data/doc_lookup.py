"""Document texts by id, held once for the whole run and spread over Ray actors.

A training worker turns mined negative ids into tokens every step, and the data pipeline turns
positive ids into text; neither may hold the corpus (5-10 GB per process at 10M documents). The
corpus text lives instead in ``partitions`` :class:`DocTextPartition` actors, each holding the
documents whose ``crc32(id) % partitions`` is its number (the index shards' hash, so a deployment
could co-locate them) as Arrow columns plus a sorted array of id hashes for lookup. Callers hold a
:class:`DocLookup`: actor handles and the partition sizes, a few bytes whatever the corpus size.
A lookup groups ids by partition and asks the partitions in parallel.

Why actors and not the index shards: index replicas reload with every version (and blue/green keeps
two sets), while the text never changes during a run; the partitions load once and stay. Why not
Ray Data: the ids to resolve are decided inside the training step, one small batch at a time.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S


def _hashes(ids: Sequence[str]) -> np.ndarray:
    """64-bit keys of ids: crc32 in the high half (also the partition hash), a second crc below it."""
    crc = zlib.crc32
    return np.fromiter(((crc(i.encode("utf-8")) << 32) | crc(i.encode("utf-8"), 0x9E3779B9) for i in ids),
                       dtype=np.uint64, count=len(ids))


def partition_of(ids: Sequence[str], partitions: int) -> np.ndarray:
    """Each id's partition: ``crc32(utf-8) % partitions`` (as ``whetstone.index.snapshot.shard_of``)."""
    return (_hashes(ids) >> np.uint64(32)).astype(np.int64) % partitions


class DocTextPartition:
    """One partition's documents (Ray actor, started by :func:`start_doc_lookup`).

    Args:
        store_uri: the store whose ``corpus`` to read (every shard, this partition's rows kept).
        number, partitions: which partition this is, of how many.
    """

    def __init__(self, store_uri: str, storage_wire: dict, number: int, partitions: int) -> None:
        from whetstone.data.store import read_manifest, read_shard
        from whetstone.storage import join

        storage = StorageConfig(**storage_wire)
        manifest = read_manifest(store_uri, storage)
        kept = []
        for shard in manifest.dataset("corpus", store_uri).shards:
            table = read_shard(join(store_uri, shard.path), shard, storage).select([S.DOC_ID, S.TITLE, S.TEXT])
            mine = partition_of(table.column(S.DOC_ID).to_pylist(), partitions) == number
            kept.append(table.filter(pa.array(mine)))
        table = pa.concat_tables(kept).combine_chunks() if kept else pa.table({S.DOC_ID: [], S.TITLE: [], S.TEXT: []})
        keys = _hashes(table.column(S.DOC_ID).to_pylist())
        order = np.argsort(keys, kind="stable")
        self.table = table.take(pa.array(order))
        self.keys = keys[order]
        if len(self.keys) > 1 and np.any(self.keys[1:] == self.keys[:-1]):
            dup = self.table.column(S.DOC_ID)[int(np.flatnonzero(self.keys[1:] == self.keys[:-1])[0])].as_py()
            raise ValueError(f"corpus in {store_uri}: document id {dup!r} appears twice (or collides with another's "
                             "64-bit hash)")

    def count(self) -> int:
        return self.table.num_rows

    def rows_of(self, ids: list[str]) -> np.ndarray:
        keys = _hashes(ids)
        rows = np.searchsorted(self.keys, keys)
        found = (rows < len(self.keys)) & (self.keys[np.minimum(rows, len(self.keys) - 1)] == keys)
        if not found.all():
            missing = ids[int(np.flatnonzero(~found)[0])]
            raise KeyError(f"document id {missing!r} is not in the corpus")
        return rows

    def texts(self, ids: list[str]) -> list[str]:
        """:func:`whetstone.data.schemas.document_text` of each id; KeyError names an unknown id."""
        taken = self.table.take(pa.array(self.rows_of(ids), type=pa.int64()))
        return [S.document_text(title, text) for title, text in
                zip(taken.column(S.TITLE).to_pylist(), taken.column(S.TEXT).to_pylist(), strict=True)]

    def ids_at(self, rows: list[int]) -> list[str]:
        return self.table.column(S.DOC_ID).take(pa.array(rows, type=pa.int64())).to_pylist()

    def all_ids(self) -> list[str]:
        return self.table.column(S.DOC_ID).to_pylist()

    def memory_bytes(self) -> int:
        return int(self.table.nbytes + self.keys.nbytes)


class DocLookup:
    """Texts of document ids from the partition actors (picklable: handles and sizes only).

    Also a ``Sequence[str]`` of every id (``len`` and indexing, for random draws such as
    :func:`whetstone.index.mining.mine_negatives`' random fill): index ``i`` is row ``i`` in
    partition order, fetched when asked for.
    """

    def __init__(self, partitions: list[Any], sizes: list[int], timeout_s: float = 60.0) -> None:
        self.partitions = partitions
        self.sizes = list(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _ask(self, where: np.ndarray, call) -> list[str]:
        """``call(partition, positions)`` for every partition in ``where`` (one per position), in
        parallel; the answers put back in position order."""
        import ray

        groups = {int(p): np.flatnonzero(where == p) for p in np.unique(where)}
        refs = {p: call(self.partitions[p], p, rows) for p, rows in groups.items()}
        out: list[str] = [""] * len(where)
        for p, ref in refs.items():
            for i, value in zip(groups[p], ray.get(ref, timeout=self.timeout_s), strict=True):
                out[i] = value
        return out

    def texts(self, ids: Sequence[str]) -> list[str]:
        """Texts of ``ids`` in order (one call per partition that holds some, in parallel)."""
        ids = list(ids)
        if not ids:
            return []
        return self._ask(partition_of(ids, len(self.partitions)),
                         lambda actor, _, rows: actor.texts.remote([ids[i] for i in rows]))

    def ids_at(self, indexes: Sequence[int]) -> list[str]:
        """The ids at global positions ``indexes`` (one call per partition involved)."""
        indexes = np.asarray(indexes, dtype=np.int64)
        return self._ask(np.searchsorted(self.offsets, indexes, side="right") - 1,
                         lambda actor, p, rows: actor.ids_at.remote((indexes[rows] - self.offsets[p]).tolist()))

    def sample_ids(self, n: int, rng: np.random.Generator, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """``n`` distinct random ids, none in ``exclude`` (as ``DocStore.sample_ids``).

        Raises:
            ValueError: fewer than ``n`` ids remain after excluding.
        """
        if n > len(self) - len(exclude):
            raise ValueError(f"cannot sample {n} ids: only {len(self)} documents, {len(exclude)} excluded")
        chosen: list[str] = []
        taken = set(exclude)
        while len(chosen) < n:
            for doc_id in self.ids_at(rng.integers(0, len(self), size=2 * (n - len(chosen)) + 4)):
                if doc_id not in taken:
                    taken.add(doc_id)
                    chosen.append(doc_id)
                    if len(chosen) == n:
                        break
        return chosen

    def __getitem__(self, index: int) -> str:
        import ray

        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return ray.get(self.partitions[part].ids_at.remote([int(index - self.offsets[part])]), timeout=self.timeout_s)[0]

    def __iter__(self) -> Iterator[str]:
        import ray

        for partition in self.partitions:
            yield from ray.get(partition.all_ids.remote(), timeout=self.timeout_s)

    def memory_bytes(self) -> list[int]:
        import ray

        return ray.get([p.memory_bytes.remote() for p in self.partitions])


def start_doc_lookup(store_uri: str, storage: StorageConfig | None, partitions: int, num_cpus: float = 0.1,
                     name: str | None = None) -> DocLookup:
    """Start ``partitions`` :class:`DocTextPartition` actors over ``store_uri``'s corpus (each reads
    every corpus shard once and keeps its share), wait until they hold it, return the lookup.

    ``name``: prefix of the actors' names (``{name}-{p}``), so other processes can find them.
    """
    import ray

    started = time.monotonic()
    storage = storage or StorageConfig()
    # A partition that dies (its node, say) is restarted and reloads its share; calls to it retry.
    actor = ray.remote(max_restarts=3, max_task_retries=3)(DocTextPartition)
    handles = [actor.options(num_cpus=num_cpus, name=f"{name}-{p}" if name else None).remote(
        store_uri, storage.resolved().to_wire(), p, partitions) for p in range(partitions)]
    sizes = ray.get([h.count.remote() for h in handles])
    print(f"[docs] {sum(sizes)} document texts in {partitions} lookup partition(s) (sizes {min(sizes)}-"
          f"{max(sizes)}), {time.monotonic() - started:.1f} s", flush=True)
    return DocLookup(handles, sizes)
