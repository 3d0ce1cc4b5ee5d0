"""The same ingest and stream against moto's S3 server on loopback gives what a local folder gives."""

from __future__ import annotations

import pytest
from whetstone.config.base import StorageConfig
from whetstone.data import schemas as S
from whetstone.data.ingest import ingest_beir
from whetstone.data.store import read_manifest
from whetstone.data.stream import DocStore, load_eval_split, pairs_dataset, read_dataset_table

pytestmark = pytest.mark.integration


def test_s3_store_matches_local_store(ray_cluster, shared_data, s3_bucket, tmp_path):
    source = str(shared_data / "retrieval" / "scifact-subset")
    local = ingest_beir(source, str(tmp_path / "store"), rows_per_shard=500)
    storage = StorageConfig()  # endpoint and credentials from the AWS_* env set by s3_bucket
    uri = f"s3://{s3_bucket}/store"
    remote = ingest_beir(source, uri, storage, rows_per_shard=500)
    assert remote.datasets == local.datasets
    assert remote.manifest_uri == f"{uri}/manifest.json"
    local_manifest, remote_manifest = read_manifest(str(tmp_path / "store")), read_manifest(uri, storage)
    for name, entry in local_manifest.datasets.items():
        assert [s.rows for s in remote_manifest.datasets[name].shards] == [s.rows for s in entry.shards]
        assert remote_manifest.datasets[name].rows == entry.rows
    assert read_dataset_table(uri, "pairs/train", storage).equals(read_dataset_table(str(tmp_path / "store"),
                                                                                    "pairs/train"))
    assert load_eval_split(uri, "test", storage) == load_eval_split(str(tmp_path / "store"), "test")
    docs = DocStore.load(uri, storage)
    assert len(docs) == 2101

    rows = pairs_dataset(uri, "test", storage, seed=0).take_all()
    assert sorted(r[S.QUERY_ID] for r in rows) == sorted(load_eval_split(uri, "test", storage).queries)
    assert all(r[S.POSITIVE_TEXT] == docs.texts([r[S.POSITIVE_ID]])[0] for r in rows)


def test_ingest_rides_out_a_20_s_storage_stall(s3_server, s3_bucket, tmp_path):
    """moto's server is stopped (SIGSTOP) for 20 s while an ingest streams a source from S3 into
    an S3 store, then continued (SIGCONT): the ingest finishes with every row, because reads
    resume at the byte they stopped at and writes are retried, both within storage.retry_budget_s."""
    import json
    import os
    import signal
    import threading
    import time

    import boto3
    from whetstone.data.ingest_files import ingest_records

    from tests.conftest import S3_SERVER_PIDS

    rows = 200_000  # about 24 MB of JSON lines (several seconds to ingest): the stall lands while it streams
    body = "".join(json.dumps({"doc_id": f"d{i}", "title": f"title {i}", "text": f"text of document {i} " * 4})
                   + "\n" for i in range(rows)).encode()
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="src/corpus.jsonl", Body=body)
    pid, stalled = S3_SERVER_PIDS[s3_server], threading.Event()

    def stall() -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        stalled.set()
        time.sleep(20)
        os.kill(pid, signal.SIGCONT)

    staller = threading.Thread(target=stall)
    started = time.monotonic()
    staller.start()
    try:
        report = ingest_records(f"s3://{s3_bucket}/src/corpus.jsonl", f"s3://{s3_bucket}/store", "corpus",
                                storage=StorageConfig(), rows_per_shard=20_000, engine="local", chunk_rows=4096)
    finally:
        staller.join()
        os.kill(pid, signal.SIGCONT)
    assert stalled.is_set() and time.monotonic() - started > 20, "the ingest ended before the stall"
    counts = report.datasets["corpus"]
    assert (counts.rows_in, counts.rows_written, counts.rows_quarantined) == (rows, rows, 0)
    table = read_dataset_table(f"s3://{s3_bucket}/store", "corpus", StorageConfig())
    assert table.num_rows == rows and table.column(S.DOC_ID).to_pylist()[-1] == f"d{rows - 1}"


def test_a_stall_longer_than_the_retry_budget_fails_naming_the_object_and_the_budget(s3_server, s3_bucket):
    """A 12 s stall against a 4 s budget: the ingest fails with a StorageError that names the
    object and the budget; it does not record the unread rest of the file as damaged data."""
    import json
    import os
    import signal
    import threading
    import time

    import boto3
    from whetstone.data.ingest_files import ingest_records
    from whetstone.storage import StorageError

    from tests.conftest import S3_SERVER_PIDS

    body = "".join(json.dumps({"doc_id": f"d{i}", "text": f"document {i} " * 8}) + "\n" for i in range(300_000))
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="src/corpus.jsonl", Body=body.encode())
    pid = S3_SERVER_PIDS[s3_server]

    def stall() -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(12)
        os.kill(pid, signal.SIGCONT)

    staller = threading.Thread(target=stall)
    staller.start()
    try:
        # the stall lands on the source's read or on a shard's write: either names its object and the budget
        with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/(src/corpus.jsonl|store/\S+).*retry_budget_s=4.0"):
            ingest_records(f"s3://{s3_bucket}/src/corpus.jsonl", f"s3://{s3_bucket}/store", "corpus",
                           storage=StorageConfig(retry_budget_s=4), engine="local", chunk_rows=4096)
    finally:
        staller.join()
        os.kill(pid, signal.SIGCONT)
