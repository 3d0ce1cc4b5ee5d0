"""Config of the preference training job: DPO family / NS-DPO / SimPO / ORPO / NPO / KTO, a reward
model, or online training (the policy samples, a served reward model scores, the policy learns)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from whetstone.config.base import (
    MAX_FAILURES,
    MAX_FAILURES_HELP,
    RayTrainLogLevel,
    StorageConfig,
    StrictModel,
    TrackingConfig,
)
from whetstone.console import DEFAULT_EVERY_S, PROGRESS_EVERY_S_HELP

PolicyLossName = Literal["dpo", "ipo", "hinge", "cdpo", "ns_dpo", "simpo", "orpo", "npo", "kto", "grpo"]
# Losses that never look at the reference model: no precompute, no second model.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
# Losses mode=online trains with (on the policy's own samples, scored by the reward model).
ONLINE_LOSSES = ("dpo", "ipo", "kto", "grpo")


class PolicyConfig(StrictModel):
    """The causal LM to train (also the frozen reference: training starts from the reference)."""

    path: str = Field(..., description="HF model folder, a storage URI of one, or a folder holding a GGUF file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (transformers dequantises it)")
    tokenizer: str | None = Field(None, description="tokenizer folder; default: `path` (with gguf_file for GGUF)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the policy and the reference model are loaded and trained in "
        "(bfloat16: half the memory)")
    disable_dropout: bool = Field(True, description="DPO practice: dropout makes policy and reference log-probs "
                                                    "disagree even before the first update")
    chunk_size: int = Field(1024, ge=1, description="output-layer rows per chunk in the log-prob computation")


class LossConfig(StrictModel):
    """Which preference loss, with its arguments (see each loss's docstring for ranges)."""

    name: PolicyLossName = Field(
        "dpo", description="policy loss: dpo, ipo, hinge, cdpo (label_smoothing), ns_dpo (time-discounted), "
        "simpo and orpo (reference-free), npo (lowers the rejected responses' likelihood only), kto "
        "(unpaired: each response desirable or not; offline the chosen side is desirable, the rejected not), "
        "grpo (mode=online only). mode=online takes dpo / ipo (best vs worst of the k samples), kto or grpo")
    beta: float = Field(0.1, gt=0, description="DPO / KTO beta (IPO: tau; SimPO: beta about 2)")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable responses' losses")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable responses' losses")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo: label flip probability")
    target_margin: float = Field(1.0, ge=0, description="simpo: target reward margin gamma")
    gamma: float = Field(0.9, gt=0, le=1, description="ns_dpo: time discount; 1 equals DPO")
    time_column: str = Field("time", description="ns_dpo: timestamp column of the preference rows")
    time_step_seconds: float = Field(86400.0, gt=0, description="ns_dpo: one time step = this many seconds")
    missing_time: Literal["newest", "oldest"] = Field(
        "newest", description="ns_dpo: time step of pairs with no timestamp: the newest step (weight 1) "
                              "or the oldest one seen in the training pairs")
    min_weight: float = Field(0.0, ge=0, le=1, description="ns_dpo: drop pairs whose weight is below this")


class ReferenceConfig(StrictModel):
    mode: Literal["precompute", "on_the_fly"] = Field(
        "precompute", description="precompute: Ray Data batch inference once, joined by pair_id; "
                                  "on_the_fly: every worker holds a frozen copy")
    batch_size: int = Field(8, ge=1, description="pairs per batch in the precompute")
    concurrency: int = Field(1, ge=1, description="precompute actors (each loads the reference model)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per precompute actor")


class LoRAConfig(StrictModel):
    enabled: bool = Field(False, description="policy mode: train LoRA adapters (peft, the `lora` extra) "
                          "instead of every weight; saved models hold the merged weights")
    r: int = Field(8, ge=1, description="rank of the LoRA adapters")
    alpha: int = Field(16, ge=1, description="LoRA scaling: adapter outputs are multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA adapters' inputs")
    target_modules: list[str] | str = Field("all-linear", description="peft target_modules")


