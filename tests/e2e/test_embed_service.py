"""The embedding endpoint over real HTTP: it serves the checkpoint of the newest index version
and follows a promotion (a newer version built from another checkpoint) without a restart, and
asks for its bearer token (given, or from $WHETSTONE_EMBED_TOKEN / $WHETSTONE_INDEX_TOKEN)."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from tests.e2e.test_index_service import serve_root_url

pytestmark = pytest.mark.e2e

TOKEN = "embed-token-456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def embed_url(ray_cluster, tiny_encoder_dir, tmp_path_factory):
    from ray import serve
    from whetstone.index.ann import AnnConfig, AnnIndex

    from services.embed.app import EmbedServiceArgs, build_app

    root = str(tmp_path_factory.mktemp("embed") / "index")
    vectors = np.eye(4, 32, dtype=np.float32)
    AnnIndex.build(vectors, ["a", "b", "c", "d"], AnnConfig()).save(root, 1, checkpoint=str(tiny_encoder_dir))
    url = serve_root_url(ray_cluster)
    args = EmbedServiceArgs(index_uri=root, num_cpus=0.1, poll_interval_s=0.5, auth_token=TOKEN)
    serve.run(build_app(args), name="whetstone-embed-test", route_prefix="/embed-test")
    yield f"{url}/embed-test", root
    serve.delete("whetstone-embed-test")


def test_embed_matches_the_encoder_and_follows_promotions(embed_url, tiny_encoder_dir, minilm_dir):
    from whetstone.index.ann import AnnConfig, AnnIndex
    from whetstone.models.encoder import Encoder

    url, root = embed_url
    texts = ["a claim about proteins", "another one"]
    response = httpx.post(f"{url}/", json={"texts": texts}, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_version"] == 1 and body["dim"] == 32
    expected = Encoder.load(tiny_encoder_dir, device="cpu").encode(texts)
    assert np.allclose(np.array(body["vectors"]), expected, atol=1e-5)

    bad = httpx.post(f"{url}/", json={"texts": []}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and "texts" in bad.text and bad.json()["code"] == "bad_input"

    # promote: a new index version built from MiniLM; the service switches within a poll or two
    AnnIndex.build(np.eye(4, 384, dtype=np.float32), ["a", "b", "c", "d"], AnnConfig()).save(
        root, 2, checkpoint=str(minilm_dir))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = httpx.post(f"{url}/", json={"texts": texts}, headers=AUTH, timeout=60).json()
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
        body = httpx.post(f"{url}/", json={"texts": texts, "kind": "document"}, headers=AUTH, timeout=60).json()
        if body["index_version"] == version:
            break
        time.sleep(0.5)
    assert body["index_version"] == version
    assert np.allclose(np.array(body["vectors"]), docs_tower.encode(texts), atol=1e-5)
    queries = httpx.post(f"{url}/", json={"texts": texts, "kind": "query"}, headers=AUTH, timeout=60).json()
    assert np.allclose(np.array(queries["vectors"]), query_tower.encode(texts), atol=1e-5)
    assert not np.allclose(np.array(queries["vectors"]), np.array(body["vectors"]), atol=1e-3)
    bad = httpx.post(f"{url}/", json={"texts": texts, "kind": "passage"}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and "kind" in bad.text


def test_fuzzed_requests_get_no_server_errors(embed_url):
    """A bounded schemathesis run against the embedding endpoint's OpenAPI document, with the
    token: no 5xx, and the positive cases were embedded (not all refused at the door)."""
    from tests.fuzz_http import fuzz_openapi

    url, _ = embed_url
    result = fuzz_openapi(url, examples=25, headers=AUTH)
    assert result.cases >= 50 and not result.server_errors, (result.cases, result.server_errors[:5])
    assert result.statuses[200] > 0, result.statuses


def test_embedding_needs_the_token_and_the_document_says_so(embed_url):
    url, _ = embed_url
    body = {"texts": ["a claim about proteins"]}
    missing = httpx.post(f"{url}/", json=body, timeout=30)
    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized"), missing.text
    assert missing.headers["www-authenticate"] == "Bearer" and "WHETSTONE_EMBED_TOKEN" in missing.json()["detail"]
    wrong = httpx.post(f"{url}/", json=body, headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden"), wrong.text
    assert "WHETSTONE_EMBED_TOKEN" in wrong.json()["detail"] and "not-it" not in wrong.text
    # checked before the body: an unauthenticated caller learns nothing about the input's validity
    assert httpx.post(f"{url}/", json={"texts": []}, timeout=30).status_code == 401
    right = httpx.post(f"{url}/", json=body, headers=AUTH, timeout=60)
    assert right.status_code == 200, right.text
    vectors = np.array(right.json()["vectors"])
    assert vectors.shape == (1, right.json()["dim"]) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # liveness stays open
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert spec["paths"]["/"]["post"]["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/healthz"]["get"]


def deploy_with_env(ray_cluster, name: str, args, env_vars: dict[str, str]) -> str:
    """Deploy the embedding app as ``name`` with ``env_vars`` in its replica's environment (as
    the RayService's pods have them from the Secret); returns its URL."""
    from ray import serve

    from services.embed.app import EmbedService, wire_args

    options = {"num_cpus": 0.1, "runtime_env": {"env_vars": env_vars}}
    serve.run(EmbedService.options(num_replicas=1, ray_actor_options=options).bind(wire_args(args)),
              name=name, route_prefix=f"/{name}")
    return f"{serve_root_url(ray_cluster)}/{name}"


def test_the_token_comes_from_the_environment_and_protect_embed_fails_closed(ray_cluster, tiny_encoder_dir):
    from ray import serve

    from services.embed.app import EmbedServiceArgs

    body = {"texts": ["one text"]}
    try:
        # No auth_token, no embed token: the index's token (one Secret for the RayService) guards it.
        shared = deploy_with_env(ray_cluster, "embed-env", EmbedServiceArgs(model_uri=str(tiny_encoder_dir)),
                                 {"WHETSTONE_EMBED_TOKEN": "", "WHETSTONE_INDEX_TOKEN": "index-secret"})
        assert httpx.post(f"{shared}/", json=body, timeout=30).status_code == 401
        r = httpx.post(f"{shared}/", json=body, headers={"Authorization": "Bearer index-secret"}, timeout=60)
        assert r.status_code == 200 and r.json()["dim"] == 32, r.text
        # protect_embed=true and no token anywhere: every request refused, the answer says what to set.
        closed = deploy_with_env(ray_cluster, "embed-closed",
                                 EmbedServiceArgs(model_uri=str(tiny_encoder_dir), protect_embed=True),
                                 {"WHETSTONE_EMBED_TOKEN": "", "WHETSTONE_INDEX_TOKEN": ""})
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = httpx.post(f"{closed}/", json=body, headers=headers, timeout=30)
            assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
            assert "no auth token is configured" in r.json()["detail"]
            assert "$WHETSTONE_EMBED_TOKEN (else $WHETSTONE_INDEX_TOKEN)" in r.json()["detail"]
        assert httpx.get(f"{closed}/openapi.json", timeout=30).json()["paths"]["/"]["post"]["security"]
    finally:
        for name in ("embed-env", "embed-closed"):
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - it may never have been deployed
                pass
