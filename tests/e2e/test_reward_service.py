"""The reward model service over real HTTP and a Serve handle: scores equal the model's own,
concurrent requests share batches, the bearer token guards /score and always /reload, a reload
swaps the model and the version every answer carries, and the driver helper deploys it."""

from __future__ import annotations

import asyncio
import pickle
import re

import httpx
import numpy as np
import pytest

from tests.conftest import free_port
from tests.e2e.test_index_service import serve_root_url

pytestmark = pytest.mark.e2e

TOKEN = "reward-token-789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP, PREFIX = "whetstone-reward-test", "/reward-test"
PROMPTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant:", "Name a prime number.", "Say hi."]
RESPONSES = ["Put it in boiling water for nine minutes.", "Seven.", "Hello there, how can I help?"]


@pytest.fixture(scope="module")
def reward_models(tiny_encoder_dir, tmp_path_factory) -> tuple:
    """Two reward models on the tiny BERT (different heads and encoders), saved as the job saves them."""
    import torch
    from whetstone.models.reward import RewardModel

    root, folders = tmp_path_factory.mktemp("reward-models"), []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = RewardModel.from_encoder(tiny_encoder_dir, max_length=64, max_prompt_length=32)
        with torch.no_grad():  # make the encoders differ too (a constant shift would vanish in LayerNorm)
            for param in model.transformer.parameters():
                param.add_(0.05 * torch.randn(param.shape))
        folders.append(model.save(root / f"rm-{seed}"))
    return tuple(folders)


def expected_scores(folder, prompts=PROMPTS, responses=RESPONSES) -> np.ndarray:
    from whetstone.models.reward import RewardModel

    return RewardModel.load(folder).score(prompts, responses)


@pytest.fixture(scope="module")
def reward_url(ray_cluster, reward_models):
    from ray import serve

    from services.reward.app import RewardServiceArgs, build_app

    url = serve_root_url(ray_cluster)
    # A long batch wait, so that requests sent together surely meet in one batch.
    args = RewardServiceArgs(model_uri=str(reward_models[0]), auth_token=TOKEN, num_cpus=0.1, max_batch_size=16,
                             batch_wait_timeout_s=0.3, max_items=8, score_batch_size=4)
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    yield f"{url}{PREFIX}"
    serve.delete(APP)


def batch_log() -> list[dict]:
    from ray import serve

    from services.reward.schemas import DEPLOYMENT_NAME

    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP).batch_log.remote().result()


