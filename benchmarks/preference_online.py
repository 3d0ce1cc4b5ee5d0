"""Online preference training benchmark: online DPO and GRPO against offline DPO, same update budget.

What runs, in one local Ray session, through the preference job itself (``jobs.train_preference``):

1. ingest: the hh-rlhf harmless-base pairs of ``../shared`` (2,312; 4 cannot be split and are
   kept aside) into a store under the run folder; train / held-out split by the job's seeded
   pair-id hash (``data.eval_fraction``), the same split in every run below;
2. reward model: ``mode=reward_model`` (all-MiniLM-L6-v2 + scalar head, Bradley-Terry) on the
   train pairs only (cached under ``.whetstone/cache`` by its settings: it is the fixed judge,
   not what is measured);
3. policy runs from SmolLM2-135M-Instruct (policy and reference), each ``--steps`` policy
   updates of ``--prompts`` prompts (pairs for offline DPO) on 1 worker:
   ``mode=online loss=dpo`` (best vs worst of k samples), ``mode=online loss=grpo``,
   ``mode=policy loss=dpo`` on the stored pairs, and GRPO again with ``online.length_normalise``
   (the length guard: what the gain is once length cannot buy reward);
4. evaluation, the same code for all (``whetstone.train.online_eval``): the first 100 held-out
   prompts (never trained on, never seen by the reward model), one greedy completion each from the
   starting policy and from each final policy, scored by the reward model; the gain is in units
   of the reward's standard deviation over the starting policy's completions. KL to the
   reference: one sampled completion per held-out prompt, the per-token k3 estimate summed over its
   tokens (never negative, unbiased; ``whetstone.online.batch.sequence_kl``), averaged.

Peak memory is sampled over every process of the run (driver, Ray daemons, Train workers,
generation actors, the Serve replica). The host is shared: the load average is recorded.

Usage::

    python -m benchmarks.preference_online                 # about 80 minutes on 2 cores
    python -m benchmarks.preference_online --steps 2 --eval-prompts 8 --max-pairs 300   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "preference" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
RESULTS = REPO / "benchmarks" / "results" / "preference_online.json"
CACHE = REPO / ".whetstone" / "cache"
GOAL_GAIN_SD, GOAL_RATIO = 0.5, 1.0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ingest(store: Path) -> dict:
    from jobs.ingest import main as ingest_main

    if (store / "manifest.json").exists():
        return {"reused": True}
    return ingest_main(["source=" + str(HH_RLHF), "format=hh-rlhf", "dataset_name=preference/test",
                        f"store_uri={store}", "rows_per_shard=1000"])


def common(args, store: Path, run_name: str) -> list[str]:
    """Settings every job of the benchmark shares: store, split, lengths, one worker."""
    return [f"store_uri={store}", f"run_name={run_name}", "if_exists=overwrite", "data.dataset=preference/test",
            f"data.eval_fraction={args.eval_fraction}", "data.split_seed=0", "leakage.mode=off",
            "optim.num_workers=1", "optim.cpus_per_worker=1", "optim.log_every=1", "progress_every_s=30",
            "tracking.tensorboard=false", "ray_num_cpus=8", "ray_object_store_mb=1536"] + (
        [f"data.max_train_pairs={args.max_pairs}"] if args.max_pairs else [])


def reward_model(args, store: Path) -> tuple[str, dict]:
    """The judge: trained once per settings and cached (its folder, its report)."""
    from jobs.train_preference import main as train_main

    settings = ["mode=reward_model", "reward_model.max_length=160", "reward_model.max_prompt_length=64",
                f"optim.epochs={args.rm_epochs}", "optim.batch_size=16", "optim.lr=3e-5", "optim.warmup_ratio=0.1",
                "optim.eval_batch_size=32"] + ([f"data.max_train_pairs={args.max_pairs}"] if args.max_pairs else [])
    key = "-".join(s.split("=")[-1] for s in settings).replace("/", "_")
    cached = CACHE / f"reward-model-hh-rlhf-{key}"
    if (cached / "report.json").exists():
        return str(cached / "model"), json.loads((cached / "report.json").read_text())
    report = train_main(common(args, store, "reward-model") + settings)
    staging = cached.with_suffix(".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(report["model_uri"], staging / "model")
    (staging / "report.json").write_text(json.dumps(report))
    staging.rename(cached)
    return str(cached / "model"), report


def policy_settings(args, policy: str) -> list[str]:
    return [f"policy.path={policy}", "data.chat_template=true", f"data.max_prompt_length={args.max_prompt_tokens}",
            f"data.max_length={args.max_prompt_tokens + args.max_new_tokens}", f"optim.max_steps={args.steps}",
            f"optim.batch_size={args.prompts}", "optim.warmup_ratio=0.0", "optim.eval_batch_size=25",
            "reference.mode=on_the_fly"]


def online_run(args, store: Path, policy: str, reward: str, loss: str, run_name: str, *extra_settings: str) -> dict:
    from jobs.train_preference import main as train_main

    extra = {"dpo": [f"optim.lr={args.dpo_lr}", "loss.beta=0.1"],
             "grpo": [f"optim.lr={args.grpo_lr}", f"online.grpo_beta={args.grpo_beta}"]}[loss]
    return train_main(common(args, store, run_name) + policy_settings(args, policy) + extra + list(extra_settings) + [
        "mode=online", f"loss.name={loss}", f"online.reward_model={reward}",
        f"online.samples_per_prompt={args.k}", f"online.max_new_tokens={args.max_new_tokens}",
        f"online.eval_prompts={args.eval_prompts}", "online.generation_cpus=1", "online.reward_num_cpus=0.5"])


def offline_run(args, store: Path, policy: str) -> dict:
    from jobs.train_preference import main as train_main

    return train_main(common(args, store, "offline-dpo") + policy_settings(args, policy) + [
        "mode=policy", "loss.name=dpo", "loss.beta=0.1", f"optim.lr={args.dpo_lr}",
        f"data.max_eval_pairs={max(args.eval_prompts, 1)}"])


class LocalReward:
    """The reward model in this process, with the reward client's ``score`` signature."""

    def __init__(self, folder: str) -> None:
        from whetstone.models.reward import RewardModel

        self.model = RewardModel.load(folder)

    def score(self, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, str]:
        return self.model.score(prompts, responses, batch_size=32), "local"


