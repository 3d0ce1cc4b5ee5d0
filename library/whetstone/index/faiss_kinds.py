"""The index kinds: their knobs (:class:`AnnConfig`), the FAISS objects they build, GPU placement.

Kinds: ``flat`` (exact inner product), ``hnsw`` (graph, Malkov & Yashunin 2016), ``ivf``
(inverted lists over k-means cells) and ``ivfpq`` (IVF with product quantisation, Jégou et al.
2011). With ``normalize=True`` (the default) vectors and queries are L2-normalised, so inner
product is cosine similarity. :class:`whetstone.index.ann.AnnIndex` wraps these with string ids.

Also here: FAISS (de)serialisation through callbacks (:func:`write_faiss`, :func:`read_faiss`),
so a snapshot streams through fixed-size chunks instead of one serialised blob.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import Field

from whetstone.config.base import StrictModel

# k-means needs ~39 points per cell (fewer: poor cells and a FAISS warning); more than 64 per
# cell buys little (FAISS itself samples down to 256), so IVF trains on at most this many.
MIN_TRAIN_PER_CELL = 39
TRAIN_PER_CELL = 64
# ... and on at most this many bytes of rows, unless that leaves fewer than 39 per cell: a shard
# builder holds the sample beside its index (5M x 384 in one shard: 349k rows, not 572k).
TRAIN_SAMPLE_MAX_BYTES = 512 * 2**20
# Block size FAISS hands to / asks from the callbacks (bounds each Python bytes object).
CALLBACK_BLOCK_BYTES = 1 << 20


class AnnInputError(ValueError):
    """Vectors, ids or search arguments are invalid; the message names the argument at fault."""


class AnnConfig(StrictModel):
    """Which FAISS index to build and how to search it.

    Typical values: ``hnsw_m`` 16-64 (graph degree; memory grows with it), ``ef_construction``
    100-400, ``ef_search`` 64-256 (recall vs speed at query time); ``nlist`` about 4*sqrt(N)
    cells, ``nprobe`` 8-64 cells visited per query; ``pq_m`` sub-quantisers (must divide the
    dimension; D/8 keeps 8 dims per code byte). In a sharded index ``nlist`` is per shard
    (S shards hold S x nlist cells) and ``None`` picks it from each shard's own row count.
    """

    kind: Literal["flat", "hnsw", "ivf", "ivfpq"] = Field(
        "flat", description="FAISS index: flat (exact), hnsw (graph), ivf (k-means cells), ivfpq (IVF with "
        "PQ codes); only flat and hnsw keep full vectors")
    hnsw_m: int = Field(32, ge=4, le=256, description="hnsw: graph degree, neighbours per node (recall and "
                        "memory grow with it; typical 16-64)")
    ef_construction: int = Field(200, ge=8, description="hnsw: candidate list size while building (graph "
                                 "quality vs build time; typical 100-400)")
    ef_search: int = Field(128, ge=1, description="hnsw: candidate list size per query, at least the hits "
                           "fetched (recall vs speed; typical 64-256)")
    nlist: int | None = Field(None, ge=1, description="IVF cells (per shard); None = about 4*sqrt(N)")
    nprobe: int | None = Field(None, ge=1, description="IVF cells visited; None = max(8, nlist/16)")
    pq_m: int | None = Field(None, ge=1, description="PQ sub-quantisers; None = D/8 (or a divisor of D)")
    pq_nbits: int = Field(8, ge=4, le=12, description="ivfpq: bits per sub-quantiser code (2**nbits "
                          "centroids; training needs that many vectors)")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: FAISS's GPU index when a GPU is "
                                            "visible; true: require one; false: CPU (HNSW stays on CPU)")
    normalize: bool = Field(True, description="L2-normalise vectors and queries, so inner product is cosine "
                            "similarity")


def auto_nlist(count: int) -> int:
    """About 4*sqrt(N) cells, but never fewer than 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(max(count, 1))), count // MIN_TRAIN_PER_CELL))


def nlist_for(config: AnnConfig, count: int) -> int:
    """The cells an IVF index over ``count`` rows gets: ``config.nlist`` or :func:`auto_nlist`."""
    return config.nlist or auto_nlist(count)


