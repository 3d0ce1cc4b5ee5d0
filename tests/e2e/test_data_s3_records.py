"""Record-format ingest and the training stream through moto's S3 server equal a local folder's.

The source (corpus shards in JSONL.gz and Parquet with defects, a pairs file with static
negatives) is uploaded to a real S3-protocol server on loopback; it is ingested from S3 into an S3
store by the Ray Data engine, and from the local folder into a local store in process. The two
stores must agree shard for shard (row counts and sha256), quarantine for quarantine, and the
training stream must yield the same batches for the same seed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from whetstone import storage as wstorage
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S
from whetstone.data.ingest import ingest
from whetstone.data.store import read_manifest
from whetstone.data.stream import pairs_dataset, tokenize_pairs

pytestmark = pytest.mark.e2e


def _source(root: Path, msmarco: Path) -> None:
    docs = [json.loads(line) for line in (msmarco / "corpus.jsonl").open() if line.strip()][:300]
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    lines = [json.dumps(d) for d in docs[:150]] + [json.dumps({"_id": docs[0]["_id"], "text": "dup"}),
                                                     json.dumps({"_id": "x1", "text": None})]
    (corpus / "part-0.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    table = pa.Table.from_pylist([{"_id": d["_id"], "title": d.get("title", ""), "text": d["text"]}
                                  for d in docs[150:]] + [{"_id": "x2", "title": "", "text": " "}])
    pq.write_table(table, corpus / "part-1.parquet")
    (corpus / "part-2.parquet").write_bytes(b"PAR1 broken")
    ids = [d["_id"] for d in docs]
    pairs = [{"query_id": f"q{i}", "query": f"question about passage {i}", "positive_ids": [ids[i], ids[i + 100]],
              "negative_ids": [ids[i + 200]]} for i in range(60)]
    pairs.append({"query_id": "q-bad", "query": "missing doc", "positive_ids": ["not-a-doc"]})
    (root / "pairs").mkdir()
    (root / "pairs" / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")


def _batches(store_uri: str, storage: StorageConfig | None, tokenizer: str) -> list[tuple]:
    ds = tokenize_pairs(pairs_dataset(store_uri, "train", storage, seed=11, negatives_per_query=2), tokenizer, 16, 32)
    iterator = ds.iterator()
    out = []
    for _ in range(2):
        for batch in iterator.iter_batches(batch_size=16, batch_format="numpy"):
            out.append((list(batch[S.QUERY_ID]), list(batch[S.POSITIVE_ID]),
                        [list(n) for n in batch[S.NEGATIVE_IDS]],
                        [list(t) for t in batch[S.POSITIVE_INPUT_IDS]]))
    return out


def test_s3_and_local_ingest_and_stream_agree(ray_cluster, s3_bucket, shared_data, tmp_path, minilm_dir):
    local_src = tmp_path / "raw"
    _source(local_src, shared_data / "retrieval" / "msmarco-dl19-subset")
    s3 = StorageConfig()  # endpoint and credentials from the AWS_* variables s3_bucket set
    s3_src, s3_store = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/store"
    wstorage.upload_dir(local_src, s3_src, s3)
    local_store = str(tmp_path / "store")

    reports = {}
    for name, src, dest, storage, engine in (("local", str(local_src), local_store, None, "local"),
                                             ("s3", s3_src, s3_store, s3, "ray")):
        corpus = ingest(f"{src}/corpus", dest, "corpus", storage=storage, rows_per_shard=100, engine=engine)
        pairs = ingest(f"{src}/pairs", dest, "pairs", storage=storage, rows_per_shard=25, engine=engine)
        reports[name] = (corpus, pairs)
        assert corpus.engine == engine
    for local_report, s3_report in zip(reports["local"], reports["s3"], strict=True):
        assert s3_report.datasets == local_report.datasets
    corpus_counts = reports["s3"][0].datasets["corpus"]
    assert (corpus_counts.rows_in, corpus_counts.rows_written, corpus_counts.rows_quarantined) == (304, 300, 4)
    assert reports["s3"][0].failed_files == {"corpus": [f"{s3_src}/corpus/part-2.parquet"]}
    assert reports["s3"][1].datasets["pairs/train"].rows_quarantined == 1

    local_manifest, s3_manifest = read_manifest(local_store), read_manifest(s3_store, s3)
    assert set(s3_manifest.datasets) == set(local_manifest.datasets) == {"corpus", "pairs/train"}
    for name, entry in local_manifest.datasets.items():
        remote = s3_manifest.datasets[name]
        # the same shards, byte for byte (each ingest writes them in a generation folder of its own)
        assert [(s.path.rsplit("/", 1)[1], s.rows, s.sha256) for s in remote.shards] == \
            [(s.path.rsplit("/", 1)[1], s.rows, s.sha256) for s in entry.shards]
    (part,) = s3_manifest.quarantine["corpus"].files
    quarantine = json.loads(wstorage.read_bytes(f"{s3_store}/{part}", s3).decode().splitlines()[0])
    assert quarantine["file"] == f"{s3_src}/corpus/part-0.jsonl.gz" and quarantine["line"] == 151

    local_batches = _batches(local_store, None, str(minilm_dir))
    s3_batches = _batches(s3_store, s3, str(minilm_dir))
    assert sum(len(b[0]) for b in local_batches) == 2 * 60
    assert s3_batches == local_batches