def held_out_prompts(args, store: Path, policy: str) -> tuple[list[str], dict]:
    """The held-out prompts the online jobs evaluate on (the first eval pairs by hash), and the config."""
    from whetstone.config.preference import PreferenceJobConfig
    from whetstone.train.preference_data import select_pairs

    config = PreferenceJobConfig.model_validate({
        "store_uri": str(store), "policy": {"path": policy}, "leakage": {"mode": "off"}, "mode": "online",
        "data": {"dataset": "preference/test", "eval_fraction": args.eval_fraction, "split_seed": 0,
                 "max_prompt_length": args.max_prompt_tokens, "max_length": args.max_prompt_tokens + args.max_new_tokens,
                 "chat_template": True},
        "online": {"max_new_tokens": args.max_new_tokens, "reward_model": "judge"}})
    selection = select_pairs(config)
    return [selection.prompts[i] for i in selection.eval_ids[: args.eval_prompts]], config


def evaluate(prompts: list[str], config, reward: LocalReward, reference, models: dict[str, str]) -> dict:
    """What the online job's own held-out evaluation computes (the same functions), for models
    trained elsewhere: greedy rewards and lengths on the held-out prompts, the sampled KL."""
    from whetstone.config.preference import PolicyConfig
    from whetstone.online.generation import GenerationPool
    from whetstone.train.online_eval import greedy_rewards, sampled_kl, summarise
    from whetstone.train.online_run import generation_settings

    model, tokenizer = reference
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for name, folder in models.items():
        started = time.monotonic()
        pool = GenerationPool.start(1, PolicyConfig(path=folder).model_dump(mode="json"), None,
                                    generation_settings(config), num_cpus=1.0, name_prefix=f"bench-eval-{name}")
        try:
            rewards, tokens, texts = greedy_rewards(pool, reward, prompts)
            kl = sampled_kl(pool, prompts, model, pad, 1024, 1.0)
        finally:
            pool.shutdown()
        out[name] = {**summarise(rewards, tokens), "kl_to_reference": float(np.mean(kl)),
                     "examples": [{"prompt": p[-200:], "response": t} for p, t in zip(prompts[:2], texts[:2],
                                                                                     strict=False)],
                     "seconds": round(time.monotonic() - started, 1), "evaluated_by": "benchmark"}
        print(f"[bench] {name}: mean reward {out[name]['reward_mean']:+.4f} (std {out[name]['reward_std']:.4f}), "
              f"{out[name]['response_tokens']:.1f} tokens, KL {out[name]['kl_to_reference']:.4f}", flush=True)
    return out


