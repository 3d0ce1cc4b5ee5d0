"""The embedding endpoint over real HTTP: it serves the checkpoint of the newest index version
and follows a promotion (a newer version built from another checkpoint) without a restart."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.e2e.test_index_service import serve_root_url

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def embed_url(ray_cluster, tiny_encoder_dir, tmp_path_factory):
    from ray import serve
    from whetstone.index.ann import AnnConfig, AnnIndex

    from services.embed.app import EmbedServiceArgs, build_app

    root = str(tmp_path_factory.mktemp("embed") / "index")
    vectors = np.eye(4, 32, dtype=np.float32)
    AnnIndex.build(vectors, ["a", "b", "c", "d"], AnnConfig()).save(root, 1, checkpoint=str(tiny_encoder_dir))
    url = serve_root_url(ray_cluster)
    args = EmbedServiceArgs(index_uri=root, num_cpus=0.1, poll_interval_s=0.5)
    serve.run(build_app(args), name="whetstone-embed-test", route_prefix="/embed-test")
    yield f"{url}/embed-test", root
    serve.delete("whetstone-embed-test")


def test_embed_matches_the_encoder_and_follows_promotions(embed_url, tiny_encoder_dir, minilm_dir):
    from whetstone.index.ann import AnnConfig, AnnIndex
    from whetstone.models.encoder import Encoder

    url, root = embed_url
    texts = ["a claim about proteins", "another one"]
    response = httpx.post(f"{url}/", json={"texts": texts}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_version"] == 1 and body["dim"] == 32
    expected = Encoder.load(tiny_encoder_dir, device="cpu").encode(texts)
    assert np.allclose(np.array(body["vectors"]), expected, atol=1e-5)

    bad = httpx.post(f"{url}/", json={"texts": []}, timeout=30)
    assert bad.status_code == 422 and "texts" in bad.text

    # promote: a new index version built from MiniLM; the service switches within a poll or two
    AnnIndex.build(np.eye(4, 384, dtype=np.float32), ["a", "b", "c", "d"], AnnConfig()).save(
        root, 2, checkpoint=str(minilm_dir))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = httpx.post(f"{url}/", json={"texts": texts}, timeout=60).json()
        if body["index_version"] == 2:
            break
        time.sleep(0.5)
    assert body["index_version"] == 2 and body["dim"] == 384


def test_an_asymmetric_model_embeds_queries_with_its_query_tower(embed_url, tiny_encoder_dir, tmp_path):
    import torch
    from whetstone.index.ann import AnnConfig, AnnIndex
    from whetstone.index.snapshot import latest_version
    from whetstone.models.encoder import Encoder

    url, root = embed_url
    docs_tower, query_tower = Encoder.load(tiny_encoder_dir, device="cpu"), Encoder.load(tiny_encoder_dir, device="cpu")
    with torch.no_grad():  # make the towers differ (a constant shift would vanish in LayerNorm)
        generator = torch.Generator().manual_seed(0)
        for param in docs_tower.transformer.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model = docs_tower.save(tmp_path / "asym", query_tower=query_tower)
    version = (latest_version(root) or 0) + 1
    AnnIndex.build(np.eye(4, 32, dtype=np.float32), ["a", "b", "c", "d"], AnnConfig()).save(
        root, version, checkpoint=str(model))
    texts = ["a claim about proteins"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = httpx.post(f"{url}/", json={"texts": texts, "kind": "document"}, timeout=60).json()
        if body["index_version"] == version:
            break
        time.sleep(0.5)
    assert body["index_version"] == version
    assert np.allclose(np.array(body["vectors"]), docs_tower.encode(texts), atol=1e-5)
    queries = httpx.post(f"{url}/", json={"texts": texts, "kind": "query"}, timeout=60).json()
    assert np.allclose(np.array(queries["vectors"]), query_tower.encode(texts), atol=1e-5)
    assert not np.allclose(np.array(queries["vectors"]), np.array(body["vectors"]), atol=1e-3)
    bad = httpx.post(f"{url}/", json={"texts": texts, "kind": "passage"}, timeout=30)
    assert bad.status_code == 422 and "kind" in bad.text


def test_fuzzed_requests_get_no_server_errors(embed_url):
    """A bounded schemathesis run against the embedding endpoint's OpenAPI document: no 5xx."""
    from tests.fuzz_http import fuzz_openapi

    url, _ = embed_url
    result = fuzz_openapi(url, examples=25)
    assert result.cases >= 50 and not result.server_errors, (result.cases, result.server_errors[:5])
