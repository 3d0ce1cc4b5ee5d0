"""Data plane benchmark: the Ray Data training stream against pyarrow reading the same shards.

Setup (measured too): synthetic contrastive pairs over the 5,000 msmarco-dl19-subset passages
(query = 4 to 10 words sampled from the passage, its positive; one query in five has a second,
random positive) are written as 8 JSONL shards, then ingested with :func:`whetstone.data.ingest.ingest`
(corpus + pairs) into a local store and, through a moto S3 server started here on a free loopback
port, into an S3 store.

Measured, for each store (local, S3):

* ``stream``: ``pairs_dataset -> tokenize_pairs`` (MiniLM tokenizer, query 32 / doc 128 tokens)
  ``-> iter_batches(256, local shuffle buffer 2048 seeded per epoch) -> collate_pairs``, a consumer that does nothing else. Two epochs: the
  first includes start-up, the second is the steady state a multi-epoch run sees.
* ``pyarrow``: the same shards read directly with pyarrow (``pq.read_table`` on the same
  filesystem), permuted with numpy, positives resolved and texts tokenised in this process with
  the same code (``_ResolvePairs``, ``_TokenizePairs``) and batches collated: the same work,
  without Ray.
* the ratio ``stream rows/s / pyarrow rows/s`` (goal >= 0.8).
* the training wait fraction: a real MiniLM step (forward of queries and positives, in-batch
  InfoNCE, backward, AdamW; batch 32, in this process) fed by the local-store stream; each
  ``next(batch)`` wait is timed. ``train_wait_fraction`` excludes the first batch (start-up,
  reported as ``train_first_batch_s``) (goal <= 0.05).

Usage::

    python benchmarks/data_plane.py                      # 200k pairs (~10 min on 2 loaded cores)
    python benchmarks/data_plane.py --pairs 20000 --train-steps 8   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the same single-threaded tokenizer both ways
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
MSMARCO = REPO.parent / "shared" / "data" / "retrieval" / "msmarco-dl19-subset"
RESULTS = REPO / "benchmarks" / "results" / "data_plane.json"
QUERY_LEN, DOC_LEN, BATCH = 32, 128, 256
SHUFFLE_BUFFER = 2048  # the contrastive job's default optim.shuffle_buffer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def write_pairs(folder: Path, n_pairs: int, seed: int = 0, shards: int = 8) -> Path:
    """``n_pairs`` synthetic pairs over the msmarco passages as ``shards`` JSONL files."""
    docs = [json.loads(line) for line in (MSMARCO / "corpus.jsonl").open() if line.strip()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    per_shard = -(-n_pairs // shards)
    for shard in range(shards):
        lines = []
        for i in range(shard * per_shard, min(n_pairs, (shard + 1) * per_shard)):
            doc = docs[int(rng.integers(len(docs)))]
            words = doc["text"].split()
            picked = rng.choice(len(words), size=min(len(words), int(rng.integers(4, 11))), replace=False)
            positives = [doc["_id"]]
            if rng.random() < 0.2:
                other = docs[int(rng.integers(len(docs)))]["_id"]
                positives += [other] if other != doc["_id"] else []
            lines.append(json.dumps({"query_id": f"q{i}", "query": " ".join(words[j] for j in sorted(picked)),
                                     "positive_ids": positives}))
        (folder / f"pairs-{shard:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def stream_epochs(store: str, storage, tokenizer: str, epochs: int = 2) -> list[dict]:
    from whetstone.data.stream import collate_pairs, pairs_dataset, tokenize_pairs

    ds = tokenize_pairs(pairs_dataset(store, "train", storage, seed=0, negatives_per_query=0),
                        tokenizer, QUERY_LEN, DOC_LEN)
    iterator = ds.iterator()
    out = []
    for epoch in range(epochs):
        started = time.perf_counter()
        first, rows = None, 0
        # Consumed as the training loop does: a seeded local shuffle buffer per epoch.
        for batch in iterator.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=4,
                                           local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=epoch):
            first = first if first is not None else time.perf_counter() - started
            rows += len(collate_pairs(batch)["query_id"])
        seconds = time.perf_counter() - started
        out.append({"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
                    "first_batch_s": round(first, 2)})
    return out


def pyarrow_epoch(store: str, storage, tokenizer: str) -> dict:
    """The same work as the stream, in this process: read shards, permute, resolve, tokenise, collate."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from whetstone import storage as wstorage
    from whetstone.data.collate import collate_pairs
    from whetstone.data.store import read_manifest
    from whetstone.data.stream import DocStore, _ResolvePairs, _TokenizePairs

    started = time.perf_counter()
    manifest = read_manifest(store, storage)
    location = wstorage.resolve(store, storage)
    docs = DocStore.load(store, storage)
    tables = [pq.read_table(wstorage.resolve(uri, storage).path, filesystem=location.filesystem)
              for uri in manifest.shard_uris(store, "pairs/train")]
    table = pa.concat_tables(tables)
    table = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    resolve, tokenize = _ResolvePairs(docs, 0, 0), _TokenizePairs(tokenizer, QUERY_LEN, DOC_LEN)
    rows, first = 0, None
    for offset in range(0, table.num_rows, BATCH):
        batch = tokenize(resolve(table.slice(offset, BATCH)))
        numpy_batch = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names}
        rows += len(collate_pairs(numpy_batch)["query_id"])
        first = first if first is not None else time.perf_counter() - started
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "first_batch_s": round(first, 2)}


