"""Online preference training, generation side: Ray actors that sample k completions per prompt
from the current policy, and the weight sync that keeps them on the trainer's weights.

Each :class:`GenerationActor` holds one copy of the policy (eval mode, KV cache) and samples with
transformers' ``generate`` on left-padded batches; with every sampled token it returns that
token's log-prob under the generating weights at the sampling temperature, which the GRPO loss
needs as its "old" policy and which is cheap here (generate computes the logits anyway; keeping
them costs batch_size x max_new_tokens x vocabulary floats per call).
:class:`GenerationPool` starts named actors, splits prompts across them and merges their answers;
the trainer pushes its weights with :meth:`GenerationPool.push_weights` (one ``ray.put``, every
actor loads the same object), each push carrying a version so every batch of samples says which
weights made it and the trainer can report the lag.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from whetstone.config.base import ConfigError, StorageConfig, StrictModel
from whetstone.config.preference import PolicyConfig
from whetstone.models.policy import truncate_prompt

DEFAULT_NAME_PREFIX = "whetstone-generation"


class GenerationSettings(StrictModel):
    """How the generation actors sample."""

    max_new_tokens: int = Field(64, ge=1, description="tokens sampled per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the returned log-probs are "
                                                      "log_softmax(logits / temperature)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1: off)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens only (0: off)")
    max_prompt_length: int = Field(256, ge=1, description="prompt tokens kept (the END of a longer prompt, "
                                                          "a leading BOS kept)")
    chat_template: bool = Field(False, description="render prompts through the tokenizer's chat template "
                                                   "(hh-rlhf dialogues become chat turns)")
    batch_size: int = Field(32, ge=1, description="sequences per generate call; the logits of one call "
                                                  "take batch_size x max_new_tokens x vocabulary x 4 bytes")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when Ray gave the actor a GPU (outside Ray: when one is visible)")


def render_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool,
                   max_prompt_length: int) -> list[list[int]]:
    """Prompt token ids, as the offline preference batches tokenise prompts.

    With ``chat_template`` an hh-rlhf dialogue (``"\\n\\nHuman: ... \\n\\nAssistant:"``) becomes
    chat turns and other text one user message, rendered with the generation prompt; without it
    the text is tokenised with the tokenizer's special tokens. Prompts longer than
    ``max_prompt_length`` keep their end (see :func:`whetstone.models.policy.truncate_prompt`).

    Raises:
        ValueError: a prompt is not text, or renders to no tokens (naming its row).
    """
    from whetstone.models.policy import _render_chat
    from whetstone.train.preference import chat_inputs

    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{row}] must be text, got {type(prompt).__name__}")
    if chat_template:
        messages, _, _ = chat_inputs(list(prompts), [], [])
        texts = [_render_chat(tokenizer, message, [], row)[0] for row, message in enumerate(messages)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template places BOS
    else:
        ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    out = [truncate_prompt(row_ids, max_prompt_length, tokenizer.bos_token_id) for row_ids in ids]
    for row, row_ids in enumerate(out):
        if not row_ids:
            raise ValueError(f"prompts[{row}] renders to no tokens; an empty prompt cannot be continued")
    return out


@dataclass
class Samples:
    """k completions per prompt and what the trainer needs to score and learn from them.

    Attributes:
        prompt_ids: P prompt token lists, as rendered and truncated for generation.
        completion_ids: P x k sampled token lists, up to and including the stop token where the
            model stopped (``finished``); never padding.
        texts: P x k completions decoded without special tokens, stripped.
        finished: P x k, True where the completion ended with a stop (EOS) token, False where it
            ran to ``max_new_tokens``.
        logps: P x k x tokens, the log-prob of each sampled token under the generating weights,
            log_softmax(logits / temperature), before any top-p/top-k filtering.
        version: the weights version that generated every sample.
        seconds: wall-clock seconds the generation took.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[list[int]]]
    texts: list[list[str]]
    finished: list[list[bool]]
    logps: list[list[list[float]]]
    version: int
    seconds: float

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def concat(cls, parts: Sequence[Samples], seconds: float) -> Samples:
        """The parts' prompts in order, as one batch.

        Raises:
            RuntimeError: the parts were generated by different weight versions.
        """
        versions = sorted({part.version for part in parts})
        if len(versions) > 1:
            raise RuntimeError(f"generation actors answered with different weight versions {versions}; "
                               "push_weights must reach every actor before the next generate")
        names = ("prompt_ids", "completion_ids", "texts", "finished", "logps")
        merged: dict[str, list] = {name: [] for name in names}
        for part in parts:
            for name, values in merged.items():
                values.extend(getattr(part, name))
        if not versions:
            raise ValueError("Samples.concat needs one or more parts")
        return cls(**merged, version=versions[0], seconds=seconds)


