"""Topic-aware batches (TAS): cluster the training queries, draw each batch from one cluster.

TAS-Balanced (Hofstätter et al. 2021, arXiv 2104.06967) observed that random batches give
in-batch negatives that are trivially unrelated to the query; grouping queries by topic (k-means
over query embeddings of a baseline model) makes the other queries' positives informative
negatives at no extra cost. This module does the topic part: :func:`cluster_queries` with FAISS
k-means and :class:`TopicBatches`, a deterministic batch sampler. (The paper's "balanced" margin
sampling of the pairs inside a cluster is not done here.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import faiss
import numpy as np


def cluster_queries(
    query_vectors: np.ndarray, k: int, seed: int = 0, niter: int = 20, spherical: bool = True
) -> np.ndarray:
    """k-means topic of each query.

    Args:
        query_vectors: (N, D) query embeddings (from the base or a baseline model).
        k: number of topics, 1 <= k <= N; the paper uses 2000 clusters for 400k MS MARCO queries,
            i.e. about 200 queries per topic; aim for several batches per cluster.
        seed: FAISS k-means seed (same seed, same vectors -> same labels).
        niter: k-means iterations.
        spherical: re-normalise centroids each iteration (cosine k-means, right for unit-norm
            embeddings).

    Returns:
        (N,) int64 cluster id per query, in [0, k). Some ids may be unused (empty clusters).
    """
    vectors = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))  # (N, D)
    if vectors.ndim != 2:
        raise ValueError(f"query_vectors must be (N, D), got shape {vectors.shape}")
    count, dim = vectors.shape
    if not 1 <= k <= count:
        raise ValueError(f"k must be in [1, {count}] (the number of queries), got {k}")
    if not np.isfinite(vectors).all():
        rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))[:10].tolist()
        raise ValueError(f"query_vectors rows {rows} contain NaN or inf")
    if k == 1:
        return np.zeros(count, dtype=np.int64)
    kmeans = faiss.Kmeans(dim, k, niter=niter, seed=seed, spherical=spherical, verbose=False)
    # FAISS subsamples to max_points_per_centroid * k points; keep every point for small inputs
    kmeans.cp.max_points_per_centroid = max(256, -(-count // k))
    kmeans.train(vectors)
    _, assignment = kmeans.index.search(vectors, 1)  # (N, 1)
    return assignment[:, 0].astype(np.int64)


class TopicBatches:
    """Batches of row indices, each from a single cluster; every row once per epoch.

    Per epoch (seeded by ``(seed, epoch)``): each cluster's rows are shuffled and cut into chunks
    of ``batch_size``; the last, smaller chunk of a cluster (its leftover) stays a smaller batch of
    the same cluster, so no batch mixes topics and no row is dropped (unless ``drop_last``).
    The batch order is drawn by picking, at each position, a cluster with probability proportional
    to its rows not yet emitted, so large topics are spread over the epoch rather than bunched.

    With ``num_replicas > 1`` the batches are global batches: iterating yields this ``rank``'s
    strided slice ``batch[rank::num_replicas]``, so the gathered global batch is one topic. A
    leftover smaller than ``num_replicas`` is merged into its cluster's previous batch so that
    every rank gets at least one row (a whole cluster smaller than ``num_replicas`` can still leave
    a rank an empty slice; the loop must skip or ``drop_last`` it).

    Args:
        labels: (N,) int cluster id per row (from :func:`cluster_queries`).
        batch_size: global batch size >= 1.
        seed: sampler seed; the same on every worker.
        drop_last: drop each cluster's partial leftover batch.
        num_replicas, rank: data-parallel world size and this worker's rank.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.labels = labels.astype(np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration draws (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def _cluster_chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        """Cut one cluster's shuffled rows into batches, handling its leftover."""
        chunks = [rows[start:start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
        if len(chunks[-1]) < self.batch_size:
            if self.drop_last:
                chunks.pop()
            elif len(chunks) > 1 and len(chunks[-1]) < self.num_replicas:
                leftover = chunks.pop()
                chunks[-1] = np.concatenate([chunks[-1], leftover])
        return chunks

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All global batches of an epoch, in order; each an int64 array of row indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([int(self.seed), epoch])
        queues: list[list[np.ndarray]] = []
        for cluster in np.unique(self.labels):  # sorted, so the draw order is reproducible
            rows = rng.permutation(np.flatnonzero(self.labels == cluster))
            chunks = self._cluster_chunks(rows)
            if chunks:
                queues.append(chunks[::-1])  # reversed: pop() takes the next chunk
        remaining = np.array([sum(len(chunk) for chunk in queue) for queue in queues], dtype=np.float64)
        batches: list[np.ndarray] = []
        while remaining.sum() > 0:
            cluster = int(rng.choice(len(queues), p=remaining / remaining.sum()))
            chunk = queues[cluster].pop()
            remaining[cluster] -= len(chunk)
            batches.append(chunk.astype(np.int64))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank::self.num_replicas].tolist()

    def __len__(self) -> int:
        _, sizes = np.unique(self.labels, return_counts=True)
        total = 0
        for size in sizes.tolist():
            full, leftover = divmod(size, self.batch_size)
            merged = full > 0 and leftover < self.num_replicas  # see _cluster_chunks
            total += full + int(leftover > 0 and not self.drop_last and not merged)
        return total


class TopicRegrouper:
    """Regroup a stream of row batches so that each batch holds rows of one topic (the job's TAS).

    The job cannot fix batch composition upstream (Ray Data splits, shuffles and re-blocks rows
    on its own terms), so each worker regroups what its shard yields: rows go to a bucket per
    topic, and a bucket that reaches ``batch_size`` rows is emitted as a batch. At the end of the
    stream the leftovers (fewer than ``batch_size`` per topic) are emitted as mixed full batches;
    only the last partial batch, fewer than ``batch_size`` rows, is not emitted, exactly the rows
    a ``drop_last`` iterator would drop. So a worker yields ``floor(rows / batch_size)`` batches
    either way and the steps per epoch do not change.

    Buffered rows are at most ``(batch_size - 1) x topics``: choose topics so that each has many
    batches' worth of rows.

    Args:
        batches: numpy row batches (Ray Data ``iter_batches(batch_format="numpy")``), each with
            ``column`` holding an integer topic per row.
        batch_size: rows per emitted batch.

    Attributes:
        pure_batches, mixed_batches: how many emitted batches were one topic / the end's mix.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], batch_size: int, column: str = "topic") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batches = batches
        self.batch_size = batch_size
        self.column = column
        self.pure_batches = 0
        self.mixed_batches = 0

    @property
    def pure_share(self) -> float:
        emitted = self.pure_batches + self.mixed_batches
        return self.pure_batches / emitted if emitted else 0.0

    @staticmethod
    def _stack(rows: list[dict], columns: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in columns:
            values = [row[name] for row in rows]
            if all(np.isscalar(v) for v in values):
                out[name] = np.asarray(values)
            else:  # list columns: an object array of per-row arrays, as Ray Data hands ragged lists
                column = np.empty(len(values), dtype=object)
                column[:] = [np.asarray(v) for v in values]
                out[name] = column
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        buckets: dict[int, list[dict]] = {}
        columns: list[str] | None = None
        for batch in self.batches:
            if self.column not in batch:
                raise KeyError(f"topic batches need a {self.column!r} column; the batch has {sorted(batch)}")
            columns = columns or list(batch)
            for i in range(len(batch[self.column])):
                row = {name: batch[name][i] for name in columns}
                bucket = buckets.setdefault(int(row[self.column]), [])
                bucket.append(row)
                if len(bucket) == self.batch_size:
                    self.pure_batches += 1
                    yield self._stack(bucket, columns)
                    bucket.clear()
        leftovers = [row for topic in sorted(buckets) for row in buckets[topic]]
        for start in range(0, len(leftovers) - self.batch_size + 1, self.batch_size):
            self.mixed_batches += 1
            yield self._stack(leftovers[start:start + self.batch_size], columns)