def test_score_matches_the_model_and_names_its_version(reward_url, reward_models):
    from services.reward.app import content_version

    response = httpx.post(f"{reward_url}/score", json={"prompts": PROMPTS, "responses": RESPONSES}, headers=AUTH,
                          timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert np.allclose(body["scores"], expected_scores(reward_models[0]), atol=1e-5)
    assert re.fullmatch(r"rm-[0-9a-f]{8}", body["version"]) and body["version"] == content_version(reward_models[0])
    assert body["model_uri"] == str(reward_models[0])
    # a completion that stopped at once (EOS first) is an empty text: scored like any other
    empty = httpx.post(f"{reward_url}/score", json={"prompts": ["Say hi."], "responses": [""]}, headers=AUTH,
                       timeout=60)
    assert empty.status_code == 200, empty.text
    assert np.allclose(empty.json()["scores"], expected_scores(reward_models[0], ["Say hi."], [""]), atol=1e-5)
    health = httpx.get(f"{reward_url}/healthz", timeout=30)  # open
    assert health.status_code == 200 and health.json()["version"] == body["version"]


def test_score_needs_the_token_and_refuses_bad_bodies_naming_the_field(reward_url):
    body = {"prompts": PROMPTS[:1], "responses": RESPONSES[:1]}
    missing = httpx.post(f"{reward_url}/score", json=body, timeout=30)
    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized"), missing.text
    assert missing.headers["www-authenticate"] == "Bearer" and "WHETSTONE_REWARD_TOKEN" in missing.json()["detail"]
    wrong = httpx.post(f"{reward_url}/score", json=body, headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden") and "not-it" not in wrong.text
    # checked before the body: an unauthenticated caller learns nothing about the input's validity
    assert httpx.post(f"{reward_url}/score", json={"prompts": []}, timeout=30).status_code == 401
    for bad, field in (({"prompts": PROMPTS, "responses": RESPONSES[:2]}, "responses"),
                       ({"prompts": [], "responses": []}, "prompts"),
                       ({"prompts": [1], "responses": ["x"]}, "prompts"),
                       ({"prompts": ["a"], "responses": ["x"], "extra": 1}, "extra")):
        answer = httpx.post(f"{reward_url}/score", json=bad, headers=AUTH, timeout=30)
        assert (answer.status_code, answer.json()["code"]) == (422, "bad_input"), answer.text
        assert field in [loc for error in answer.json()["detail"] for loc in error["loc"]], answer.text
    assert "one response per prompt" in httpx.post(
        f"{reward_url}/score", json={"prompts": PROMPTS, "responses": RESPONSES[:2]}, headers=AUTH, timeout=30).text
    too_many = httpx.post(f"{reward_url}/score", json={"prompts": ["p"] * 9, "responses": ["r"] * 9}, headers=AUTH,
                          timeout=30)
    assert (too_many.status_code, too_many.json()["code"]) == (413, "too_many_queries"), too_many.text
    assert "max_items=8" in too_many.json()["detail"]
    spec = httpx.get(f"{reward_url}/openapi.json", timeout=30).json()
    assert spec["paths"]["/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert spec["paths"]["/reload"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_concurrent_requests_are_scored_in_shared_batches(reward_url, reward_models):
    """Eight HTTP requests sent at once: the replica's batch log shows them merged (fewer batches
    than requests, one holding several), and each answer still holds its own pairs' scores."""
    requests = [(PROMPTS[: 1 + i % 3], RESPONSES[::-1][: 1 + i % 3]) for i in range(8)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{reward_url}/score", json={"prompts": p, "responses": r})
                                          for p, r in requests))

    before = len(batch_log())
    answers = asyncio.run(send_all())
    batches = batch_log()[before:]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for (prompts, responses), answer in zip(requests, answers, strict=True):
        assert np.allclose(answer.json()["scores"], expected_scores(reward_models[0], prompts, responses), atol=1e-5)
    assert sum(b["requests"] for b in batches) == 8 and sum(b["items"] for b in batches) == sum(
        len(p) for p, _ in requests)
    assert len(batches) < 8 and max(b["requests"] for b in batches) > 1, batches


def test_the_handle_path_scores_the_same_through_the_same_batches(reward_url, reward_models):
    import ray
    from ray import serve
    from whetstone.index.wire import ErrorCode, IndexServiceError
    from whetstone.online.reward_client import RewardClient, RewardServiceError

    from services.reward.schemas import DEPLOYMENT_NAME

    client = pickle.loads(pickle.dumps(RewardClient.from_handle(APP)))  # built on the driver, shipped
    scores, version = client.score(PROMPTS, RESPONSES)
    assert scores.dtype == np.float32 and np.allclose(scores, expected_scores(reward_models[0]), atol=1e-5)
    http = httpx.post(f"{reward_url}/score", json={"prompts": PROMPTS, "responses": RESPONSES}, headers=AUTH,
                      timeout=60).json()
    assert version == http["version"] and np.allclose(scores, http["scores"], atol=1e-6)

    @ray.remote(num_cpus=0.1)
    def score_in_a_worker(shipped: RewardClient) -> tuple[np.ndarray, str]:
        return shipped.score(PROMPTS, RESPONSES)

    remote_scores, remote_version = ray.get(score_in_a_worker.remote(client), timeout=120)
    assert remote_version == version and np.allclose(remote_scores, scores, atol=1e-6)

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP)
    before = len(batch_log())
    pending = [handle.score_batch.remote(PROMPTS[:2], RESPONSES[:2]) for _ in range(4)]
    answers = [p.result(timeout_s=60) for p in pending]
    batches = batch_log()[before:]
    assert all(np.allclose(a["scores"], scores[:2], atol=1e-5) for a in answers)
    assert sum(b["requests"] for b in batches) == 4 and max(b["requests"] for b in batches) > 1, batches

    with pytest.raises(IndexServiceError) as refused:  # the service validates handle calls as HTTP bodies
        handle.score_batch.remote(PROMPTS, RESPONSES[:1]).result(timeout_s=30)
    assert refused.value.code == ErrorCode.BAD_INPUT and "responses" in str(refused.value.detail)
    with pytest.raises(RewardServiceError) as too_many:
        client.score(["p"] * 9, ["r"] * 9)
    assert (too_many.value.status, too_many.value.code) == (413, "too_many_queries")


def test_the_http_client_scores_and_names_the_url_when_refused(reward_url, reward_models):
    from whetstone.online.reward_client import RewardClient, RewardServiceError

    scores, version = RewardClient.from_url(reward_url, TOKEN).score(PROMPTS, RESPONSES)
    assert np.allclose(scores, expected_scores(reward_models[0]), atol=1e-5) and version.startswith("rm-")
    with pytest.raises(RewardServiceError) as wrong:
        RewardClient.from_url(reward_url, "nope").score(PROMPTS, RESPONSES)
    assert wrong.value.status == 403 and f"{reward_url}/score" in str(wrong.value) and "403" in str(wrong.value)
    nowhere = f"http://127.0.0.1:{free_port()}/reward"
    with pytest.raises(RewardServiceError, match=re.escape(nowhere)):
        RewardClient.from_url(nowhere, TOKEN, timeout_s=5).score(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="responses"):
        RewardClient.from_url(reward_url, TOKEN).score(PROMPTS, RESPONSES[:1])


def test_reload_swaps_the_model_and_the_version(ray_cluster, reward_models):
    """Deployed with the driver helper; /reload needs the token, loads before it swaps, and every
    answer after it carries the new version and the new model's scores."""
    from services.reward.app import content_version, deploy_reward_service, shutdown

    first, second = reward_models
    url = serve_root_url(ray_cluster) + "/reward-reload"
    client = deploy_reward_service(str(first), app_name="reward-reload", route_prefix="/reward-reload",
                                  num_cpus=0.1, auth_token=TOKEN)
    try:
        assert client.version() == content_version(first)
        body = {"model_uri": str(second), "version": "rm-second"}
        assert httpx.post(f"{url}/reload", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{url}/reload", json=body, headers={"Authorization": "Bearer no"}, timeout=30).status_code == 403
        broken = httpx.post(f"{url}/reload", json={"model_uri": str(first.parent / "missing")}, headers=AUTH,
                            timeout=60)
        assert (broken.status_code, broken.json()["code"]) == (422, "bad_input") and "model_uri" in broken.text
        assert client.version() == content_version(first)  # still serving the first model

        reloaded = httpx.post(f"{url}/reload", json=body, headers=AUTH, timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["version"] == "rm-second"
        assert reloaded.json()["previous_version"] == content_version(first)
        scores, version = client.score(PROMPTS, RESPONSES)
        assert version == "rm-second" and np.allclose(scores, expected_scores(second), atol=1e-5)
        assert not np.allclose(scores, expected_scores(first), atol=1e-3)
        http = httpx.post(f"{url}/score", json={"prompts": PROMPTS, "responses": RESPONSES}, headers=AUTH,
                          timeout=60).json()
        assert (http["version"], http["model_uri"]) == ("rm-second", str(second))

        again = httpx.post(f"{url}/reload", json={"model_uri": str(second)}, headers=AUTH, timeout=120).json()
        assert again["version"] == content_version(second) != content_version(first)
    finally:
        shutdown("reward-reload")


def deploy_with_env(ray_cluster, name: str, args, env_vars: dict[str, str]) -> str:
    """Deploy the reward app as ``name`` with ``env_vars`` in its replica's environment (as the
    RayService's pods have them from the Secret); returns its URL."""
    from ray import serve

    from services.reward.app import RewardService, wire_args

    options = {"num_cpus": 0.1, "runtime_env": {"env_vars": env_vars}}
    serve.run(RewardService.options(num_replicas=args.num_replicas, ray_actor_options=options).bind(wire_args(args)),
              name=name, route_prefix=f"/{name}")
    return f"{serve_root_url(ray_cluster)}/{name}"


def test_token_from_the_environment_and_reload_refused_without_one(ray_cluster, reward_models):
    from ray import serve

    from services.reward.app import RewardServiceArgs
    from tests.fuzz_http import fuzz_openapi

    args = RewardServiceArgs(model_uri=str(reward_models[0]))
    body = {"prompts": PROMPTS[:1], "responses": RESPONSES[:1]}
    try:
        # $WHETSTONE_REWARD_TOKEN comes before the index token
        own = deploy_with_env(ray_cluster, "reward-env", args.model_copy(update={"num_replicas": 2}),
                              {"WHETSTONE_REWARD_TOKEN": "reward-secret", "WHETSTONE_INDEX_TOKEN": "index-secret"})
        assert httpx.post(f"{own}/score", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{own}/score", json=body, headers={"Authorization": "Bearer index-secret"},
                          timeout=30).status_code == 403
        right = httpx.post(f"{own}/score", json=body, headers={"Authorization": "Bearer reward-secret"}, timeout=60)
        assert right.status_code == 200, right.text
        # two replicas: a reload would swap the one it reaches, so it is refused
        r = httpx.post(f"{own}/reload", json={"model_uri": str(reward_models[1])},
                       headers={"Authorization": "Bearer reward-secret"}, timeout=30)
        assert (r.status_code, r.json()["code"]) == (409, "http_error") and "num_replicas=2" in r.text, r.text

        # no token anywhere: scoring is open, reloading refused whatever is sent
        open_ = deploy_with_env(ray_cluster, "reward-open", args,
                                {"WHETSTONE_REWARD_TOKEN": "", "WHETSTONE_INDEX_TOKEN": ""})
        assert httpx.post(f"{open_}/score", json=body, timeout=60).status_code == 200
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = httpx.post(f"{open_}/reload", json={"model_uri": str(reward_models[1])}, headers=headers, timeout=30)
            assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
            assert "$WHETSTONE_REWARD_TOKEN (else $WHETSTONE_INDEX_TOKEN)" in r.json()["detail"]
        spec = httpx.get(f"{open_}/openapi.json", timeout=30).json()
        assert "security" not in spec["paths"]["/score"]["post"] and spec["paths"]["/reload"]["post"]["security"]
        # A bounded schemathesis run: no 5xx from anything the document allows or forbids, and
        # positive cases scored (reload is refused at the door here, so nothing is loaded).
        result = fuzz_openapi(open_, examples=10)
        assert result.cases >= 20 and not result.server_errors, (result.cases, result.server_errors[:5])
        assert result.statuses[200] > 0, result.statuses
    finally:
        for name in ("reward-env", "reward-open"):
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - it may never have been deployed
                pass
