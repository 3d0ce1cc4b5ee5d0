"""Preference pairs for training, driver side: train/eval split, NS-DPO time steps, datasets.

:func:`select_pairs` reads only ``pair_id``, ``prompt`` and ``time`` of the store's preference
rows, splits them deterministically (a seeded hash of ``pair_id``, so the same pair lands on the
same side in every run and on every machine) and works out the NS-DPO time steps;
:func:`leakage_guard` reports (or removes) eval pairs whose prompt is near a train prompt;
:func:`pairs_for_training` streams the selected pairs as a Ray Dataset and joins the small table
of precomputed reference log-probs (:mod:`whetstone.train.preference_reference`) by ``pair_id``,
so no training worker holds the reference model.

No torch here: Ray Data tasks import this module to run :func:`_select_and_join`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from whetstone import storage as wstorage
from whetstone.config.base import ConfigError
from whetstone.config.preference import PreferenceJobConfig
from whetstone.data import schemas as S

TIME_STEP = "time_step"
REF_CHOSEN = "reference_chosen_logps"
REF_REJECTED = "reference_rejected_logps"
REFERENCE_SCHEMA = pa.schema([(S.PAIR_ID, pa.string()), (REF_CHOSEN, pa.float64()), (REF_REJECTED, pa.float64())])
_CACHE: dict[str, Any] = {}


def dataset_name(split_or_name: str) -> str:
    return split_or_name if split_or_name.startswith("preference/") else f"preference/{split_or_name}"


def pair_hash(pair_ids: list[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per pair id, fixed by (seed, id): the split never depends on order.

    Returns:
        (N,) float64.
    """
    out = np.empty(len(pair_ids), dtype=np.float64)
    for i, pair_id in enumerate(pair_ids):
        digest = hashlib.blake2b(f"{seed}\x1f{pair_id}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


@dataclass
class TimePlan:
    """How timestamps become NS-DPO time steps: t = floor((time - origin) / step); T = newest + 1."""

    origin_us: int = 0
    step_us: float = 86400e6
    current_step: int = 1
    missing_step: int = 0
    gamma: float = 1.0
    min_weight: float = 0.0

    def steps(self, times_us: list[int | None]) -> np.ndarray:
        """(N,) float64 time steps; missing timestamps get ``missing_step``."""
        return np.array([self.missing_step if t is None else math.floor((t - self.origin_us) / self.step_us)
                         for t in times_us], dtype=np.float64)


@dataclass
class PairSelection:
    """The pairs a run trains and evaluates on, chosen on the driver."""

    train_name: str
    eval_name: str | None
    train_ids: list[str]
    eval_ids: list[str]
    prompts: dict[str, str] = field(repr=False)
    time_plan: TimePlan
    kept_aside: dict[str, int]
    dropped_by_time_filter: int = 0


def _read_ids(config: PreferenceJobConfig, name: str) -> pa.Table:
    from whetstone.data.store import read_dataset_table

    try:
        table = read_dataset_table(config.store_uri, name, config.storage,
                                   columns=[S.PAIR_ID, S.PROMPT, config.loss.time_column])
    except KeyError as err:
        raise ConfigError(f"data.dataset: {err.args[0]}") from None
    ids = table.column(S.PAIR_ID)
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise ConfigError(f"{config.store_uri} dataset {name}: pair_id {dup!r} occurs more than once")
    return table


def _time_plan(config: PreferenceJobConfig, times: list) -> TimePlan:
    loss = config.loss
    if loss.name != "ns_dpo":
        return TimePlan()
    stamps = [None if t is None else int(t) for t in times]
    known = [t for t in stamps if t is not None]
    step_us = loss.time_step_seconds * 1e6
    origin = min(known) if known else 0
    newest = math.floor((max(known) - origin) / step_us) if known else 0
    missing = newest if loss.missing_time == "newest" else 0
    return TimePlan(origin, step_us, newest + 1, missing, loss.gamma, loss.min_weight)


def select_pairs(config: PreferenceJobConfig) -> PairSelection:
    """Split the store's pairs into train and eval ids (hash of pair_id), apply caps and the time filter."""
    from whetstone.data.store import read_manifest
    from whetstone.losses.preference_base import time_weight_keep_mask

    train_name = dataset_name(config.data.dataset)
    table = _read_ids(config, train_name)
    ids = table.column(S.PAIR_ID).to_pylist()
    prompts = dict(zip(ids, table.column(S.PROMPT).to_pylist(), strict=True))
    times = table.column(config.loss.time_column).cast(pa.int64()).to_pylist()
    hashes = pair_hash(ids, config.data.split_seed)
    eval_name = None
    if config.data.eval_dataset:
        eval_name = dataset_name(config.data.eval_dataset)
        eval_table = _read_ids(config, eval_name)
        eval_ids = eval_table.column(S.PAIR_ID).to_pylist()
        prompts.update(zip(eval_ids, eval_table.column(S.PROMPT).to_pylist(), strict=True))
        eval_ids = [eval_ids[i] for i in np.argsort(pair_hash(eval_ids, config.data.split_seed), kind="stable")]
        is_eval = np.zeros(len(ids), dtype=bool)
    else:
        eval_name = train_name
        is_eval = hashes < config.data.eval_fraction
        eval_ids = [ids[i] for i in np.argsort(np.where(is_eval, hashes, np.inf), kind="stable")[: is_eval.sum()]]
    plan = _time_plan(config, [t for t, e in zip(times, is_eval, strict=True) if not e])
    order = [i for i in np.argsort(hashes, kind="stable") if not is_eval[i]]
    dropped = 0
    if plan.min_weight > 0:
        keep = time_weight_keep_mask(plan.steps([times[i] for i in order]), plan.current_step, plan.gamma,
                                     plan.min_weight)
        dropped = int((~keep).sum())
        order = [i for i, k in zip(order, keep, strict=True) if k]
    train_ids = [ids[i] for i in order][: config.data.max_train_pairs]
    eval_ids = eval_ids[: config.data.max_eval_pairs]
    manifest = read_manifest(config.store_uri, config.storage)
    kept_aside = {name: manifest.quarantine[name].rows for name in {train_name, eval_name}
                  if name and name in manifest.quarantine}
    return PairSelection(train_name, eval_name if eval_ids else None, train_ids, eval_ids, prompts, plan,
                         kept_aside, dropped)


def shard_paths(config: PreferenceJobConfig, names: list[str]) -> tuple[list[str], Any]:
    """The Parquet shard paths of the store's datasets ``names`` and the filesystem they are on."""
    from whetstone.data.store import read_manifest

    manifest = read_manifest(config.store_uri, config.storage)
    location = wstorage.resolve(config.store_uri, config.storage)
    paths = [wstorage.resolve(uri, config.storage).path
             for name in dict.fromkeys(names) for uri in manifest.shard_uris(config.store_uri, name)]
    return paths, location.filesystem


def _cached(key: str, ref: Any) -> Any:
    import ray

    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = ref if not isinstance(ref, ray.ObjectRef) else ray.get(ref)
    return _CACHE[key]


def _select_and_join(batch: pa.Table, keep_ref: Any, keep_key: str, reference_ref: Any, reference_key: str,
                     time_plan: dict, time_column: str) -> pa.Table:
    """``map_batches``: keep the selected pairs, attach reference log-probs by pair_id and time steps."""
    keep: pa.Array = _cached(keep_key, keep_ref)
    batch = batch.filter(pc.is_in(batch.column(S.PAIR_ID), value_set=keep))
    ids = batch.column(S.PAIR_ID)
    steps = TimePlan(**time_plan).steps(batch.column(time_column).cast(pa.int64()).to_pylist())
    out = {S.PAIR_ID: ids, S.PROMPT: batch.column(S.PROMPT), S.CHOSEN: batch.column(S.CHOSEN),
           S.REJECTED: batch.column(S.REJECTED), TIME_STEP: pa.array(steps, pa.float64())}
    if reference_ref is not None:
        reference: pa.Table = _cached(reference_key, reference_ref)
        rows = pc.index_in(ids, value_set=reference.column(S.PAIR_ID))
        if rows.null_count:
            missing = ids.filter(pc.is_null(rows))[0].as_py()
            raise ValueError(f"pair_id {missing!r} has no precomputed reference log-probs")
        out[REF_CHOSEN] = reference.column(REF_CHOSEN).take(rows)
        out[REF_REJECTED] = reference.column(REF_REJECTED).take(rows)
    return pa.table(out)


def pairs_for_training(config: PreferenceJobConfig, selection: PairSelection, which: str,
                       reference: pa.Table | None, seed: int | None = None):
    """The train (shuffled per epoch) or eval (fixed order) pairs as a Ray Dataset.

    Returns:
        Rows with ``pair_id``, ``prompt``, ``chosen``, ``rejected``, ``time_step`` and, with a
        reference table, ``reference_chosen_logps`` / ``reference_rejected_logps``.
    """
    import ray
    import ray.data

    from whetstone.data.stream import preference_dataset

    if which == "train":
        ds = preference_dataset(config.store_uri, selection.train_name, config.storage, seed=seed)
        ids = selection.train_ids
    else:
        paths, filesystem = shard_paths(config, [selection.eval_name])
        ds = ray.data.read_parquet(paths, filesystem=filesystem, schema=S.PREFERENCE_SCHEMA)
        ids = selection.eval_ids
    return select_rows(ds, ids, reference, selection.time_plan, config.loss.time_column)


def select_rows(ds, ids: list[str], reference: pa.Table | None, plan: TimePlan, time_column: str,
                batch_size: int = 256):
    """``ds`` cut down to the pairs ``ids``, with time steps and (given a table) reference log-probs."""
    import ray

    keep_ref = ray.put(pa.array(ids, pa.string()))
    reference_ref = ray.put(reference) if reference is not None else None
    return ds.map_batches(
        _select_and_join, batch_format="pyarrow", batch_size=batch_size, num_cpus=0.25,
        fn_kwargs={"keep_ref": keep_ref, "keep_key": keep_ref.hex(), "reference_ref": reference_ref,
                   "reference_key": reference_ref.hex() if reference_ref is not None else "",
                   "time_plan": plan.__dict__, "time_column": time_column},
    )


def leakage_guard(config: PreferenceJobConfig, selection: PairSelection) -> dict:
    """Run the leakage guard on the selected prompts; with mode=remove, drop flagged eval pairs."""
    from whetstone.index.leakage import guard_prompts

    if config.leakage.mode == "off" or not selection.eval_ids:
        return {"mode": "off"}
    started = time.monotonic()
    report = guard_prompts({i: selection.prompts[i] for i in selection.train_ids},
                           {i: selection.prompts[i] for i in selection.eval_ids},
                           config.leakage.encoder, config.leakage.threshold, max_length=config.leakage.max_length,
                           batch_size=config.leakage.batch_size)
    flagged = set(report.flagged_eval_ids)
    if config.leakage.mode == "remove":
        selection.eval_ids = [i for i in selection.eval_ids if i not in flagged]
    out = {"mode": config.leakage.mode, **report.to_dict(config.leakage.max_examples),
           "removed": len(flagged) if config.leakage.mode == "remove" else 0, "seconds": round(time.monotonic() - started, 2)}
    print(f"[leakage] {len(flagged)} of {report.eval_count} eval prompts have a train prompt with cosine >= "
          f"{config.leakage.threshold} ({'removed' if config.leakage.mode == 'remove' else 'reported'})", flush=True)
    return out