class OptimConfig(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray Train worker reserves")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    batch_size: int = Field(4, ge=1, description="pairs per worker per step")
    epochs: int = Field(1, ge=1, description="passes over the training pairs (max_steps can stop the run "
                        "earlier)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (None: epochs x steps "
                                  "per epoch)")
    lr: float = Field(5e-6, gt=0, lt=1, description="peak AdamW learning rate (linear warm-up, then linear "
                      "decay to 0); reward_model: the encoder's, its head trains at 30x")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the policy (mode=reward_model "
                                "uses 0.01)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the run's total steps over which the "
                                "learning rate rises linearly to lr")
    max_grad_norm: float = Field(1.0, gt=0, description="clip the gradients' global L2 norm to this before "
                                 "each optimiser step")
    seed: int = Field(0, description="torch seed (initial LoRA and reward-head weights) and the seed of the "
                      "pair shuffles")
    shuffle_buffer: int = Field(
        512, ge=0, description="rows in each worker's seeded local shuffle buffer (new batches every epoch)")
    log_every: int = Field(1, ge=1, description="print a progress line every N steps (the history keeps "
                           "every step)")
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps")
    eval_batch_size: int = Field(8, ge=1, description="held-out pairs per batch when each worker evaluates "
                                 "its eval shard after training")


class DataConfig(StrictModel):
    dataset: str = Field("train", description="preference split or dataset name, e.g. train or preference/test")
    eval_dataset: str | None = Field(None, description="held-out dataset name; None: hash split by eval_fraction")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of pairs held out (seeded hash of pair_id)")
    split_seed: int = Field(0, description="seed of the pair_id hash that splits train from eval and orders "
                            "the pairs for the max_train_pairs / max_eval_pairs caps")
    max_train_pairs: int | None = Field(None, ge=1, description="cap on training pairs (the lowest hashes)")
    max_eval_pairs: int | None = Field(None, ge=1, description="cap on held-out pairs (the lowest hashes)")
    max_length: int = Field(512, ge=8, description="tokens per row, prompt + completion; longer pairs lose "
                            "the prompt's start (down to max_prompt_length), then the completion's end")
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (its end) when prompt + "
                                   "completion exceed max_length")
    chat_template: bool = Field(False, description="render prompts (text or message lists) and completions "
                                "through the tokenizer's chat template")

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length})")
        return self


class LeakageConfig(StrictModel):
    """Near-duplicate prompts between train and eval, found by embedding and nearest-neighbour search."""

    mode: Literal["off", "report", "remove"] = Field("report", description="remove: drop flagged eval pairs")
    threshold: float = Field(0.95, gt=0, le=1, description="cosine at or above which an eval prompt leaks")
    encoder: str = Field("all-MiniLM-L6-v2", description="embedding model (path or the MiniLM alias)")
    max_length: int = Field(128, ge=8, le=512, description="tokens embedded per prompt (its opening)")
    batch_size: int = Field(64, ge=1, description="prompts per embedding batch")
    max_examples: int = Field(20, ge=0, description="flagged pairs listed in the report")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false; `leakage.mode: off` means the mode, not a boolean.
        return "off" if value is False else value


class RewardModelSection(StrictModel):
    """mode=reward_model: an encoder with a scalar head trained with the Bradley-Terry loss."""

    encoder: str = Field("all-MiniLM-L6-v2", description="encoder path or the MiniLM alias")
    max_length: int = Field(256, ge=8, le=512, description="tokens per cross-encoded (prompt, response) "
                            "input, special tokens included")
    max_prompt_length: int = Field(160, ge=1, description="prompt tokens kept (its end) when the response "
                                   "needs the room; the response keeps its start")
    pooling: Literal["mean", "response", "last"] = Field(
        "response", description="mean of the response segment's last hidden states (the prompt is shared by "
                                "both sides of a pair), `mean` of every token's, or `last`: the last non-pad "
                                "token's, as decoder LMs' *ForSequenceClassification score (the model is then "
                                "saved as that transformers class; the other poolings save with their modeling "
                                "code: from_pretrained(..., trust_remote_code=True))")
    gamma: float | None = Field(None, gt=0, le=1, description="optional NS time discount of the BT loss")


