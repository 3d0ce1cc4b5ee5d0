"""Streaming a store into training: Ray Data from the shards to padded torch batches.

The pipeline for contrastive pairs::

    pairs_dataset(store, "train", seed=s)      read pairs shards, shuffle per epoch, resolve
                                               the positive (and negatives) to text by id
    tokenize_pairs(ds, tokenizer, Lq, Ld)      map_batches actors: token ids, unpadded
    ... ray.train.get_dataset_shard("train").iter_batches(batch_size=B, batch_format="numpy")
    collate_pairs(batch)                       pad to the longest sequence in the batch

Pair files hold ids only; texts come from a :class:`DocStore` that the driver puts in the object
store once and the resolving actors read zero-copy, so negatives mined later are passed as ids and
never materialised into the pair files.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import whetstone.storage as wstorage
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S
from whetstone.data.collate import collate_pairs, pad_sequences
from whetstone.data.pair_shards import explode_positives, streamed_pairs, with_topics
from whetstone.data.process_cache import cached
from whetstone.data.store import read_dataset_table, read_manifest, read_shard

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)


class DocStore:
    """Document id -> text lookup, kept small: Arrow columns plus a dict from id to row.

    Args:
        table: a corpus table with ``doc_id``, ``title`` and ``text`` columns.
    """

    def __init__(self, table: pa.Table) -> None:
        self._table = table.select([S.DOC_ID, S.TITLE, S.TEXT]).combine_chunks()
        self._ids: list[str] = self._table.column(S.DOC_ID).to_pylist()
        self._row = {doc_id: i for i, doc_id in enumerate(self._ids)}
        if len(self._row) != len(self._ids):
            raise ValueError("corpus table has duplicate doc_id values")

    @classmethod
    def load(cls, store_uri: str, storage: StorageConfig | None = None) -> DocStore:
        """Load the ``corpus`` dataset of a store."""
        return cls(read_dataset_table(store_uri, "corpus", storage, columns=[S.DOC_ID, S.TITLE, S.TEXT]))

    @property
    def table(self) -> pa.Table:
        return self._table

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row

    def __getitem__(self, index: int) -> str:
        """The id at row ``index`` (a DocStore is also the sequence of its ids)."""
        return self._ids[index]

    def __iter__(self):
        return iter(self._ids)

    def rows(self, ids: Sequence[str]) -> list[int]:
        """Row numbers of ``ids``; raises ``KeyError`` naming the first unknown id."""
        try:
            return [self._row[doc_id] for doc_id in ids]
        except KeyError as err:
            raise KeyError(f"document id {err.args[0]!r} is not in the corpus") from None

    def texts(self, ids: Sequence[str]) -> list[str]:
        """:func:`~whetstone.data.schemas.document_text` of each id, in order."""
        if not ids:
            return []
        taken = self._table.take(pa.array(self.rows(ids), type=pa.int64()))
        titles = taken.column(S.TITLE).to_pylist()
        texts = taken.column(S.TEXT).to_pylist()
        return [S.document_text(title, text) for title, text in zip(titles, texts, strict=True)]

    def sample_ids(self, n: int, rng: np.random.Generator, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """``n`` distinct random ids, none in ``exclude`` (e.g. the query's labelled positives).

        Raises:
            ValueError: fewer than ``n`` ids remain after excluding.
        """
        excluded_rows = {self._row[i] for i in exclude if i in self._row}
        available = len(self._ids) - len(excluded_rows)
        if n > available:
            raise ValueError(f"cannot sample {n} ids: only {available} remain after excluding {len(exclude)}")
        chosen: list[int] = []
        taken: set[int] = set(excluded_rows)
        # Rejection sampling is cheap while exclude is small relative to the corpus (the usual case).
        while len(chosen) < n:
            for row in rng.integers(0, len(self._ids), size=2 * (n - len(chosen)) + 4).tolist():
                if row not in taken:
                    taken.add(row)
                    chosen.append(row)
                    if len(chosen) == n:
                        break
        return [self._ids[row] for row in chosen]


def _shard_tables(store_uri: str, name: str, storage: StorageConfig | None) -> list[pa.Table]:
    """Every shard of ``name``, read once and checked against the manifest (sha256, rows)."""
    manifest = read_manifest(store_uri, storage)
    return [read_shard(wstorage.join(store_uri, shard.path), shard, storage)
            for shard in manifest.dataset(name, store_uri).shards]


def _in_memory_dataset(tables: list[pa.Table], seed: int | None = None) -> ray.data.Dataset:
    """The shards' rows, permuted once, as object-store blocks whose order changes every epoch.

    Pair and preference tables are small next to the corpus (ids and short texts), so the driver
    reads them once (a ``read_parquet`` would re-list and re-read storage in fresh tasks every
    epoch) and permutes the rows with ``seed``. Each execution (epoch) then visits the blocks in
    a new order (``randomize_block_order`` with ``RandomSeedConfig(seed, reseed_after_execution=True)``,
    so the sequence of orders repeats for a seed); the consumer's seeded local shuffle buffer
    (``iter_batches(local_shuffle_buffer_size=..., local_shuffle_seed=seed + epoch)``) mixes rows
    across blocks, so batches differ between epochs. No all-to-all shuffle runs before the first
    batch: that barrier cost more than the whole steady-state epoch in the data-plane benchmark.
    """
    import numpy as np
    import ray.data
    from ray.data import RandomSeedConfig

    tables = [t for t in tables if t.num_rows] or tables[:1]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        return ray.data.from_arrow(table)
    table = table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))
    # Blocks of at most a few hundred rows: the first batch waits for one resolve batch, and block
    # order varies both the stream and the resolve step's grouping between epochs.
    block_rows = max(MIN_BLOCK_ROWS, -(-table.num_rows // MAX_BLOCKS))
    ds = ray.data.from_arrow([table.slice(offset, block_rows) for offset in range(0, table.num_rows, block_rows)])
    # The seeded order is only repeatable if blocks arrive in order; later operators copy this
    # dataset's context, so the setting carries through tokenize_pairs.
    ds.context.execution_options.preserve_order = True
    seed_config = RandomSeedConfig(seed=seed, reseed_after_execution=True) if seed is not None else None
    return ds.randomize_block_order(seed=seed_config)


# Small blocks (many per resolve batch): the resolve step then groups different rows each epoch, so
# its seeded choices (which positive of a multi-positive query, random negatives) vary by epoch.
MIN_BLOCK_ROWS, MAX_BLOCKS, RESOLVE_BATCH = 8, 1024, 1024
# The tokenised pairs' blocks: a map task hands a block on once it holds this many bytes (Ray
# Data's default, 128 MiB, is ~380k short pairs: at 1M pairs the first batch waited 122 s for the
# first block, and every training worker held blocks that size). 4 MiB: about 12k short pairs.
PAIR_BLOCK_BYTES = 4 * 2**20

def _docstore_from_ref(corpus_ref: Any) -> DocStore:
    import ray

    return DocStore(corpus_ref if isinstance(corpus_ref, pa.Table) else ray.get(corpus_ref))


class _ResolvePairs:
    """Pick one positive per query and resolve ids to document text (run by :func:`_resolve_batch`).

    The positive is drawn with a generator seeded by ``(seed, the batch's query ids in order)``:
    the per-epoch block order changes which queries share a batch and in which order, so the
    choice varies between epochs yet a run with the same seed repeats it.
    """

    def __init__(self, docs: DocStore, seed: int | None, negatives_per_query: int | None) -> None:
        self.docs = docs
        self.seed = seed
        self.negatives_per_query = negatives_per_query

    def _rng(self, query_ids: list[str]) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, zlib.crc32("\x1f".join(query_ids).encode("utf-8"))])

    def __call__(self, batch: pa.Table) -> pa.Table:
        query_ids = batch.column(S.QUERY_ID).to_pylist()
        positive_lists = batch.column(S.POSITIVE_IDS).to_pylist()
        rng = self._rng(query_ids)
        if S.POSITIVE_ID in batch.column_names:  # rows already one per (query, positive)
            positive_ids = batch.column(S.POSITIVE_ID).to_pylist()
        else:
            positive_ids = [ids[int(rng.integers(len(ids)))] for ids in positive_lists]
        out = {
            S.QUERY_ID: batch.column(S.QUERY_ID),
            S.QUERY: batch.column(S.QUERY),
            S.POSITIVE_IDS: batch.column(S.POSITIVE_IDS),
            S.POSITIVE_ID: pa.array(positive_ids, pa.string()),
            S.POSITIVE_TEXT: pa.array(self.docs.texts(positive_ids), pa.string()),
        }
        if S.TOPIC in batch.column_names:
            out[S.TOPIC] = batch.column(S.TOPIC)
        if self.negatives_per_query != 0:
            negative_ids = self._negatives(batch.column(S.NEGATIVE_IDS).to_pylist(), positive_lists, rng)
            out[S.NEGATIVE_IDS] = pa.array(negative_ids, pa.list_(pa.string()))
            out[S.NEGATIVE_TEXTS] = pa.array([self.docs.texts(ids) for ids in negative_ids],
                                             pa.list_(pa.string()))
        return pa.table(out)

    def _negatives(self, static: list[list[str]], positives: list[list[str]],
                   rng: np.random.Generator) -> list[list[str]]:
        """All static negatives (``None``), or exactly ``k`` per query: static first, then random docs."""
        k = self.negatives_per_query
        if k is None:
            return static
        chosen = []
        for negatives, positive_ids in zip(static, positives, strict=True):
            negatives = [n for n in negatives if n not in set(positive_ids)]
            if len(negatives) >= k:
                picked = [negatives[i] for i in rng.choice(len(negatives), size=k, replace=False)]
            else:
                picked = negatives + self.docs.sample_ids(k - len(negatives), rng, set(positive_ids) | set(negatives))
            chosen.append(picked)
        return chosen


def count_training_rows(store_uri: str, split: str, storage: StorageConfig | None = None,
                        positives: str = "sample") -> int:
    """Rows one epoch of :func:`pairs_dataset` yields: queries (from the manifest, nothing read), or
    (query, positive) pairs for ``all`` (the ``positive_ids`` column read shard by shard)."""
    manifest = read_manifest(store_uri, storage)
    shards = manifest.dataset(f"pairs/{split}", store_uri).shards
    if positives != "all":
        return sum(shard.rows for shard in shards)
    total = 0
    for shard in shards:
        where = wstorage.resolve(wstorage.join(store_uri, shard.path), storage)
        column = pq.read_table(where.path, filesystem=where.filesystem, columns=[S.POSITIVE_IDS]).column(S.POSITIVE_IDS)
        total += int(pc.sum(pc.list_value_length(column)).as_py() or 0)
    return total


def pairs_dataset(store_uri: str, split: str, storage: StorageConfig | None = None, seed: int | None = None,
                  negatives_per_query: int | None = 0, num_cpus: float = 0.25,
                  concurrency: int | None = 2, positives: str = "sample",
                  topics: dict[str, int] | None = None, pairs_store_uri: str | None = None,
                  docs: Any = None) -> ray.data.Dataset:
    """Contrastive pairs of ``split`` as a Ray Dataset, streamed from storage and shuffled per epoch,
    texts resolved by id.

    Shuffling (see :func:`streamed_pairs`): shard order re-drawn every execution (epoch) with
    ``seed``, rows permuted within groups of shards that change per epoch; consumers add a seeded
    local shuffle buffer per epoch. Texts are attached after the shuffle. The pair shards are read
    by Ray Data tasks (sha256-checked), never whole on the driver.

    Args:
        store_uri: the store root (local or ``s3://``).
        split: e.g. ``"train"`` (reads ``pairs/<split>``).
        storage: how to reach ``s3://``.
        seed: shuffle and positive-choice seed; ``None`` is non-deterministic.
        negatives_per_query: ``0`` (default): no negatives; ``None``: the static negatives as
            stored (the pair files' ``negative_ids``, however many each row has); ``k``: exactly ``k`` per query, the static ones first, topped up
            with random corpus documents that are not labelled positives.
        num_cpus: CPUs per resolving task.
        concurrency: most resolving tasks at once. With :func:`tokenize_pairs`' defaults (same
            CPUs, concurrency and batch size) Ray Data fuses resolve and tokenize into one task
            per batch: one object-store hop and one worker process pool instead of two.
        positives: ``"sample"``: one row per query, its positive drawn per epoch; ``"all"``: one
            row per (query, positive) (:func:`explode_positives`), for the decoupled softmax.
        topics: query id -> topic (topic-aware batches); adds a ``topic`` column. A query
            missing from it is an error naming the query.
        pairs_store_uri: read ``pairs/<split>`` from this store instead (e.g. pairs with mined
            static negatives, ``whetstone.train.static_negatives``); texts still come from
            ``store_uri``'s corpus.
        docs: a :class:`whetstone.data.doc_lookup.DocLookup` to resolve texts with; None: the
            corpus is loaded on the driver, put in the object store and cached by each resolving
            process (fine for small corpora, grows with it).

    Returns:
        Rows with ``query_id``, ``query``, ``positive_ids`` (all labelled positives, for masking),
        ``positive_id``, ``positive_text`` and, when negatives are on, ``negative_ids`` and
        ``negative_texts`` (lists).
    """
    import ray
    import ray.data

    name = f"pairs/{split}"
    if positives not in ("sample", "all"):
        raise ValueError(f"positives must be 'sample' or 'all', got {positives!r}")
    corpus_ref = ray.put(DocStore.load(store_uri, storage).table) if docs is None else None
    ds = streamed_pairs(pairs_store_uri or store_uri, name, storage, seed, positives, topics)
    # Tasks, not actors (see whetstone.data.process_cache): no per-epoch actor start-up before the first batch.
    return ds.map_batches(
        _resolve_batch,
        fn_kwargs={"corpus_ref": corpus_ref, "corpus_key": corpus_ref.hex() if corpus_ref else None, "seed": seed,
                   "negatives_per_query": negatives_per_query, "docs": docs},
        batch_format="pyarrow",
        batch_size=RESOLVE_BATCH,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )


def _resolve_batch(batch: pa.Table, corpus_ref: Any, corpus_key: str | None, seed: int | None,
                   negatives_per_query: int | None, docs: Any = None) -> pa.Table:
    """``map_batches`` task: :class:`_ResolvePairs` over the lookup, or a DocStore cached per process."""
    if docs is None:
        docs = cached(f"docs:{corpus_key}", lambda: _docstore_from_ref(corpus_ref))
    return _ResolvePairs(docs, seed, negatives_per_query)(batch)


class _TokenizePairs:
    """Tokenize a batch of pairs (run by :func:`_tokenize_batch`); token ids are left unpadded."""

    def __init__(self, tokenizer_path: str, query_max_length: int, doc_max_length: int) -> None:
        from transformers import AutoTokenizer

        from whetstone.models.assets import localize
        from whetstone.models.encoder import tower_folder

        # A model in object storage is fetched to a node-local folder once; an asymmetric model's
        # towers share the document tower's tokenizer.
        self.tokenizer = AutoTokenizer.from_pretrained(str(tower_folder(localize(tokenizer_path), "document")))
        self.query_max_length = query_max_length
        self.doc_max_length = doc_max_length

    def _encode(self, texts: list[str], max_length: int) -> pa.Array:
        if not texts:  # an empty block (a shard group with no rows) passes through
            return pa.array([], pa.list_(pa.int32()))
        ids = self.tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        return pa.array(ids, pa.list_(pa.int32()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = batch
        out = out.append_column(S.QUERY_INPUT_IDS,
                                self._encode(batch.column(S.QUERY).to_pylist(), self.query_max_length))
        out = out.append_column(S.POSITIVE_INPUT_IDS,
                                self._encode(batch.column(S.POSITIVE_TEXT).to_pylist(), self.doc_max_length))
        if S.NEGATIVE_TEXTS in batch.column_names:
            lists = batch.column(S.NEGATIVE_TEXTS).to_pylist()
            flat = self._encode([t for texts in lists for t in texts], self.doc_max_length)
            offsets = np.cumsum([0] + [len(texts) for texts in lists], dtype=np.int32)
            out = out.append_column(S.NEGATIVE_INPUT_IDS, pa.ListArray.from_arrays(pa.array(offsets), flat))
        return out


def _tokenize_batch(batch: pa.Table, tokenizer_path: str, query_max_length: int,
                    doc_max_length: int) -> pa.Table:
    """``map_batches`` task: :class:`_TokenizePairs` with the tokenizer cached per worker process."""
    key = f"tokenize:{tokenizer_path}:{query_max_length}:{doc_max_length}"
    return cached(key, lambda: _TokenizePairs(tokenizer_path, query_max_length, doc_max_length))(batch)


def tokenize_pairs(ds: ray.data.Dataset, tokenizer_path: str, query_max_length: int, doc_max_length: int,
                   num_cpus: float = 0.25, concurrency: int | None = 2,
                   batch_size: int | None = None) -> ray.data.Dataset:
    """Add ``query_input_ids``, ``positive_input_ids`` (and ``negative_input_ids``) token id lists.

    Tokenization runs in Ray Data tasks, overlapped with training; each worker process loads the
    tokenizer once and keeps it across epochs. Sequences are truncated to the max lengths
    (special tokens included) but not padded: :func:`collate_pairs` pads per batch.
    ``negative_input_ids`` is a list of sequences per row.

    Args:
        concurrency: most tokenizing tasks at once (``None``: as many as the CPUs allow).
        batch_size: rows per task; ``None`` matches :func:`pairs_dataset`'s resolve batches so the
            two steps fuse into one task.
    """
    import ray.data

    tokens = ds.map_batches(
        _tokenize_batch,
        fn_kwargs={"tokenizer_path": str(tokenizer_path), "query_max_length": query_max_length,
                   "doc_max_length": doc_max_length},
        batch_format="pyarrow",
        batch_size=batch_size or RESOLVE_BATCH,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
    tokens.context.target_max_block_size = PAIR_BLOCK_BYTES  # see PAIR_BLOCK_BYTES; the dataset's own context
    return tokens


def preference_dataset(store_uri: str, split_or_name: str, storage: StorageConfig | None = None,
                       seed: int | None = None) -> ray.data.Dataset:
    """Preference triples of a store as a Ray Dataset, shuffled per epoch like :func:`pairs_dataset`.

    Args:
        store_uri: the store root (local or ``s3://``).
        split_or_name: a split (``"train"`` reads ``preference/train``) or a dataset name
            (``"preference/test"``).
        storage: how to reach ``s3://``.
        seed: shuffle seed; each execution (epoch) gets a new order, the sequence of orders repeats
            for the same seed. ``None`` is non-deterministic.

    Returns:
        Rows with ``pair_id``, ``prompt``, ``chosen``, ``rejected`` (strings) and ``time``
        (timestamp, may be null), read from shards checked against the manifest's schema.
    """
    name = split_or_name if split_or_name.startswith("preference/") else f"preference/{split_or_name}"
    return _in_memory_dataset(_shard_tables(store_uri, name, storage), seed)


@dataclass(frozen=True)
class EvalSplit:
    """A retrieval evaluation split: the queries that have judgments, and the judgments.

    Attributes:
        queries: query id -> query text, only for queries with qrels in this split.
        qrels: query id -> {doc id: graded relevance} (zeros kept: judged non-relevant).
    """

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_eval_split(store_uri: str, split: str, storage: StorageConfig | None = None) -> EvalSplit:
    """Load ``qrels/<split>`` and the texts of the queries it judges."""
    qrels_table = read_dataset_table(store_uri, f"qrels/{split}", storage)
    qrels: dict[str, dict[str, int]] = {}
    for query_id, doc_id, score in zip(qrels_table.column(S.QUERY_ID).to_pylist(),
                                       qrels_table.column(S.DOC_ID).to_pylist(),
                                       qrels_table.column(S.SCORE).to_pylist(), strict=True):
        qrels.setdefault(query_id, {})[doc_id] = score
    queries_table = read_dataset_table(store_uri, "queries", storage)
    texts = dict(zip(queries_table.column(S.QUERY_ID).to_pylist(), queries_table.column(S.TEXT).to_pylist(), strict=True))
    missing = [q for q in qrels if q not in texts]
    if missing:
        raise KeyError(f"qrels/{split} in {store_uri} names queries missing from queries: {missing[:5]}")
    return EvalSplit(queries={q: texts[q] for q in qrels}, qrels=qrels)


__all__ = [
    "DocStore",
    "explode_positives",
    "with_topics",
    "EvalSplit",
    "collate_pairs",
    "load_eval_split",
    "pad_sequences",
    "pairs_dataset",
    "preference_dataset",
    "read_dataset_table",
    "streamed_pairs",
    "tokenize_pairs",
]
