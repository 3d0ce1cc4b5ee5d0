"""The contrastive job end to end on a local Ray: index service, live negatives, a refresh, eval.

Runs ``jobs.train_contrastive.main`` on the shipped scifact-subset with a tiny random-init
encoder (quality is not judged here; ``make demo`` judges it with MiniLM).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scifact_store(tmp_path_factory) -> str:
    from whetstone.data.ingest import ingest_beir
    from whetstone.datasets import path

    store = str(tmp_path_factory.mktemp("store") / "scifact")
    report = ingest_beir(str(path("scifact-subset")), store, rows_per_shard=500)
    assert report.datasets["pairs/train"].rows_written == 188
    return store


@pytest.fixture(scope="module")
def contrastive_report(ray_cluster, scifact_store, tiny_encoder_dir) -> dict:
    from jobs.train_contrastive import main

    report = main([
        "--config", "jobs/configs/train_contrastive/smoke.yaml",
        f"store_uri={scifact_store}",
        f"encoder.base_model={tiny_encoder_dir}",
        f"index.http_port={free_port()}",
        "optim.max_steps=4", "refresh.every_steps=2",
    ])
    yield report
    from ray import serve

    serve.delete("whetstone-index")


def test_report_has_the_loop(contrastive_report):
    report = contrastive_report
    assert report["steps"] == 4
    # every step mined negatives from the live index: 1 per query, 8 queries per worker
    assert report["negatives_served_by_index"] == 4 * 8
    assert report["fallback_steps_rank0"] == 0
    assert report["before"]["queries"] == report["after"]["queries"] == 77
    assert 0 <= report["after"]["ndcg@10"] <= 1


def test_refresh_swapped_a_new_version(contrastive_report):
    refreshes = contrastive_report["refreshes"]
    assert contrastive_report["refresh_errors"] == []
    assert len(refreshes) == 1 and refreshes[0]["step"] == 2
    assert (refreshes[0]["old_version"], refreshes[0]["new_version"]) == (1, 2)
    assert refreshes[0]["checkpoint"].endswith("step-000002")
    # the final model is promoted as the newest version
    assert contrastive_report["index_versions"] == [1, 2, 3]


def test_index_service_serves_the_promoted_version(contrastive_report):
    import numpy as np
    from whetstone.index.client import IndexClient

    client = IndexClient.from_handle()
    result = client.search(np.ones((1, 32), dtype=np.float32), k=5)
    assert result.version == 3 and len(result.ids[0]) == 5


def test_model_loads_in_sentence_transformers_and_transformers(contrastive_report):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model_dir = contrastive_report["model_uri"]
    st = SentenceTransformer(model_dir, device="cpu")
    vectors = st.encode(["a claim about proteins"])
    assert vectors.shape == (1, 32)
    assert AutoModel.from_pretrained(model_dir).config.hidden_size == 32
    report_file = Path(contrastive_report["run_uri"]) / "report.json"
    assert json.loads(report_file.read_text())["steps"] == 4