class OnlineConfig(StrictModel):
    """mode=online: generation actors sample from the policy, a Serve-hosted reward model scores, Train updates.

    Each step every worker takes ``optim.batch_size`` prompts, the generation actors sample
    ``samples_per_prompt`` completions for each with the policy's newest pushed weights, the reward
    model scores them over its Serve deployment handle, and the worker trains on them with
    ``loss.name``: dpo / ipo on the best and worst sample of each prompt, kto with samples above
    the prompt's mean reward desirable and those below not, grpo on every sample with
    group-normalised advantages. Every ``sync_every`` steps rank 0 pushes the weights to the
    actors through the object store, versioned by the step; the lag (steps the sampling weights
    are behind the trained ones) is reported every step and is at most ``sync_every - 1``.
    """

    reward_model: str | None = Field(None, description="reward model folder or URI (what mode=reward_model saves); "
                                     "the job serves it as a Ray Serve app for the run")
    reward_app: str | None = Field(None, description="name of a running Serve reward app (services.reward.app) to "
                                   "score with instead of serving reward_model")
    reward_url: str | None = Field(None, description="root URL of a running reward service to score with instead, "
                                   "e.g. http://host:8000/reward (its /score is called; the bearer token comes from "
                                   "$WHETSTONE_REWARD_TOKEN in the workers' environment: under ray job submit, "
                                   "put it in the runtime env)")
    reward_num_cpus: float = Field(0.5, gt=0, description="CPUs of the reward replica the job serves")
    reward_gpus: float = Field(0.0, ge=0, description="GPUs of the reward replica the job serves (it scores on "
                               "the GPU only when Ray gives it one)")
    reward_batch_size: int = Field(32, ge=1, description="(prompt, response) pairs per forward pass of the reward "
                                   "replica the job serves")
    samples_per_prompt: int = Field(4, ge=2, description="k: completions sampled per prompt")
    max_new_tokens: int = Field(64, ge=1, description="tokens sampled per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (GRPO's ratios use the same)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold (1: off)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens only (0: off)")
    generation_actors: int = Field(1, ge=1, description="generation actors (each holds a copy of the policy)")
    generation_cpus: float = Field(1.0, gt=0, description="CPUs each generation actor reserves (its torch threads)")
    generation_gpus: float = Field(0.0, ge=0, description="GPUs each generation actor reserves (0: CPU; set "
                                   "with optim.use_gpu)")
    generation_batch_size: int = Field(32, ge=1, description="sequences per generate() call")
    sync_every: int = Field(1, ge=1, description="K: push the policy's weights to the generation actors every K "
                            "steps (the sampling weights lag the trained ones by at most K - 1 steps)")
    grpo_epsilon: float = Field(0.2, gt=0, lt=1, description="grpo: clip range of the probability ratio")
    grpo_beta: float = Field(0.04, ge=0, description="grpo: weight of the per-token KL to the reference")
    grpo_loss_type: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        "grpo", description="grpo: how token losses are averaged: per sequence then over sequences (grpo), over "
        "every token of the batch (bnpo), or summed and divided by samples x max_new_tokens (dr_grpo, Dr. GRPO)")
    grpo_scale_rewards: bool = Field(True, description="grpo: divide advantages by the group's reward std "
                                     "(false: Dr. GRPO's mean-centred rewards)")
    length_penalty: float = Field(0.0, ge=0, description="subtract this times the response's tokens from its reward")
    length_normalise: bool = Field(False, description="remove the part of the reward a least-squares line on "
                                   "response length explains over the step's samples (a reward model that pays "
                                   "for length then cannot be gamed by length alone)")
    eval_prompts: int = Field(100, ge=0, description="held-out prompts completed greedily and scored before and "
                              "after training (the report's reward gain)")