def auto_pq_m(dim: int) -> int:
    for m in range(max(dim // 8, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def on_gpu(config: AnnConfig) -> bool:
    """Whether this config's index lives on the GPU (FAISS has no GPU HNSW: that stays on CPU)."""
    if config.use_gpu is False or (config.use_gpu == "auto" and not gpu_available()):
        return False
    if not gpu_available():
        raise AnnInputError("use_gpu: true, but FAISS has no GPU support here "
                            "(install faiss-gpu, the `gpu` extra, on a CUDA machine)")
    return config.kind != "hnsw"


def maybe_to_gpu(index: faiss.Index, config: AnnConfig) -> faiss.Index:
    """``index`` moved to GPU 0 when the config asks for (or ``auto`` finds) a GPU, else itself."""
    if not on_gpu(config):
        return index
    # StandardGpuResources must outlive the index; the Python wrapper keeps a reference.
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def check_vectors(vectors: Any, dim: int | None, name: str) -> np.ndarray:
    """Validate a (N, D) array and return it as contiguous float32 (a copy, safe to normalise)."""
    try:
        array = np.array(vectors, dtype=np.float32, copy=True)
    except (TypeError, ValueError) as err:
        raise AnnInputError(f"{name}: not a numeric (N, D) array ({err})") from None
    if array.ndim != 2:
        raise AnnInputError(f"{name}: expected shape (N, D), got {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise AnnInputError(f"{name}: dimension {array.shape[1]} does not match the index dimension {dim}")
    bad = ~np.isfinite(array)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise AnnInputError(f"{name}[{row}][{col}] is {array[row, col]} (NaN or infinite values are refused)")
    return np.ascontiguousarray(array)


def train_rows(nlist: int, dim: int | None = None) -> int:
    """How many rows IVF trains on at most: 64 per cell, capped at 512 MiB of float32 rows of
    dimension ``dim`` (``TRAIN_SAMPLE_MAX_BYTES``; no cap without ``dim``) but never below 39 per cell."""
    if dim is None:
        return TRAIN_PER_CELL * nlist
    return min(TRAIN_PER_CELL * nlist, max(MIN_TRAIN_PER_CELL * nlist, TRAIN_SAMPLE_MAX_BYTES // (4 * dim)))


def make_faiss(
    dim: int, config: AnnConfig, train: np.ndarray | None = None, count: int | None = None, *,
    overwrite_train: bool = False,
) -> faiss.Index:
    """An empty FAISS index of ``config.kind`` (IVF kinds trained on ``train``), on CPU.

    Args:
        train: (T, D) float32 training rows for IVF kinds (ignored otherwise); more than
            ``64 * nlist`` are sampled down with a seeded rng. Normalised (a copy) when ``normalize``.
        count: the rows the index will hold, for the automatic ``nlist`` (default: T).
        overwrite_train: normalise ``train`` in place instead of a copy (a builder's own sample).
    """
    ip = faiss.METRIC_INNER_PRODUCT
    if config.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.ef_construction
        return index
    train = np.zeros((0, dim), np.float32) if train is None else train
    available = train.shape[0]
    nlist = nlist_for(config, available if count is None else count)
    if available < nlist:
        raise AnnInputError(f"vectors: {config.kind} with nlist={nlist} needs at least {nlist} "
                            f"training vectors, got {available}")
    quantizer = faiss.IndexFlatIP(dim)
    if config.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    else:
        pq_m = config.pq_m or auto_pq_m(dim)
        if dim % pq_m:
            raise AnnInputError(f"pq_m: {pq_m} does not divide the dimension {dim}")
        if available < 2**config.pq_nbits:
            raise AnnInputError(f"vectors: ivfpq with pq_nbits={config.pq_nbits} needs at least "
                                f"{2**config.pq_nbits} training vectors, got {available}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, config.pq_nbits, ip)
    # k-means cost grows with the training set: train on a seeded sample.
    limit = train_rows(nlist, dim)
    if available > limit:
        rows = np.ascontiguousarray(train[np.random.default_rng(0).choice(available, limit, replace=False)],
                                    dtype=np.float32)
    else:
        rows = np.ascontiguousarray(train, dtype=np.float32) if overwrite_train else \
            np.array(train, dtype=np.float32, copy=True)
    if config.normalize:
        faiss.normalize_L2(rows)
    index.train(rows)
    return index


def write_faiss(index: faiss.Index, sink: Callable[[bytes], Any]) -> None:
    """Serialise a CPU ``index`` into ``sink`` in blocks of at most 1 MiB (never one whole blob)."""
    writer = faiss.PyCallbackIOWriter(sink, CALLBACK_BLOCK_BYTES)
    faiss.write_index(index, writer)
    del writer  # flushes


def read_faiss(source: Callable[[int], bytes]) -> faiss.Index:
    """Deserialise an index from ``source(n) -> up to n bytes`` (b"" at the end)."""
    reader = faiss.PyCallbackIOReader(source, CALLBACK_BLOCK_BYTES)
    return faiss.read_index(reader)