class GenerationActor:
    """One copy of the policy that samples completions; wrap with ``ray.remote`` (the pool does).

    Args:
        policy: a :class:`whetstone.config.preference.PolicyConfig`, dumped (JSON-safe dict).
        storage: a :class:`whetstone.config.base.StorageConfig` as ``storage.resolved().to_wire()``
            (``model_dump(mode="json")`` masks the secrets), for a policy on object storage.
        settings: :class:`GenerationSettings`, dumped.
        version: the version of the weights it loads.
    """

    def __init__(self, policy: dict, storage: dict | None, settings: dict, version: int = 0) -> None:
        from whetstone.train.preference import load_policy

        self.settings = GenerationSettings.model_validate(settings)
        _set_threads_from_ray()
        model, self.tokenizer = load_policy(PolicyConfig.model_validate(policy),
                                            StorageConfig.model_validate(storage) if storage else None)
        self.device = pick_device(self.settings.device)
        self.model = model.to(self.device).eval()
        self.stop_ids = _stop_token_ids(self.tokenizer, self.model)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.stop_ids[0]  # pad = EOS when there is no pad
        _check_positions(self.model, self.settings)
        self._version = int(version)

    def version(self) -> int:
        """The version of the weights it holds."""
        return self._version

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load the trainer's weights (every key, strictly) and take their version; returns it."""
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=True)
        self._version = int(version)
        return self._version

    def generate(self, prompts: list[str], k: int, seed: int, greedy: bool = False) -> Samples:
        """Sample ``k`` completions of each prompt (greedy: one, the argmax continuation, whatever k).

        Sampling is seeded: the same prompts, k, seed and weights give the same samples. Prompts
        are sorted by length into left-padded batches of ``settings.batch_size`` sequences (less
        padding) and the answers put back in the prompts' order. The log-probs are at
        ``settings.temperature`` in greedy mode too.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        start = time.perf_counter()
        prompt_ids = render_prompts(self.tokenizer, prompts, self.settings.chat_template,
                                    self.settings.max_prompt_length)
        copies = 1 if greedy else k
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        rows = [i for i in order for _ in range(copies)]  # prompt index of each sequence
        results: list[tuple[list[int], bool, list[float]]] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)  # generate takes no Generator: seed the (forked) global RNG
            for begin in range(0, len(rows), self.settings.batch_size):
                batch = [prompt_ids[i] for i in rows[begin:begin + self.settings.batch_size]]
                results.extend(self._generate_batch(batch, greedy))
        per_prompt: list[list[tuple[list[int], bool, list[float]]]] = [[] for _ in prompt_ids]
        for prompt, result in zip(rows, results, strict=True):
            per_prompt[prompt].append(result)
        completions = [[ids for ids, _, _ in answers] for answers in per_prompt]
        return Samples(
            prompt_ids=prompt_ids,
            completion_ids=completions,
            texts=[[text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
                   for ids in completions],
            finished=[[done for _, done, _ in answers] for answers in per_prompt],
            logps=[[logps for _, _, logps in answers] for answers in per_prompt],
            version=self._version,
            seconds=time.perf_counter() - start,
        )

    def _generate_batch(self, prompts: list[list[int]],
                        greedy: bool) -> list[tuple[list[int], bool, list[float]]]:
        """One ``generate`` call on left-padded prompts; (completion ids, finished, log-probs) per row."""
        settings = self.settings
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, L)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        sampling = ({"do_sample": False} if greedy else
                    {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k})
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=settings.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            use_cache=True, return_dict_in_generate=True, output_logits=True,
            # neutral values, so a model's generation_config cannot reshape the distribution
            repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, min_length=0, **sampling,
        )
        new_tokens = out.sequences[:, width:]  # (B, T), T <= max_new_tokens
        token_logps = torch.stack([  # step: (B, V) raw logits, before any processor
            torch.log_softmax(step.float() / settings.temperature, -1).gather(1, new_tokens[:, t, None])[:, 0]
            for t, step in enumerate(out.logits)
        ], dim=1).cpu()  # (B, T)
        stops = torch.isin(new_tokens, torch.tensor(self.stop_ids, device=new_tokens.device)).cpu()  # (B, T)
        new_tokens = new_tokens.cpu()
        results = []
        for row in range(len(prompts)):
            finished = bool(stops[row].any())
            length = int(stops[row].int().argmax()) + 1 if finished else new_tokens.shape[1]
            results.append((new_tokens[row, :length].tolist(), finished, token_logps[row, :length].tolist()))
        return results


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _set_threads_from_ray() -> None:
    """torch's intra-op threads = the CPUs Ray gave this actor (nothing outside a Ray worker)."""
    import ray

    if not _in_ray_actor():
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def pick_device(device: str) -> torch.device:
    """``auto``: cuda when Ray gave this actor a GPU (num_gpus > 0), or, outside Ray, when one is
    visible. Ray leaves CUDA_VISIBLE_DEVICES alone for actors without GPUs, so "visible" alone would
    put every CPU actor of a GPU node on the GPU."""
    import ray

    if device != "auto":
        return torch.device(device)
    if _in_ray_actor():
        cuda = bool(ray.get_runtime_context().get_accelerator_ids().get("GPU")) and torch.cuda.is_available()
    else:
        cuda = torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def _stop_token_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The tokenizer's EOS first, then any other EOS the model's generation config names."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, list) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    if not ids:
        raise ConfigError(f"policy.path: tokenizer {tokenizer.name_or_path!r} has no eos_token; "
                          "completions could never stop")
    return ids