class PreferenceJobConfig(StrictModel):
    """Train a policy on preference pairs (DPO family) or a reward model, on the Whetstone data plane."""

    mode: Literal["policy", "reward_model", "online"] = Field(
        "policy", description="policy: train policy.path with loss.name on stored pairs; reward_model: train "
        "reward_model.encoder with a scalar head (Bradley-Terry); online: train policy.path on its own "
        "samples scored by online.reward_model")
    run_name: str = Field(
        "preference", pattern=r"^[A-Za-z0-9_.-]+$", description="names the run: its outputs go to "
        "<store_uri>/runs/<run_name> unless output_uri is set")
    store_uri: str = Field(".whetstone/store", description="ingested store (local path or s3://)")
    output_uri: str | None = Field(None, description="run outputs; default <store_uri>/runs/<run_name>")
    storage: StorageConfig = StorageConfig()
    if_exists: Literal["error", "overwrite", "resume"] = Field(
        "error", description="when the run's outputs exist: error (refuse), overwrite (delete them first) or "
        "resume (from the newest complete checkpoint)")
    max_failures: int = Field(MAX_FAILURES, ge=-1, description=MAX_FAILURES_HELP)
    policy: PolicyConfig | None = None
    loss: LossConfig = LossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    lora: LoRAConfig = LoRAConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    leakage: LeakageConfig = LeakageConfig()
    reward_model: RewardModelSection = RewardModelSection()
    online: OnlineConfig = OnlineConfig()
    ray_num_cpus: int = Field(8, ge=1, description="logical CPUs when this job starts its own local Ray")
    ray_object_store_mb: int = Field(1024, ge=128, description="object store memory (MiB) when this job "
                                     "starts its own local Ray")
    ray_train_log_level: RayTrainLogLevel = Field(
        "WARNING", description="console level of Ray Train's own logs (INFO: its per-step report lines too)")
    tracking: TrackingConfig = TrackingConfig()
    progress_every_s: float = Field(DEFAULT_EVERY_S, ge=0, description=PROGRESS_EVERY_S_HELP)

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceJobConfig:
        if self.mode in ("policy", "online") and self.policy is None:
            raise ValueError(f"policy: required when mode={self.mode} (policy.path = a causal LM)")
        if self.mode == "online":
            self._check_online()
        elif self.loss.name == "grpo":
            raise ValueError("loss.name=grpo needs mode=online: GRPO learns from the policy's own samples")
        if self.mode == "policy" and self.loss.name == "kto" and self.reference.mode == "precompute":
            raise ValueError("loss.name=kto: set reference.mode=on_the_fly (KTO's reference point scores "
                             "mismatched prompt / response pairs, which the precompute does not)")
        if self.data.eval_dataset is None and self.data.eval_fraction == 0 and self.leakage.mode != "off":
            raise ValueError("leakage.mode needs held-out pairs: set data.eval_fraction or data.eval_dataset")
        if self.loss.name != "cdpo" and self.loss.label_smoothing:
            raise ValueError(f"loss.label_smoothing applies to loss.name=cdpo, not {self.loss.name}")
        return self

    def _check_online(self) -> None:
        if self.loss.name not in ONLINE_LOSSES:
            raise ValueError(f"loss.name: mode=online trains with {', '.join(ONLINE_LOSSES)}, not {self.loss.name}")
        sources = [name for name in ("reward_model", "reward_app", "reward_url") if getattr(self.online, name)]
        if len(sources) != 1:
            raise ValueError("online: set exactly one of online.reward_model (a reward model folder or URI the job "
                             f"serves), online.reward_app or online.reward_url; got {sources or 'none'}")
        if self.lora.enabled:
            raise ValueError("lora.enabled: mode=online pushes whole weights to the generation actors; "
                             "LoRA is not supported there yet")
        every, sync = self.optim.checkpoint_every, self.online.sync_every
        if every and every % sync:
            raise ValueError(f"optim.checkpoint_every ({every}) must be a multiple of online.sync_every ({sync}): "
                             "a run resumed from a checkpoint between two weight pushes would sample with other "
                             "weights than the uninterrupted run did")

    @property
    def needs_reference(self) -> bool:
        if self.mode == "online":
            return True  # the KL to the reference is reported every step, whatever the loss
        return self.mode == "policy" and self.loss.name not in REFERENCE_FREE_LOSSES

    @property
    def run_uri(self) -> str:
        from whetstone.storage import join

        return self.output_uri or join(self.store_uri, "runs", self.run_name)
