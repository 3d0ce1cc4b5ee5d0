"""Data and in-process work of the index-scale benchmark (``benchmarks.index_scale``).

* The synthetic corpus: unit vectors from the clustered mixture of ``benchmarks.index_service``
  (random unit centres plus per-coordinate Gaussian noise), generated batch by batch from seeds
  (batch b of every size is the same rows, so the 1M set is the first 1M rows of the 5M set) and
  written to storage through ``VectorChunkWriter``, as a refresh writes what it embedded.
  Queries are 1,000 more draws from the same mixture, held out.
* Workers that run in a process of their own (:func:`in_subprocess`), so that each one's peak
  RSS is its own (``VmHWM``, the kernel's high-water mark of its address space) and the sharded system never
  shares a machine's memory with them: the exact ground truth (the library's chunked exact
  search, the evaluation path), the in-process baseline (one unsharded index of the same kind and
  settings, the only process allowed to hold all N vectors), and the hardness probe of the
  issue's own generator.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import faiss
import numpy as np
from whetstone.eval.retrieval import RunningTopK
from whetstone.index.ann import AnnIndex
from whetstone.index.faiss_kinds import AnnConfig, train_rows, write_faiss
from whetstone.index.vector_chunks import VectorChunkWriter, iter_vector_chunks, read_vector_chunks

from benchmarks.index_service import closed_loop, draw_mixture, mixture_centres, repeated

K = 10
GIB = 1024**3
GEN_ROWS = 65536  # rows generated per seed (one writer chunk by default)
NPROBES = (8, 16, 32, 64, 128, 256, 512, 1024)


def doc_id(position: int) -> str:
    return f"d{position}"


def positions_of(ids) -> np.ndarray:
    """Document ids ("d123") back to their positions in the corpus; -1 for padding ("")."""
    return np.array([int(i[1:]) if i else -1 for i in ids], dtype=np.int64)


def centres_for(clusters: int, dim: int, seed: int) -> np.ndarray:
    return mixture_centres(clusters, dim, np.random.default_rng([seed, 0]))


def draw_batch(centres: np.ndarray, spread: float, seed: int, batch: int, rows: int) -> np.ndarray:
    """Batch ``batch`` of the corpus (``rows`` rows); its own seed, so any size is a prefix of a larger."""
    return draw_mixture(centres, spread, rows, np.random.default_rng([seed, 1, batch]))


def held_out_queries(centres: np.ndarray, spread: float, seed: int, count: int = 1000) -> np.ndarray:
    return draw_mixture(centres, spread, count, np.random.default_rng([seed, 2]))


def nlist_for_size(count: int) -> int:
    """IVF cells at N rows (per shard; the unsharded baseline gets the same): the largest power of
    two <= 2*sqrt(N): 256 at 50k, 1,024 at 1M, 4,096 at 5M (the issue's IVF4096)."""
    return 2 ** int(math.log2(2 * math.sqrt(count)))


def write_corpus(uri: str, count: int, dim: int, clusters: int, spread: float, seed: int, num_shards: int = 1) -> dict:
    """Write ``count`` vectors to ``uri`` through ``VectorChunkWriter`` partitioned for ``num_shards``
    shards, as a refresh for an index of that many shards writes them (a builder of S shards, S
    dividing ``num_shards``, then reads only its own rows); reused when the same set is there
    already. The held-out queries go to ``uri/../queries.npy``."""
    params = {"count": count, "dim": dim, "clusters": clusters, "spread": spread, "seed": seed,
              "num_shards": num_shards}
    stamp = Path(uri).parent / "params.json"
    queries_path = Path(uri).parent / "queries.npy"
    centres = centres_for(clusters, dim, seed)
    if stamp.is_file() and json.loads(stamp.read_text()) == params and queries_path.is_file():
        manifest = read_vector_chunks(uri)
        if manifest.count == count:
            return {"reused": True, "chunks": len(manifest.chunks), "bytes": sum(c.bytes for c in manifest.chunks),
                    "partitioned_for_shards": num_shards}
    stamp.unlink(missing_ok=True)
    Path(uri).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    generate_s = 0.0
    with VectorChunkWriter(uri, dim, num_shards=num_shards) as writer:
        for batch, start in enumerate(range(0, count, GEN_ROWS)):
            t0 = time.perf_counter()
            rows = draw_batch(centres, spread, seed, batch, min(GEN_ROWS, count - start))
            generate_s += time.perf_counter() - t0
            writer.write([doc_id(i) for i in range(start, start + len(rows))], rows)
    manifest = read_vector_chunks(uri)
    np.save(queries_path, held_out_queries(centres, spread, seed))
    stamp.write_text(json.dumps(params))
    total_s = time.perf_counter() - started
    size = sum(c.bytes for c in manifest.chunks)
    return {"reused": False, "chunks": len(manifest.chunks), "bytes": size, "partitioned_for_shards": num_shards,
            "generate_s": generate_s,
            "write_s": total_s - generate_s, "total_s": total_s}


# ------------------------------------------------------------------------------ subprocess workers
def in_subprocess(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh spawned process (no Ray, nothing inherited); its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def peak_rss_gib() -> float:
    """This process's peak RSS so far: ``VmHWM``, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries that over an exec, so a spawned worker would report its
    parent's RSS at the fork (the driver's, e.g. 1.3 GiB after writing a corpus) as its own."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def ground_truth(vectors_uri: str, queries: np.ndarray, k: int = 100) -> dict:
    """Exact top-k of every query by the library's chunked exact search (the evaluation path,
    ``whetstone.eval.retrieval.RunningTopK`` over ``iter_vector_chunks``; k = 100 as evaluation
    ranks), its time and this process's peak RSS. Positions are corpus rows (from the ids); scores best first."""
    started = time.perf_counter()
    top = RunningTopK(queries, k)
    for ids, vectors in iter_vector_chunks(vectors_uri):
        top.add(ids, vectors)
    seconds = time.perf_counter() - started
    scores = top.scores  # (Q, k)
    # corpus rows from the ids: chunks partitioned by shard stream the rows out of corpus order
    positions = np.array([positions_of(row) for row in top.ids[:, : K + 1]], dtype=np.int64)
    return {"positions": positions, "scores": scores[:, : K + 1].copy(),
            "seconds": seconds, "documents": top.seen, "peak_rss_gib": peak_rss_gib(),
            "gap_10_11_mean": float(np.mean(scores[:, K - 1] - scores[:, K])),
            "score1_mean": float(np.mean(scores[:, 0])), "score10_mean": float(np.mean(scores[:, K - 1]))}


def recall10(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found top-10 & exact top-10| / 10; both (Q, >=10) position arrays."""
    return float(np.mean([len(set(f[:K].tolist()) & set(e[:K].tolist())) / K for f, e in zip(found, exact, strict=True)]))


def training_sample(vectors_uri: str, rows_wanted: int, count: int, seed: int = 0) -> np.ndarray:
    """About ``rows_wanted`` rows drawn uniformly from the chunks (one pass, one chunk held at a time)."""
    rng = np.random.default_rng(seed)
    share = min(1.0, rows_wanted / max(count, 1))
    picked = [vectors[rng.random(len(vectors)) < share] for _, vectors in iter_vector_chunks(vectors_uri)]
    return np.concatenate(picked)


def serialised_bytes(index: faiss.Index) -> int:
    """Size of ``faiss.write_index`` output, counted without keeping it."""
    total = 0

    def count(block: bytes) -> int:
        nonlocal total
        total += len(block)
        return len(block)

    write_faiss(index, count)
    return total


def baseline(vectors_uri: str, config_json: dict, queries: np.ndarray, truth: np.ndarray, seconds: float,
             repeats: int, target_recall: float) -> dict:
    """The in-process baseline: one unsharded ``AnnIndex`` of ``config`` built from the chunks (IVF:
    trained on a sample read in a first pass, then chunk by chunk), searched through raw FAISS.

    For IVF kinds: recall@10 at every nprobe of ``NPROBES`` and ``chosen_nprobe``, the smallest
    reaching ``target_recall`` (the largest when none does); q/s at batch 64 at that nprobe
    (``config.nprobe`` when it is set). Flat: its top-10, for the sharded-vs-unsharded check.
    """
    config = AnnConfig.model_validate(config_json)
    count = read_vector_chunks(vectors_uri).count
    out: dict = {"config": config.model_dump(mode="json"), "count": count}
    started = time.perf_counter()
    sample = None
    if config.kind in ("ivf", "ivfpq"):
        sample = training_sample(vectors_uri, train_rows(config.nlist or 1), count)
    index = AnnIndex.create(queries.shape[1], config, train=sample, count=count)
    out["train_s"] = time.perf_counter() - started
    del sample
    order = []  # FAISS label -> corpus row (chunks partitioned by shard stream out of corpus order)
    for ids, vectors in iter_vector_chunks(vectors_uri):
        index.add(vectors, ids)
        order.append((index.idmap.labels_of(ids), positions_of(ids)))
    to_row = np.full(index.idmap.next_label, -1, np.int64)
    for labels, rows in order:
        to_row[labels] = rows
    del order
    out["build_s"] = time.perf_counter() - started
    out["add_s"] = out["build_s"] - out["train_s"]
    out["index_bytes"] = serialised_bytes(index.faiss_index)
    out["bytes_per_vector"] = out["index_bytes"] / count
    raw = index.faiss_index

    def search(q: np.ndarray, params=None):
        return raw.search(q, K, params=params) if params is not None else raw.search(q, K)

    def rows(labels: np.ndarray) -> np.ndarray:
        return np.where(labels >= 0, to_row[np.maximum(labels, 0)], -1)

    if config.kind in ("ivf", "ivfpq"):
        probes = [p for p in NPROBES if p <= faiss.extract_index_ivf(raw).nlist]  # nprobe = nlist: exhaustive
        for nprobe in probes:
            index.set_search_params(nprobe=nprobe)
            out[f"recall10_nprobe{nprobe}"] = recall10(rows(search(queries, index._search_params(K))[1]), truth)
        # the smallest nprobe reaching the target; when none does (IVF-PQ: its codes cap recall),
        # the smallest within 0.005 of the best recall, not the slowest
        best = max(out[f"recall10_nprobe{p}"] for p in probes)
        good = [p for p in probes if out[f"recall10_nprobe{p}"] >= min(target_recall, best - 0.005)]
        out["chosen_nprobe"] = config.nprobe or good[0]
        out["target_reached"] = best >= target_recall
        index.set_search_params(nprobe=out["chosen_nprobe"])
    params = index._search_params(K)
    scores, labels = search(queries, params)
    labels = rows(labels)
    out["recall10"] = recall10(labels, truth)
    if config.kind == "flat":
        out["top10_positions"], out["top10_scores"] = labels, scores
    pool = np.ascontiguousarray(np.tile(queries, (3, 1))[:2048])
    out["faiss_b64"] = best_inprocess(lambda q: search(q, params), pool, seconds, repeats)
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def best_inprocess(search, pool: np.ndarray, seconds: float, repeats: int) -> dict:
    """q/s at batch 64 through raw FAISS, the better of two ways of using every core: one caller
    whose FAISS call runs on all cores (OpenMP), or one caller thread per core, each call on one
    OpenMP thread (what the service's replicas do; on a busy machine a multi-threaded call waits
    for its descheduled threads). The better one is the baseline (the stricter ratio)."""
    cpus = os.cpu_count() or 1

    def one_thread(q: np.ndarray):
        faiss.omp_set_num_threads(1)  # per calling thread (OpenMP's thread count is per thread)
        return search(q)

    faiss.omp_set_num_threads(cpus)
    ways = {f"omp{cpus}_c1": repeated(lambda: closed_loop(search, pool, 64, seconds), repeats),
            f"omp1_c{cpus}": repeated(lambda: closed_loop(one_thread, pool, 64, seconds, cpus), repeats)}
    way = max(ways, key=lambda name: ways[name]["qps"])
    return ways[way] | {"way": way, "qps_by_way": {name: w["qps"] for name, w in ways.items()}}


def issue_set_hardness(count: int, dim: int, clusters: int, spread: float, seed: int = 0) -> dict:
    """How hard the issue's own set (2,000 clusters, spread 0.06) is at ``count`` rows, measured as
    this benchmark measures its own: IVF-Flat (``nlist_for_size``) recall@10 at nprobe 8 and the mean
    gap between the exact 10th and 11th scores, over 1,000 held-out queries."""
    centres = centres_for(clusters, dim, seed)
    docs = np.concatenate([draw_batch(centres, spread, seed, b, min(GEN_ROWS, count - s))
                           for b, s in enumerate(range(0, count, GEN_ROWS))])
    queries = held_out_queries(centres, spread, seed)
    exact_scores, exact = faiss.knn(queries, docs, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    nlist = nlist_for_size(count)
    ivf = AnnIndex.create(dim, AnnConfig(kind="ivf", nlist=nlist, nprobe=8), train=docs, count=count)
    ivf.add(docs, [doc_id(i) for i in range(count)])
    _, labels = ivf.faiss_index.search(queries, K, params=ivf._search_params(K))
    return {"count": count, "clusters": clusters, "spread": spread, "nlist": nlist,
            "recall10_nprobe8": recall10(labels, exact),
            "gap_10_11_mean": float(np.mean(exact_scores[:, K - 1] - exact_scores[:, K]))}


def shard_roundtrip(index_root: str, version: int, shard: int) -> dict:
    """Load shard ``shard`` of ``v{version}`` (streamed, every chunk's checksum verified) and write
    it again under a scratch root (streamed in chunks): the snapshot I/O of one shard, timed alone."""
    from whetstone.index.shard_io import load_shard, save_shard
    from whetstone.index.snapshot import read_manifest

    manifest = read_manifest(index_root, version)
    size = sum(f.bytes for f in manifest.shards[shard].files.values())
    started = time.perf_counter()
    index = load_shard(index_root, manifest, shard)
    load_s = time.perf_counter() - started
    scratch = Path(index_root).parent / f"{Path(index_root).name}-roundtrip"
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    save_shard(index, str(scratch), version, shard)
    write_s = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    return {"shard": shard, "bytes": size, "load_s": load_s, "write_s": write_s,
            "load_gib_per_s": size / GIB / load_s, "write_gib_per_s": size / GIB / write_s,
            "peak_rss_gib": peak_rss_gib()}


def default_run_dir(repo: Path) -> Path:
    return Path(os.environ.get("WHETSTONE_BENCH_DIR", repo / ".whetstone" / "bench" / "index_scale"))