def train_wait(store: str, model_dir: str, steps: int, batch_size: int = 32) -> dict:
    """A real MiniLM contrastive step per batch; times each wait for the next batch."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel
    from whetstone.data.stream import collate_pairs, pairs_dataset, tokenize_pairs

    model = AutoModel.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 384)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, 384)
        return F.normalize(pooled, dim=-1)

    ds = tokenize_pairs(pairs_dataset(store, "train", seed=1, negatives_per_query=0), model_dir, QUERY_LEN, DOC_LEN)
    batches = iter(ds.iterator().iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=4,
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=0))
    waits, computes = [], []
    started = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = collate_pairs(next(batches))
        waits.append(time.perf_counter() - t)
        t = time.perf_counter()
        q = embed(batch["query_input_ids"], batch["query_attention_mask"])  # (B, 384)
        d = embed(batch["positive_input_ids"], batch["positive_attention_mask"])  # (B, 384)
        loss = F.cross_entropy(q @ d.T / 0.05, torch.arange(len(q)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        computes.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    steady_wait, steady_total = sum(waits[1:]), total - waits[0]
    return {"train_first_batch_s": round(waits[0], 2), "train_steps": steps, "train_batch_size": batch_size,
            "train_step_compute_s_mean": round(float(np.mean(computes)), 3),
            "train_wait_s_max_after_first": round(max(waits[1:]), 3),
            "train_wait_fraction": round(steady_wait / steady_total, 4),
            "train_wait_fraction_incl_first_batch": round(sum(waits) / total, 4)}


def ingest_stores(raw: Path, local_store: str, s3_store: str, s3_raw: str, s3) -> dict:
    from whetstone import storage as wstorage
    from whetstone.data.ingest import ingest

    out = {}
    wstorage.upload_dir(raw, s3_raw, s3)
    for name, src, dest, storage in (("local", str(raw), local_store, None), ("s3", s3_raw, s3_store, s3)):
        ingest(f"{src}/corpus.jsonl", dest, "corpus", storage=storage, engine="local")
        for engine in ("local", "ray"):
            report = ingest(f"{src}/pairs", dest, "pairs", storage=storage, engine=engine, rows_per_shard=25_000)
            counts = report.datasets["pairs/train"]
            assert counts.rows_quarantined == 0, report.summary()
            out[f"ingest_rows_per_s_{name}_{engine}_engine"] = round(counts.rows_in / report.seconds, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args(argv)

    import ray
    import ray.data
    from whetstone.config.base import StorageConfig
    from whetstone.models.assets import minilm_path

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="whetstone-bench-data-"))
    moto, endpoint = start_moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        ray.init(address="local", num_cpus=8, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {k: os.environ[k] for k in (
                     "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_REGION", "AWS_ENDPOINT_URL")}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        tokenizer = str(minilm_path())
        raw = write_pairs(work / "raw" / "pairs", args.pairs).parent
        shutil.copy(MSMARCO / "corpus.jsonl", raw / "corpus.jsonl")
        s3 = StorageConfig()
        local_store, s3_store = str(work / "store"), "s3://bench/store"
        results: dict = {"pairs": args.pairs, "batch_size": BATCH, "query_max_length": QUERY_LEN,
                         "doc_max_length": DOC_LEN}
        results.update(ingest_stores(raw, local_store, s3_store, "s3://bench/raw", s3))
        for name, store, storage in (("local", local_store, None), ("s3", s3_store, s3)):
            epochs = stream_epochs(store, storage, tokenizer)
            direct = pyarrow_epoch(store, storage, tokenizer)
            results[f"rows_per_s_stream_{name}"] = epochs[1]["rows_per_s"]
            results[f"rows_per_s_stream_{name}_first_epoch"] = epochs[0]["rows_per_s"]
            results[f"rows_per_s_pyarrow_{name}"] = direct["rows_per_s"]
            results[f"stream_vs_pyarrow_ratio_{name}"] = round(epochs[1]["rows_per_s"] / direct["rows_per_s"], 3)
            results[f"stream_vs_pyarrow_ratio_{name}_first_epoch"] = round(
                epochs[0]["rows_per_s"] / direct["rows_per_s"], 3)
            results[f"first_batch_s_stream_{name}_epoch1"] = epochs[0]["first_batch_s"]
            results[f"first_batch_s_stream_{name}_epoch2"] = epochs[1]["first_batch_s"]
            results[f"first_batch_s_pyarrow_{name}"] = direct["first_batch_s"]
            assert epochs[0]["rows"] == epochs[1]["rows"] == direct["rows"] == args.pairs
        results.update(train_wait(local_store, tokenizer, args.train_steps))
        results["goal_stream_vs_pyarrow_ratio"] = 0.8
        results["goal_train_wait_fraction"] = 0.05
        results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                              "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        ray.shutdown()
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(f"\n{'figure':<48} {'value':>12}")
    print("-" * 61)
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key:<48} {value:>12}")
    print(f"machine: {results['machine']}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
