"""Reference log-probs, precomputed once on the driver's cluster for the DPO family.

:func:`precompute_reference_logps` runs the frozen reference model over every selected pair as Ray
Data batch inference (:class:`ReferenceScorer` actors); the result is small (pair id + two floats
per pair) and :func:`whetstone.train.preference_data.pairs_for_training` joins it to the streamed
pairs by ``pair_id``. :func:`reference_table` writes it beside the run, and a resumed run reuses it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from whetstone import storage as wstorage
from whetstone.config.preference import PreferenceJobConfig
from whetstone.console import ProgressLine
from whetstone.data import schemas as S
from whetstone.models.policy import preference_logps
from whetstone.train.preference import load_policy, tokenize_pairs
from whetstone.train.preference_data import (
    REF_CHOSEN,
    REF_REJECTED,
    REFERENCE_SCHEMA,
    PairSelection,
    select_rows,
    shard_paths,
)
from whetstone.train.runtime import worker_job_config


class ReferenceScorer:
    """Ray Data actor: the frozen reference model's summed completion log-probs per pair."""

    def __init__(self, job: dict) -> None:
        self.config = PreferenceJobConfig.model_validate(job)
        self.model, self.tokenizer = load_policy(self.config.policy, self.config.storage, lora=None)
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = tokenize_pairs(self.tokenizer, batch, self.config)
        with torch.no_grad():
            logps = preference_logps(self.model, tokens, self.config.policy.chunk_size)
        return {S.PAIR_ID: batch[S.PAIR_ID],
                REF_CHOSEN: logps["chosen_logps"].double().numpy(),
                REF_REJECTED: logps["rejected_logps"].double().numpy()}


def precompute_reference_logps(config: PreferenceJobConfig, selection: PairSelection) -> pa.Table:
    """Ray Data batch inference with the reference model over the train and eval pairs, once.

    Returns:
        A table ``pair_id``, ``reference_chosen_logps``, ``reference_rejected_logps`` (one row per pair).
    """
    import ray.data

    names = [selection.train_name] + ([selection.eval_name] if selection.eval_name else [])
    paths, filesystem = shard_paths(config, names)
    ds = ray.data.read_parquet(paths, filesystem=filesystem, schema=S.PREFERENCE_SCHEMA)
    ds = select_rows(ds, selection.train_ids + selection.eval_ids, None, selection.time_plan, config.loss.time_column)
    scored = ds.map_batches(
        ReferenceScorer, fn_constructor_kwargs={"job": worker_job_config(config, PreferenceJobConfig)}, batch_format="numpy",
        batch_size=config.reference.batch_size, concurrency=config.reference.concurrency,
        num_cpus=config.reference.num_cpus,
    )
    expected = len(set(selection.train_ids) | set(selection.eval_ids))
    progress = ProgressLine("reference log-probs", "pairs", total=expected, every_s=config.progress_every_s,
                            tag="[reference]")
    tables = []
    for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):  # streamed: a line as they come
        tables.append(batch)
        progress.add(batch.num_rows)
    progress.done()
    table = pa.concat_tables(tables).cast(REFERENCE_SCHEMA) if tables else REFERENCE_SCHEMA.empty_table()
    if table.num_rows != expected:
        raise RuntimeError(f"reference precompute returned {table.num_rows} rows for {expected} pairs")
    return table


def reference_table(config: PreferenceJobConfig, selection: PairSelection, uri: str) -> pa.Table:
    """The precomputed reference log-probs: reused from ``uri`` on resume, else computed and written there."""
    import io

    import pyarrow.parquet as pq

    if config.if_exists == "resume" and wstorage.exists(uri, config.storage):
        return pq.read_table(io.BytesIO(wstorage.read_bytes(uri, config.storage)))
    table = precompute_reference_logps(config, selection)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    wstorage.write_bytes(uri, sink.getvalue(), config.storage)
    return table