def _check_positions(model: nn.Module, settings: GenerationSettings) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    needed = settings.max_prompt_length + settings.max_new_tokens
    if limit is not None and needed > limit:
        raise ConfigError(f"generation: max_prompt_length + max_new_tokens = {needed} exceeds the policy's "
                          f"{limit} positions (max_position_embeddings)")


def actor_seed(seed: int, index: int) -> int:
    """The seed actor ``index`` samples its share with: distinct per actor, fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class GenerationPool:
    """A set of named generation actors used as one: prompts split across them, answers merged.

    Create with :meth:`start` (the driver) or :meth:`connect` (a Ray Train worker or any task of
    the same Ray job, by the actors' names).
    """

    def __init__(self, actors: list[Any], names: list[str]) -> None:
        if not actors or len(actors) != len(names):
            raise ValueError(f"a pool needs one or more actors, one name each; got {len(actors)} actors "
                             f"and {len(names)} names")
        self._actors = list(actors)
        self.names = list(names)

    @classmethod
    def start(cls, n: int, policy: dict, storage: dict | None, settings: dict, num_cpus: float = 1.0,
              num_gpus: float = 0.0, name_prefix: str = DEFAULT_NAME_PREFIX,
              version: int = 0) -> GenerationPool:
        """Start ``n`` actors named ``f"{name_prefix}-{i}"`` and wait until each has loaded the policy.

        Raises:
            whatever an actor's constructor raised (e.g. ConfigError), after stopping the others.
        """
        import ray

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        GenerationSettings.model_validate(settings)  # fail here, not in n actors
        # A killed actor comes back (with the starting weights and version: a call in flight fails,
        # the Train worker group restarts and pushes its checkpoint's weights); calls are not retried
        # because a retry would sample with the restarted actor's older weights.
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3)(GenerationActor)
        names = [f"{name_prefix}-{i}" for i in range(n)]
        actors: list[Any] = []
        try:  # a taken name fails at creation, a bad policy in the constructor: stop those already started
            for name in names:
                actors.append(remote.options(name=name).remote(policy, storage, settings, version))
            ray.get([actor.version.remote() for actor in actors])
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        return cls(actors, names)

    @classmethod
    def connect(cls, names: Sequence[str]) -> GenerationPool:
        """The pool of the running actors with these names (same order, so the same split and seeds)."""
        import ray

        return cls([ray.get_actor(name) for name in names], list(names))

    def generate(self, prompts: Sequence[str], k: int, seed: int, greedy: bool = False) -> Samples:
        """``k`` completions per prompt (greedy: one), in the prompts' order.

        The prompts are split into contiguous, near-equal shares, one per actor; actor i samples
        with :func:`actor_seed` (seed, i), so the same prompts, seed, pool size and weights give
        the same samples from any caller.

        Raises:
            RuntimeError: actors answered with different weight versions.
        """
        import ray

        start = time.perf_counter()
        shares = np.array_split(np.arange(len(prompts)), len(self._actors))
        calls = [actor.generate.remote([prompts[i] for i in share], k, actor_seed(seed, index), greedy)
                 for index, (actor, share) in enumerate(zip(self._actors, shares, strict=True)) if len(share)]
        parts = ray.get(calls)
        if not parts:  # no prompts
            return Samples([], [], [], [], [], self.version(), time.perf_counter() - start)
        return Samples.concat(parts, time.perf_counter() - start)

    def push_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Put the weights in the object store once and have every actor load them; returns seconds.

        Each actor finishes the generate call it is running (actors run one call at a time) before
        it loads, so no batch of samples mixes two versions.
        """
        import ray

        start = time.perf_counter()
        ref = ray.put(state_dict)
        versions = ray.get([actor.set_weights.remote(ref, version) for actor in self._actors])
        if set(versions) != {version}:
            raise RuntimeError(f"push_weights: actors {self.names} report versions {versions}, "
                               f"expected {version}")
        return time.perf_counter() - start

    def version(self) -> int:
        """The weights version every actor holds.

        Raises:
            RuntimeError: the actors hold different versions (a push failed part way).
        """
        import ray

        versions = ray.get([actor.version.remote() for actor in self._actors])
        if len(set(versions)) != 1:
            raise RuntimeError(f"generation actors {self.names} hold different versions {versions}")
        return versions[0]

    def shutdown(self) -> None:
        """Stop the actors (whoever started them; a worker that connected should leave this to the driver)."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def policy_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of a policy's weights under the plain model's names: what the trainer pushes.

    ``model`` may be wrapped by DistributedDataParallel; a peft LoRA model gives its merged
    weights (base + scaling * B A, the adapters themselves left as they are), keyed as the plain
    model that :func:`whetstone.train.preference.load_policy` loads without LoRA. Tied weights
    (e.g. GPT-2's input and output embeddings) share one copy, which pickling keeps shared.
    """
    from whetstone.models.policy import unwrap_model

    core = unwrap_model(model)
    state = _merged_lora_state(core) if hasattr(core, "peft_config") else core.state_dict()
    copies: dict[str, torch.Tensor] = {}
    seen: dict[tuple, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in seen:
            seen[key] = tensor.detach().to("cpu", copy=True)
        copies[name] = seen[key]
    return copies


def _merged_lora_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state with each LoRA layer's delta added, under the names without peft's wrappers."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            if any(module.use_dora.get(adapter, False) for adapter in module.active_adapters):
                raise NotImplementedError(f"{name}: DoRA adapters cannot be merged into a state dict here")
            weight = module.get_base_layer().weight.detach().clone()
            if not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A or adapter in module.lora_embedding_A:
                        weight += module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.base_layer.weight"] = weight
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if "modules_to_save" in key or "original_module" in key:
            raise NotImplementedError(f"{key}: peft modules_to_save are not supported by policy_state_dict")
        if "lora_" not in key:
            out[key.replace(".base_layer.", ".")] = merged.get(key, tensor)
    return out