def from_job(report: dict, which: str) -> dict:
    """An online job's own held-out figures (``held_out_before`` / ``held_out_after``)."""
    figures = dict(report["online"][which])
    figures.setdefault("kl_to_reference", 0.0)  # before training the policy is the reference
    return {**figures, "evaluated_by": "job"}


def summarise_runs(args, evals: dict, reports: dict, memory_gib: float, rm_report: dict) -> dict:
    """Gains in standard deviations of the starting policy's held-out rewards. The online runs'
    figures come from the job's own evaluation, before and after; offline DPO's from the same
    functions run here, against the starting policy evaluated here too (``start_benchmark_eval``:
    it differs from the job's start only by how the prompts were batched)."""
    start = evals["start"]
    sd = start["reward_std"] or float("nan")
    gain = {name: (evals[name]["reward_mean"] - evals["start_benchmark_eval" if name == "offline-dpo" else
                                                      "start"]["reward_mean"]) / sd for name in reports}
    better = max(("online-dpo", "grpo"), key=lambda name: gain[name])
    ratio = gain[better] / gain["offline-dpo"] if gain["offline-dpo"] > 0 else None
    timing = reports[better]["online"]
    return {
        "online_dpo_reward_gain_sd": round(gain["online-dpo"], 4), "grpo_reward_gain_sd": round(gain["grpo"], 4),
        "offline_dpo_reward_gain_sd": round(gain["offline-dpo"], 4),
        "online_vs_offline_reward_gain_ratio": round(ratio, 4) if ratio is not None else None,
        "better_online_method": better,
        "kl_to_reference_final": round(evals[better]["kl_to_reference"], 4),
        "kl_to_reference_final_per_method": {name: round(evals[name]["kl_to_reference"], 4) for name in reports},
        "mean_response_tokens_before": round(start["response_tokens"], 2),
        "mean_response_tokens_after": round(evals[better]["response_tokens"], 2),
        "mean_response_tokens_after_per_method": {name: round(evals[name]["response_tokens"], 2) for name in reports},
        "start_reward_mean_job_vs_benchmark_eval": [round(start["reward_mean"], 4),
                                                    round(evals["start_benchmark_eval"]["reward_mean"], 4)],
        "generate_s_per_step": round(timing["generate_s_per_step"], 3),
        "score_s_per_step": round(timing["score_s_per_step"], 4),
        "train_s_per_step": round(timing["train_s_per_step"], 3),
        "offline_dpo_train_s_per_step": round(reports["offline-dpo"]["timings_s"]["train_s"] / args.steps, 3),
        "peak_memory_gib": round(max([memory_gib] + [r["peak_memory_gib"] for r in reports.values()]), 2),
        "reward_gain_goal": f">= {GOAL_GAIN_SD} sd for the better online method",
        "reward_gain_goal_met": gain[better] >= GOAL_GAIN_SD,
        "ratio_goal": f">= {GOAL_RATIO}", "ratio_goal_met": ratio is not None and ratio >= GOAL_RATIO,
        "reward_model_heldout_accuracy": rm_report.get("eval", {}).get("eval_reward_accuracy"),
        "policy_updates_per_method": args.steps,
        **({"grpo_length_normalised_reward_gain_sd": round(gain["grpo-length-normalised"], 4),
            "grpo_length_normalised_response_tokens_after": round(evals["grpo-length-normalised"]["response_tokens"], 2),
            "grpo_length_normalised_kl_to_reference": round(evals["grpo-length-normalised"]["kl_to_reference"], 4)}
           if "grpo-length-normalised" in reports else {}),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="policy updates per method")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (offline: pairs) per update")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (online)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--max-pairs", type=int, default=None, help="cap on training pairs (quick looks)")
    parser.add_argument("--rm-epochs", type=int, default=1)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--grpo-lr", type=float, default=5e-5)
    parser.add_argument("--grpo-beta", type=float, default=0.04)
    parser.add_argument("--run-dir", default=str(REPO / ".whetstone" / "bench" / "preference_online"))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--methods", default="online-dpo,grpo,offline-dpo,grpo-length-normalised",
                        help="the last is GRPO with online.length_normalise=true: the length guard")
    parser.add_argument("--reuse-runs", action="store_true", help="take a method's finished run from the run "
                        "folder instead of training it again (re-evaluate, re-summarise)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from whetstone.train.memory import MemorySampler
    from whetstone.train.preference import load_policy

    from benchmarks.preference import smollm_hf_folder

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # this process's tree: it starts the local Ray, so the Ray daemons, Train workers, generation
    # actors and the Serve replica are all in it (other clusters on the host are not)
    memory = MemorySampler().start()
    started, load = time.monotonic(), {"start": load_average()}
    run_dir = Path(args.run_dir)
    store = run_dir / "store"
    ingest(store)
    policy = smollm_hf_folder()
    reward_folder, rm_report = reward_model(args, store)
    load["after_reward_model"] = load_average()
    runners = {"online-dpo": lambda: online_run(args, store, policy, reward_folder, "dpo", "online-dpo"),
               "grpo": lambda: online_run(args, store, policy, reward_folder, "grpo", "online-grpo"),
               "grpo-length-normalised": lambda: online_run(args, store, policy, reward_folder, "grpo",
                                                            "online-grpo-length-normalised",
                                                            "online.length_normalise=true"),
               "offline-dpo": lambda: offline_run(args, store, policy)}
    reports, seconds = {}, {}
    online = [name for name in args.methods.split(",") if name != "offline-dpo"]
    run_names = {"online-dpo": "online-dpo", "grpo": "online-grpo", "offline-dpo": "offline-dpo",
                 "grpo-length-normalised": "online-grpo-length-normalised"}
    for name in args.methods.split(","):
        t = time.monotonic()
        done = store / "runs" / run_names[name] / "report.json"
        reports[name] = json.loads(done.read_text()) if args.reuse_runs and done.exists() else runners[name]()
        seconds[name] = round(time.monotonic() - t, 1)
        load[f"after_{name}"] = load_average()
    evals = {"start": from_job(reports[online[0]], "held_out_before")} if online else {}
    evals.update({name: from_job(reports[name], "held_out_after") for name in online})
    if "offline-dpo" in reports:  # the same evaluation, run here on the offline run's final model
        from whetstone.config.preference import PolicyConfig

        prompts, config = held_out_prompts(args, store, policy)
        reference = load_policy(PolicyConfig(path=policy), None)
        reference[0].eval()
        evals.update(evaluate(prompts, config, LocalReward(reward_folder), reference,
                              {"start_benchmark_eval": policy, "offline-dpo": reports["offline-dpo"]["model_uri"]}))
    load["end"] = load_average()
    results = {"summary": summarise_runs(args, evals, reports, memory.stop() / 1024**3, rm_report),
               "evaluation": evals, "job_reports": {name: r.get("online", r.get("eval")) for name, r in reports.items()},
               "run_seconds": seconds, "settings": vars(args), "load_average": load,
               "host": f"{platform.node()} ({os.cpu_count()} CPUs)", "total_s": round(time.monotonic() - started, 1),
               "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2))
    print_table(results["summary"])
    return results


def print_table(summary: dict) -> None:
    print("\n| figure | value |\n|---|---|")
    for key, value in summary.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
