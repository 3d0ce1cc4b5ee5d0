"""Online preference training, driver side: the actors and the reward service around ``fit``.

``jobs/train_preference.py`` runs, for ``mode=online``::

    selection, leakage = select_and_guard(driver)         # prompts: the train pairs'; held out: the eval pairs'
    plan, datasets = plan_training(driver, selection, None)
    with online_services(driver, plan) as services:      # reward model on Serve, generation actors (services.plan)
        before = held_out_before(driver, services, selection)   # greedy rewards of the starting policy
        metrics = fit(driver, plan, datasets, train_loop_per_worker)
    finish_run(..., online=online_report(...))

The generation actors are named (``plan.generation_actors``) and owned by the driver, so a
restarted worker group finds the same actors; each new worker group pushes its own weights to
them first. The reward model: the job serves ``online.reward_model`` as its own Serve app
(``plan.reward_app``) for the run and deletes it after, or uses a running app or URL.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from whetstone import storage as store
from whetstone.config.preference import PreferenceJobConfig
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference_data import PairSelection

BEFORE_FILE = "online_eval_before.json"  # the starting policy's held-out figures (kept for a resumed run)


@dataclass
class OnlineServices:
    plan: PreferenceRunPlan  # the run plan with the actors' names and the reward app (or URL) filled in
    pool: Any  # whetstone.online.generation.GenerationPool
    reward: Any  # whetstone.online.reward_client.RewardClient
    reward_version: str | None = None


def generation_settings(config: PreferenceJobConfig) -> dict[str, Any]:
    online = config.online
    return {"max_new_tokens": online.max_new_tokens, "temperature": online.temperature, "top_p": online.top_p,
            "top_k": online.top_k, "max_prompt_length": config.data.max_prompt_length,
            "chat_template": config.data.chat_template, "batch_size": online.generation_batch_size}


def held_out_prompts(config: PreferenceJobConfig, selection: PairSelection) -> PairSelection:
    """The eval pairs cut to the first ``online.eval_prompts`` (lowest hashes): their prompts are
    the held-out ones, never trained on."""
    return replace(selection, eval_ids=selection.eval_ids[: config.online.eval_prompts])


def _reward_client(config: PreferenceJobConfig, app_name: str,
                   deploy: Callable[..., Any]) -> tuple[Any, str | None, str | None]:
    """``(client, app the workers use, url the workers use)``: the job's own app, a running one, or a URL."""
    import os

    from whetstone.online.reward_client import RewardClient

    online = config.online
    if online.reward_model:
        # The workers score over the deployment handle; HTTP clients of the app need the token
        # (from the driver's $WHETSTONE_REWARD_TOKEN, else the service's own rules).
        token = os.environ.get("WHETSTONE_REWARD_TOKEN")
        client = deploy(online.reward_model, config.storage.resolved().to_wire(), app_name=app_name,
                        route_prefix=f"/{app_name}", num_cpus=online.reward_num_cpus, num_gpus=online.reward_gpus,
                        score_batch_size=online.reward_batch_size, **({"auth_token": token} if token else {}))
        return client, app_name, None
    if online.reward_app:
        return RewardClient.from_handle(online.reward_app), online.reward_app, None
    return RewardClient.from_url(online.reward_url, os.environ.get("WHETSTONE_REWARD_TOKEN")), None, online.reward_url


def require_gpus(config: PreferenceJobConfig) -> None:
    """GPUs asked of the generation actors or the reward replica must exist in the cluster, or
    their start would wait for them for ever."""
    import ray

    from whetstone.config.base import ConfigError

    online = config.online
    wanted = {"online.generation_gpus": online.generation_gpus * online.generation_actors,
              "online.reward_gpus": online.reward_gpus if online.reward_model else 0.0}
    have = ray.cluster_resources().get("GPU", 0.0)
    for field, gpus in wanted.items():
        if gpus > have:
            raise ConfigError(f"{field}: the run asks for {gpus:g} GPU(s) but the Ray cluster has {have:g}")


@contextlib.contextmanager
def online_services(run: Any, plan: PreferenceRunPlan, deploy: Callable[..., Any],
                    undeploy: Callable[[str], None]) -> Iterator[OnlineServices]:
    """Serve the reward model (unless an app or URL is given) and start the generation actors with
    the starting weights (a resumed run's checkpoint, versioned by its step); both go at the end.
    ``deploy`` / ``undeploy``: the reward service's (``services.reward.app.deploy_reward_service``,
    ``shutdown``; the job passes them, the library never imports the services)."""
    from whetstone.online.generation import GenerationPool

    config = run.config
    tag = f"{config.run_name}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    own_app = f"whetstone-reward-{tag}" if config.online.reward_model else None
    pool = None
    try:
        require_gpus(config)
        reward, reward_app, reward_url = _reward_client(config, f"whetstone-reward-{tag}", deploy)
        policy = config.policy if plan.resume_checkpoint is None else config.policy.model_copy(
            update={"path": plan.resume_checkpoint, "gguf_file": None, "tokenizer": None})
        online = config.online
        pool = GenerationPool.start(online.generation_actors, policy.model_dump(mode="json"),
                                    config.storage.resolved().to_wire(), generation_settings(config),
                                    num_cpus=online.generation_cpus, num_gpus=online.generation_gpus,
                                    name_prefix=f"whetstone-gen-{tag}", version=plan.resume_step)
        plan = plan.model_copy(update={"generation_actors": list(pool.names), "reward_app": reward_app,
                                       "reward_url": reward_url})
        print(f"[online] reward model on {'Serve app ' + reward_app if reward_app else reward_url}; "
              f"{len(pool.names)} generation actor(s) with weights v{plan.resume_step}; ready in "
              f"{run.timer.mark('online_start_s', started)} s", flush=True)
        yield OnlineServices(plan, pool, reward, reward.version())
    finally:
        if pool is not None:
            pool.shutdown()
        if own_app is not None:
            with contextlib.suppress(Exception):  # a deploy that failed may have left nothing to delete
                undeploy(own_app)


