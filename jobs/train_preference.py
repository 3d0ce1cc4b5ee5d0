"""Preference training on the data plane: the DPO family, NS-DPO, SimPO, ORPO, NPO, KTO, a reward
model, or online training on the policy's own samples (online DPO / IPO, GRPO, KTO).

What it does, top to bottom:
  1. reads the preference pairs' ids and prompts from the store and splits train / eval by a
     seeded hash of ``pair_id`` (or takes a named eval dataset); pairs ingest could not split
     (hh-rlhf) were kept aside in quarantine and are counted in the report;
  2. leakage guard: embeds the prompts (MiniLM), indexes the train prompts (FAISS) and reports,
     or removes, eval pairs whose prompt has a near-duplicate in training;
  3. reference log-probs: Ray Data batch inference runs the frozen reference model over every
     selected pair ONCE; the small result is joined to the streamed pairs by ``pair_id``, so no
     worker holds the reference (``reference.mode=on_the_fly`` keeps a frozen copy per worker);
  4. trains with a Ray Train ``TorchTrainer``: each worker streams its shard, tokenises the pairs
     (prompt masked out), computes chosen and rejected log-probs in ONE forward with chunked
     output-layer log-probs, applies the loss and AdamW; NS-DPO's time weights are normalised
     over the global batch (the loss all-reduces their sum);
  5. evaluates on the held-out pairs (reward accuracy, margin), checkpoints the policy in HF
     format, writes a JSON report and a PNG plot (the last printed line is the report's path).
  ``mode: reward_model`` trains an encoder + scalar head with the Bradley–Terry loss instead.
  ``mode: online`` (``whetstone.train.online_worker``) takes only the pairs' prompts: generation
  actors sample ``online.samples_per_prompt`` answers per prompt with the newest pushed weights,
  the reward model (``online.reward_model``, served by Ray Serve for the run) scores them, the
  workers train with ``loss.name`` = dpo / ipo (best vs worst), kto or grpo, and rank 0 pushes the
  weights to the actors every ``online.sync_every`` steps; held-out prompts get greedy answers,
  scored before and after training.

Checkpoints (``optim.checkpoint_every`` steps, and ``final``) hold the weights, the optimiser's and
LR schedule's state and the data position; ``if_exists=resume`` continues a killed run from its
newest complete one: same weights, same AdamW moments, same LR, the batches it had not trained yet.

Papers: DPO (arXiv 2305.18290); IPO (2310.12036); NS-DPO (2407.18676); SimPO (2405.14734);
ORPO (2403.07691); NPO (2404.05868); KTO (2402.01306); online DPO (2402.04792); GRPO (2402.03300);
reward models as in InstructGPT (2203.02155).

Launch:
  local:           python -m jobs.ingest --config jobs/configs/ingest/hh_rlhf.yaml
                   python -m jobs.train_preference --config jobs/configs/train_preference/hh-rlhf.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.train_preference \
                       --config jobs/configs/train_preference/hh-rlhf.yaml
  KubeRay:         a RayJob whose entrypoint is the line above (see k8s/ray-job.*.yaml)
"""

from __future__ import annotations

from typing import Any

import ray.train
from whetstone.config.preference import PreferenceJobConfig
from whetstone.train.plan import PreferenceRunPlan
from whetstone.train.preference_run import (
    DriverRun,
    finish_run,
    fit,
    plan_training,
    precompute_reference,
    select_and_guard,
    start_run,
)
from whetstone.train.preference_worker import (
    after_step,
    finish_worker,
    preference_step,
    reward_step,
    setup_policy_run,
    setup_reward_run,
    train_batches,
)
from whetstone.train.progress import apply_train_log_level
from whetstone.train.runtime import parse_job_args


def train_loop_per_worker(raw_config: dict[str, Any]) -> None:
    config = PreferenceJobConfig.model_validate(raw_config["job"])
    plan = PreferenceRunPlan.model_validate(raw_config["plan"])  # steps, time steps, outputs, resume point
    apply_train_log_level(config.ray_train_log_level)
    if config.mode == "reward_model":
        return reward_loop_per_worker(config, plan)
    if config.mode == "online":
        return online_loop_per_worker(config, plan)
    # Policy (a checkpoint's weights when resuming), DDP, AdamW over DDP's parameters, LR schedule,
    # their saved state, then the frozen reference copy (reference.mode=on_the_fly only).
    worker = setup_policy_run(config, plan)
    shard, state, metrics = ray.train.get_dataset_shard("train"), worker.start, {}
    for epoch, state, raw in train_batches(shard, config, plan, worker.start, worker.rank):
        values = preference_step(worker, raw, config, plan)  # forward (chosen + rejected), loss, backward, AdamW
        metrics = worker.log.step(state.step, epoch, worker.lr(), values)  # averaged over workers; rank 0 prints
        after_step(worker, metrics, state, config, plan)  # report; rank 0 checkpoints every optim.checkpoint_every
    finish_worker(worker, metrics, state, config, plan)  # history, held-out eval, the `final` checkpoint


