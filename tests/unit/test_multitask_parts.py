"""Multi-task (Piccolo2) parts without Ray: task data validation and quarantine, the epoch plan of
the task schedule, the job config, and the auxiliary-task losses on a real (tiny) encoder."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from whetstone.config.base import ConfigError, load_config
from whetstone.config.contrastive import AuxTaskConfig, ContrastiveJobConfig
from whetstone.data import tasks as T
from whetstone.data.tasks import TaskDataError, load_task_data
from whetstone.losses.cosent import CoSENTLoss
from whetstone.losses.label_contrast import LabelContrastLoss
from whetstone.losses.multitask import TaskScheduler


def _jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _quarantined(root: Path, task: str) -> list[dict]:
    return [json.loads(line) for part in sorted((root / "quarantine" / f"task-{task}").glob("*.jsonl"))
            for line in part.read_text().splitlines()]


def test_sts_rows_are_validated_and_every_bad_row_is_quarantined_with_its_field(tmp_path):
    source = _jsonl(tmp_path / "sts.jsonl", [
        {"sentence1": "a cat sits", "sentence2": "a cat is sitting", "score": 4.8},
        {"sentence1": "a dog runs", "sentence2": "stocks fell", "score": "0.2"},  # quoted numbers are fine
        {"sentence1": "x", "sentence2": "y"},                                       # no score
        {"sentence1": "", "sentence2": "y", "score": 1},                            # empty text
        {"sentence1": "x", "sentence2": "y", "score": "high"},                      # not a number
        {"sentence1": "x", "sentence2": "y", "score": True},                        # a boolean
        {"sentence1": "x", "sentence2": "y", "score": float("nan")},                # NaN (json dumps it)
        "{not json",
        ["a", "list"],
    ])
    data = load_task_data("sts", "sts", str(source), str(tmp_path / "run"), seed=0)
    assert data.rows_read == 9 and data.table.num_rows == 2 and data.quarantined == 7
    assert sorted(data.table.column(T.SCORE).to_pylist()) == [0.2, 4.8]
    bad = _quarantined(tmp_path / "run", "sts")
    assert [row["line"] for row in bad] == [3, 4, 5, 6, 7, 8, 9]
    reasons = [row["reason"] for row in bad]
    assert "missing field 'score'" in reasons[0] and "'sentence1' is empty" in reasons[1]
    assert "'score' must be a number" in reasons[2] and "'score' must be a number" in reasons[3]
    assert "finite" in reasons[4] and "JSON object" in reasons[6]
    assert all(row["file"] == str(source) for row in bad)
    assert data.summary()["quarantine_files"] and data.summary()["rows"] == 2


def test_classification_labels_become_ids_and_a_folder_of_jsonl_gz_and_parquet_shards_is_read(tmp_path):
    folder = tmp_path / "cls"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl.gz", [{"text": "goal in the last minute", "label": "sports"},
                                         {"text": "rates rise again", "label": "finance"},
                                         {"text": "no label here"}], gz=True)
    pq.write_table(pa.table({"text": ["a new vaccine", "the match was a draw"], "label": ["health", "sports"]}),
                   folder / "part-1.parquet")
    data = load_task_data("topics", "classification", str(folder), str(tmp_path / "run"))
    assert data.labels == ["finance", "health", "sports"]
    assert data.table.num_rows == 4 and data.quarantined == 1
    pairs = dict(zip(data.table.column(T.TEXT).to_pylist(), data.table.column(T.LABEL_ID).to_pylist(), strict=True))
    assert data.labels[pairs["the match was a draw"]] == "sports" and data.labels[pairs["rates rise again"]] == "finance"
    bad = _quarantined(tmp_path / "run", "topics")
    assert bad[0]["line"] == 3 and "missing field 'label'" in bad[0]["reason"] and bad[0]["file"].endswith(".gz")


def test_task_data_that_cannot_train_is_an_error_naming_the_task(tmp_path):
    one_label = _jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(TaskDataError, match="'one'.*at least 2 distinct labels"):
        load_task_data("one", "classification", str(one_label), str(tmp_path / "run"))
    all_bad = _jsonl(tmp_path / "bad.jsonl", [{"sentence1": "a"}])
    with pytest.raises(TaskDataError, match="'bad': no valid sts rows.*1 quarantined"):
        load_task_data("bad", "sts", str(all_bad), str(tmp_path / "run"))


def test_epoch_ends_count_main_task_steps_only():
    scheduler = TaskScheduler({"retrieval": 2, "sts": 1, "cls": 1}, seed=3)
    ends = scheduler.epoch_ends("retrieval", 5, 3)
    schedule = scheduler.schedule(0, ends[-1])
    starts = [0, *ends[:-1]]
    for start, end in zip(starts, ends, strict=True):
        epoch = schedule[start:end]
        assert epoch.count("retrieval") == 5 and epoch[-1] == "retrieval"  # an epoch ends on its 5th retrieval step
    assert ends[-1] > 15  # the auxiliary steps come on top
    assert TaskScheduler({"retrieval": 1}).epoch_ends("retrieval", 4, 2) == [4, 8]
    with pytest.raises(ValueError, match="main task 'pairs'"):
        scheduler.epoch_ends("pairs", 5, 1)


def test_multitask_config_is_strict():
    task = {"name": "sts", "kind": "sts", "data": "x.jsonl", "share": 0.5}
    config = load_config(ContrastiveJobConfig, None, [f"multitask.tasks={json.dumps([task])}",
                                                      "multitask.retrieval_share=2"])
    assert config.multitask.shares() == {"retrieval": 2.0, "sts": 0.5}
    with pytest.raises(ConfigError, match="repeated \\['sts'\\]"):
        load_config(ContrastiveJobConfig, None, [f"multitask.tasks={json.dumps([task, task])}"])
    with pytest.raises(ConfigError, match="'retrieval' names the main task"):
        load_config(ContrastiveJobConfig, None, [f"multitask.tasks={json.dumps([{**task, 'name': 'retrieval'}])}"])
    with pytest.raises(ConfigError, match="multitask.tasks.0.share"):
        load_config(ContrastiveJobConfig, None, [f"multitask.tasks={json.dumps([{**task, 'share': 0}])}"])


class _Rows:
    """Stands in for a worker's Ray Data shard: ``iter_batches`` over fixed numpy rows (this test is
    about the losses; the integration test runs the real shards)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = columns
        self.passes = 0

    def iter_batches(self, batch_size: int, drop_last: bool, **_):
        self.passes += 1
        rows = len(next(iter(self.columns.values())))
        for start in range(0, rows - batch_size + 1 if drop_last else rows, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.columns.items()}