def held_out_before(run: Any, services: OnlineServices, selection: PairSelection,
                    plan: PreferenceRunPlan) -> dict[str, Any]:
    """The starting policy's greedy completions of the held-out prompts, scored (the baseline of
    the reward gain). A resumed run reads the first attempt's figures instead: its actors hold
    trained weights."""
    from whetstone.train.online_eval import greedy_rewards, summarise

    config = run.config
    uri = store.join(config.run_uri, BEFORE_FILE)
    if store.exists(uri, config.storage):
        return json.loads(store.read_bytes(uri, config.storage))
    if plan.resume_checkpoint is not None or not selection.eval_ids:
        return {}
    started = time.monotonic()
    prompts = [selection.prompts[i] for i in selection.eval_ids]
    rewards, tokens, texts = greedy_rewards(services.pool, services.reward, prompts)
    before = {**summarise(rewards, tokens), "rewards": rewards.tolist(),
              "examples": [{"prompt": p[-300:], "response": t} for p, t in zip(prompts[:3], texts[:3], strict=False)]}
    store.write_bytes(uri, json.dumps(before, indent=2).encode(), config.storage)
    print(f"[online] starting policy on {before['prompts']} held-out prompts: mean reward "
          f"{before['reward_mean']:+.4f} (std {before['reward_std']:.4f}), {before['response_tokens']:.1f} tokens per "
          f"greedy response ({time.monotonic() - started:.1f} s)", flush=True)
    return before


def _median(history: list[dict], key: str) -> float | None:
    values = [m[key] for m in history if key in m]
    return float(np.median(values)) if values else None


def online_report(config: PreferenceJobConfig, history: list[dict], before: dict, metrics: dict,
                  reward_model_version: str | None = None) -> dict[str, Any]:
    """The report's ``online`` section: rewards before and after, the gain in the starting
    policy's reward standard deviations, length, KL and where the time went."""
    after = {key[len("eval_"):]: metrics[key] for key in metrics if key.startswith("eval_")}
    gain = (after["reward_mean"] - before["reward_mean"]) if before and "reward_mean" in after else None
    std = before.get("reward_std") if before else None
    last = history[-1] if history else {}
    return {
        "loss": config.loss.name, "samples_per_prompt": config.online.samples_per_prompt,
        "reward_model": config.online.reward_model or config.online.reward_app or config.online.reward_url,
        "reward_model_version": reward_model_version,
        "sync_every": config.online.sync_every,
        "held_out_before": {k: before[k] for k in ("prompts", "reward_mean", "reward_std", "response_tokens")
                            if k in before},
        "held_out_after": after,
        "reward_gain": gain, "reward_gain_sd": (gain / std) if gain is not None and std else None,
        "mean_response_tokens_before": before.get("response_tokens") if before else None,
        "mean_response_tokens_after": after.get("response_tokens"),
        "kl_to_reference_final": after.get("kl_to_reference"),
        "train_kl_to_reference_last_step": last.get("kl_to_reference"),
        "train_reward_first_step": history[0].get("reward_mean") if history else None,
        "train_reward_last_step": last.get("reward_mean"),
        "policy_lag_max": max((m.get("policy_lag", 0.0) for m in history), default=0.0),
        "generate_s_per_step": _median(history, "generate_s"), "score_s_per_step": _median(history, "score_s"),
        "train_s_per_step": _median(history, "train_s"), "sync_s_per_step": _median(history, "sync_s"),
    }


def print_online_summary(section: dict[str, Any]) -> list[str]:
    """The summary lines of an online run."""
    lines = []
    before, after = section["held_out_before"], section["held_out_after"]
    if before and after:
        gain_sd = section["reward_gain_sd"]
        in_sd = f"{gain_sd:+.2f} sd" if gain_sd is not None else "the starting rewards have no spread"
        lines.append(f"held-out ({after.get('prompts')} prompts, greedy): reward {before['reward_mean']:+.4f} -> "
                     f"{after['reward_mean']:+.4f} (gain {in_sd}), response tokens "
                     f"{before['response_tokens']:.1f} -> {after['response_tokens']:.1f}, KL to reference "
                     f"{after['kl_to_reference']:.4f}")
    lines.append(f"per step: generate {section['generate_s_per_step']:.2f} s, score {section['score_s_per_step']:.2f} s, "
                 f"train {section['train_s_per_step']:.2f} s, weight push {section['sync_s_per_step']:.2f} s; "
                 f"weights lag at most {section['policy_lag_max']:.0f} step(s)")
    return lines
