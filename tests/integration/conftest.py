"""Fixtures the integration tests share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def scifact_store(tmp_path_factory) -> str:
    """The shipped scifact-subset, ingested into a fresh local store."""
    from whetstone.data.ingest import ingest_beir
    from whetstone.datasets import path

    store = str(tmp_path_factory.mktemp("store") / "scifact")
    report = ingest_beir(str(path("scifact-subset")), store, rows_per_shard=500)
    assert report.datasets["pairs/train"].rows_written == 188
    return store