def _embed(dual, texts: list[str]) -> torch.Tensor:
    tokens = dual.encoder.tokenize(texts, max_length=16)
    return dual.encoder(tokens["input_ids"], tokens["attention_mask"])


@pytest.fixture(scope="module")
def tiny_dual(tiny_encoder_dir):
    from whetstone.models.encoder import Encoder
    from whetstone.train.contrastive import DualEncoder

    torch.manual_seed(0)
    return DualEncoder(Encoder.load(str(tiny_encoder_dir), device="cpu"), chunk_size=None)


def test_aux_sts_step_equals_cosent_on_the_same_embeddings(tiny_dual):
    from whetstone.train.multitask import AuxTasks

    rows = {T.SENTENCE1: np.array(["a cat sits", "rain today", "a red car", "markets fell"]),
            T.SENTENCE2: np.array(["a cat is sitting", "sunny skies", "a crimson car", "cats purr"]),
            T.SCORE: np.array([4.5, 1.0, 4.0, 0.0])}
    spec = AuxTaskConfig(name="sts", kind="sts", data="-", share=1.0, batch_size=4, max_length=16)
    aux = AuxTasks([spec], {}, tiny_dual.encoder.tokenizer, torch.device("cpu"), 4, shards={"sts": _Rows(rows)})
    loss, diagnostics = aux.loss_on(tiny_dual, "sts", aux.fetch("sts"))
    a = _embed(tiny_dual, list(rows[T.SENTENCE1]))
    b = _embed(tiny_dual, list(rows[T.SENTENCE2]))
    expected = CoSENTLoss(0.05)(a, b, torch.tensor(rows[T.SCORE], dtype=torch.float32))
    # Piccolo2's default weight 0.04 applies on top of the plain loss
    assert loss.item() == pytest.approx(0.04 * expected.losses.item(), rel=1e-4)
    assert diagnostics["concordance"] == pytest.approx(expected.concordance)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_dual.parameters())