def reward_loop_per_worker(config: PreferenceJobConfig, plan: PreferenceRunPlan) -> None:
    """mode=reward_model: encoder + scalar head, Bradley–Terry loss, same data, reporting and checkpoints."""
    worker = setup_reward_run(config, plan)
    shard, state, metrics = ray.train.get_dataset_shard("train"), worker.start, {}
    for epoch, state, raw in train_batches(shard, config, plan, worker.start, worker.rank):
        values = reward_step(worker, raw, config, plan)  # chosen and rejected scored in one forward
        metrics = worker.log.step(state.step, epoch, worker.lr(), values)
        after_step(worker, metrics, state, config, plan)
    finish_worker(worker, metrics, state, config, plan)


def online_loop_per_worker(config: PreferenceJobConfig, plan: PreferenceRunPlan) -> None:
    """mode=online: the prompts stream in; the generation actors sample, the Serve reward model
    scores, the worker trains and (every online.sync_every steps) pushes its weights to the actors."""
    from whetstone.train.online_worker import online_step, setup_online_run

    worker = setup_online_run(config, plan)  # policy, DDP, AdamW, reference; actors get these weights
    shard, state, metrics = ray.train.get_dataset_shard("train"), worker.start, {}
    for epoch, state, raw in train_batches(shard, config, plan, worker.start, worker.rank):
        values = online_step(worker, raw, config, state.step)  # generate, score, loss, AdamW, push
        metrics = worker.log.step(state.step, epoch, worker.lr(), values)
        after_step(worker, metrics, state, config, plan)
    finish_worker(worker, metrics, state, config, plan)  # greedy held-out rewards, KL, the `final` checkpoint


def run(config: PreferenceJobConfig) -> dict:
    """The driver, stage by stage; returns the report (also at ``<run_uri>/report.json``)."""
    driver = start_run(config)  # absolute paths, resolved config logged, Ray, if_exists, resume point, tracking
    with driver.tracking:  # the MLflow run ends FAILED if a stage raises
        return stages(driver)


def stages(driver: DriverRun) -> dict:
    """Everything after the start, in order (see the module docstring)."""
    if driver.config.mode == "online":
        return online_stages(driver)
    selection, leakage = select_and_guard(driver)  # train/eval split by pair_id hash; leakage guard
    reference, reference_uri = precompute_reference(driver, selection)  # Ray Data batch inference, once
    plan, datasets = plan_training(driver, selection, reference)  # PreferenceRunPlan + Ray Datasets
    metrics = fit(driver, plan, datasets, train_loop_per_worker)  # TorchTrainer(...).fit()
    return finish_run(driver, selection, leakage, reference_uri, plan, metrics)  # plot, report, summary


def online_stages(driver: DriverRun) -> dict:
    """mode=online: the prompts of the train pairs, the held-out prompts of the eval pairs; the
    reward service and the generation actors live for the duration of the fit."""
    from whetstone.train.online_run import held_out_before, held_out_prompts, online_services

    from services.reward.app import deploy_reward_service, shutdown

    selection, leakage = select_and_guard(driver)
    selection = held_out_prompts(driver.config, selection)  # the first online.eval_prompts eval pairs
    plan, datasets = plan_training(driver, selection, None)
    with online_services(driver, plan, deploy_reward_service, shutdown) as services:  # Serve reward app, generation actors (named, in the plan)
        plan = services.plan  # with the actors' names and the reward app
        before = held_out_before(driver, services, selection, plan)  # greedy rewards of the starting policy
        metrics = fit(driver, plan, datasets, train_loop_per_worker)
    return finish_run(driver, selection, leakage, None, plan, metrics,
                      {"before": before, "reward_model_version": services.reward_version})


def main(argv: list[str] | None = None) -> dict:
    return run(parse_job_args(PreferenceJobConfig, argv, __doc__))


if __name__ == "__main__":
    main()
