"""Online preference training end to end on a local Ray, with tiny random-init models.

``jobs.train_preference`` with ``mode=online``: 2 generation actors sample from a tiny GPT-2 (the
``tiny-gpt2`` alias: 2 layers, GPT-2's tokenizer), a reward model (a random-init tiny BERT with a
scalar head) is served by Ray Serve with a bearer token, 2 Ray Train workers take GRPO steps, and
rank 0 pushes the weights to the actors every 2 steps through the object store. Then a copy of the
run cut back to its step-2 checkpoint is resumed. The reward model is random, so these tests check
the machinery (versions, lags, ratios, scores, resume), not that the policy gets better: the
benchmark (``benchmarks/preference_online.py``) measures that with real models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

HH_RLHF = "preference/hh-rlhf-harmless-base/test.jsonl.gz"
TOKEN = "online-test-token"
APP = "online-test-reward"
PREFIX = "/online-test-reward"


@pytest.fixture(scope="module")
def hh_store(tmp_path_factory, shared_data) -> str:
    from whetstone.data.ingest import ingest

    store = str(tmp_path_factory.mktemp("store") / "hh-rlhf")
    ingest(str(shared_data / HH_RLHF), store, "hh-rlhf", "preference/test", rows_per_shard=1000)
    return store


@pytest.fixture(scope="module")
def reward_app(ray_cluster, tmp_path_factory, tiny_encoder_dir):
    """A random-init reward model (head weights large enough that samples' rewards differ) served
    with a token; yields (client, folder)."""
    import torch
    from whetstone.models.reward import RewardModel

    from services.reward.app import deploy_reward_service, shutdown
    from tests.e2e.test_index_service import serve_root_url

    serve_root_url(ray_cluster)  # Serve's HTTP proxy on a free loopback port before anything deploys
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("reward") / "model"
    model = RewardModel.from_encoder(str(tiny_encoder_dir), max_length=64, max_prompt_length=32)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    model.save(folder)
    client = deploy_reward_service(str(folder), app_name=APP, route_prefix=PREFIX, num_cpus=0.1, auth_token=TOKEN,
                                   batch_wait_timeout_s=0.05)
    yield client, folder
    shutdown(APP)


def _args(store: str, output: Path, *extra: str) -> list[str]:
    return [
        f"store_uri={store}", f"output_uri={output}", "if_exists=overwrite", "mode=online", "policy.path=tiny-gpt2",
        "loss.name=grpo", "optim.num_workers=2", "optim.cpus_per_worker=0.5", "optim.batch_size=3",
        "optim.max_steps=4", "optim.lr=1e-3", "optim.warmup_ratio=0", "optim.checkpoint_every=2",
        "optim.eval_batch_size=6", "data.dataset=preference/test", "data.eval_fraction=0.1",
        "data.max_train_pairs=120", "data.max_length=96", "data.max_prompt_length=48", "leakage.mode=off",
        f"online.reward_app={APP}", "online.samples_per_prompt=3", "online.max_new_tokens=12",
        "online.sync_every=2", "online.eval_prompts=12", "online.generation_actors=2",
        "online.generation_cpus=0.25", "ray_object_store_mb=512", *extra,
    ]


@pytest.fixture(scope="module")
def online_report(reward_app, hh_store, tmp_path_factory) -> dict:
    from jobs.train_preference import main

    return main(_args(hh_store, tmp_path_factory.mktemp("online") / "run"))


def _history(report: dict) -> list[dict]:
    return json.loads(Path(report["history_uri"]).read_text())


def test_reward_service_wants_its_token(reward_app, ray_cluster):
    from tests.e2e.test_index_service import serve_root_url

    client, _ = reward_app
    url = serve_root_url(ray_cluster) + PREFIX + "/score"
    body = {"prompts": ["a question"], "responses": ["an answer"]}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 403
    answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["version"] == client.version()


def test_weights_reach_the_actors_every_two_steps_with_their_version(online_report):
    """Steps 1-2 sample with v0 (the start), steps 3-4 with v2 (pushed after step 2): lag 0, 1, 0, 1.
    GRPO's ratio compares the trainer's log-probs with the generating weights' own: exactly 1 when
    they are the same weights (steps 1 and 3: the pushed weights arrived intact), not 1 when the
    trainer moved on (steps 2 and 4: one update ahead of the samples' weights)."""
    history = _history(online_report)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert [m["policy_version"] for m in history] == [0, 0, 2, 2]
    assert [m["policy_lag"] for m in history] == [0, 1, 0, 1]
    assert online_report["online"]["policy_lag_max"] == 1
    assert history[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert history[2]["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(history[1]["ratio_mean"] - 1.0) > 1e-4 and abs(history[3]["ratio_mean"] - 1.0) > 1e-4
    # KL to the reference: 0 while sampling with the reference's own weights, then not
    assert history[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4)
    assert abs(history[2]["kl_to_reference"]) > 1e-3


def test_every_step_reports_reward_length_kl_and_times(online_report, reward_app):
    client, _ = reward_app
    for m in _history(online_report):
        assert 1 <= m["response_tokens"] <= 12 and 0 <= m["finished"] <= 1
        assert m["generate_s"] > 0 and m["score_s"] > 0 and m["train_s"] > 0
        assert np.isfinite([m["reward_mean"], m["reward_std"], m["loss"], m["kl_to_reference"]]).all()
        assert m["reward_best"] >= m["reward_mean"]
    online = online_report["online"]
    assert online["reward_model_version"] == client.version()
    assert online["held_out_before"]["prompts"] == online["held_out_after"]["prompts"] == 12
    assert online["reward_gain_sd"] == pytest.approx(
        (online["held_out_after"]["reward_mean"] - online["held_out_before"]["reward_mean"])
        / online["held_out_before"]["reward_std"])
    assert online["generate_s_per_step"] > 0 and online["score_s_per_step"] > 0


def test_the_held_out_baseline_is_the_served_models_score_of_greedy_completions(online_report, reward_app,
                                                                                 hh_store, tmp_path):
    """The held-out figures before training, recomputed outside the job: the same prompts (the
    first eval pairs by hash), greedy completions of the starting policy from a fresh actor, scored
    through the served model's handle."""
    from whetstone.config.base import load_config
    from whetstone.config.preference import PolicyConfig, PreferenceJobConfig
    from whetstone.online.generation import GenerationPool
    from whetstone.train.online_eval import greedy_rewards
    from whetstone.train.online_run import generation_settings
    from whetstone.train.preference_data import select_pairs

    client, _ = reward_app
    before = json.loads((Path(online_report["run_uri"]) / "online_eval_before.json").read_text())
    config = load_config(PreferenceJobConfig, None, _args(hh_store, tmp_path / "unused"))
    selection = select_pairs(config)
    prompts = [selection.prompts[i] for i in selection.eval_ids[:12]]
    pool = GenerationPool.start(1, PolicyConfig(path="tiny-gpt2").model_dump(mode="json"), None,
                                generation_settings(config), num_cpus=0.25, name_prefix="online-test-check")
    try:
        rewards, tokens, _ = greedy_rewards(pool, client, prompts)
    finally:
        pool.shutdown()
    np.testing.assert_allclose(rewards, before["rewards"], atol=1e-5)
    assert before["response_tokens"] == pytest.approx(tokens.mean())


def test_a_cut_back_run_resumes_with_the_same_samples(online_report, hh_store, tmp_path):
    """The run copied and cut back to its step-2 checkpoint, resumed: the actors start from the
    checkpoint's weights (v2), the steps sample what the uninterrupted run sampled (same prompts,
    seeds, weights) and train to the same losses."""
    from jobs.train_preference import main

    killed = tmp_path / "killed"
    shutil.copytree(online_report["run_uri"], killed)
    shutil.rmtree(killed / "train" / "final")
    for name in ("history.json", "report.json", "training.png"):
        (killed / name).unlink()
    args = [a for a in _args(hh_store, killed) if not a.startswith("if_exists=")]
    report = main([*args, "if_exists=resume"])
    assert report["resumed_from_step"] == 2
    whole, resumed = _history(online_report), _history(report)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["policy_version"] for m in resumed[2:]] == [2, 2]
    for key in ("reward_mean", "response_tokens", "loss"):
        np.testing.assert_allclose([m[key] for m in resumed[2:]], [m[key] for m in whole[2:]], atol=1e-4)
    # the starting policy's held-out figures are the first attempt's, not the resumed weights'
    assert report["online"]["held_out_before"] == online_report["online"]["held_out_before"]
