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