def test_aux_label_contrast_embeds_only_used_labels_and_matches_the_full_label_set(tiny_dual):
    from whetstone.losses.label_contrast import sample_negative_labels
    from whetstone.train.multitask import AuxTasks

    labels = [f"topic {name}" for name in ["art", "biology", "chess", "dance", "economics", "film"]]
    rows = {T.TEXT: np.array(["a painting", "cells divide", "checkmate", "a waltz"]),
            T.LABEL_ID: np.array([0, 1, 2, 3])}
    spec = AuxTaskConfig(name="cls", kind="classification", data="-", share=1.0, batch_size=4, max_negatives=2,
                         max_length=16)
    aux = AuxTasks([spec], {"cls": labels}, tiny_dual.encoder.tokenizer, torch.device("cpu"), 4, seed=5,
                   shards={"cls": _Rows(rows)})
    # the negatives AuxTasks will draw: same generator state
    negatives = sample_negative_labels(torch.tensor([0, 1, 2, 3]), 6, 2, torch.Generator().manual_seed(5_000_015))
    with torch.no_grad():
        loss, diagnostics = aux.loss_on(tiny_dual, "cls", aux.fetch("cls"))
        texts = _embed(tiny_dual, list(rows[T.TEXT]))
        every_label = _embed(tiny_dual, labels)
        expected = LabelContrastLoss(0.05, 2)(texts, every_label, torch.tensor([0, 1, 2, 3]), negatives)
    assert loss.item() == pytest.approx(0.2 * expected.losses.mean().item(), rel=1e-4)
    assert 0.0 <= diagnostics["label_accuracy"] <= 1.0


def test_aux_batches_start_a_new_pass_when_one_ends_and_refuse_a_shard_without_a_full_batch(tiny_dual):
    from whetstone.train.multitask import AuxTasks

    rows = {T.SENTENCE1: np.array(["a", "b", "c", "d", "e"]), T.SENTENCE2: np.array(["a", "b", "c", "d", "e"]),
            T.SCORE: np.arange(5.0)}
    shard = _Rows(rows)
    spec = AuxTaskConfig(name="sts", kind="sts", data="-", share=1.0, batch_size=2)
    aux = AuxTasks([spec], {}, tiny_dual.encoder.tokenizer, torch.device("cpu"), 8, shards={"sts": shard})
    firsts = [aux.fetch("sts")[T.SENTENCE1][0] for _ in range(5)]
    assert firsts == ["a", "c", "a", "c", "a"] and aux.passes["sts"] == 2  # 2 full batches per pass
    small = AuxTasks([spec.model_copy(update={"batch_size": 8})], {}, tiny_dual.encoder.tokenizer,
                     torch.device("cpu"), 8, shards={"sts": _Rows(rows)})
    with pytest.raises(RuntimeError, match="'sts'.*no full batch of 8"):
        small.fetch("sts")
    with pytest.raises(ValueError, match="label texts"):
        AuxTasks([AuxTaskConfig(name="c", kind="classification", data="-", share=1.0)], {}, None,
                 torch.device("cpu"), 8)
