"""The contrastive job end to end on a local Ray: index service, live negatives, a refresh, eval.

Runs ``jobs.train_contrastive.main`` on the shipped scifact-subset with a tiny random-init
encoder (quality is not judged here; ``make demo`` judges it with MiniLM).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import free_port
from tests.tensorboard_events import read_events, read_scalars

pytestmark = pytest.mark.integration


def scifact_train_counts(store: str) -> tuple[int, int]:
    """(queries, (query, positive) pairs) in the store's train split, read straight from the shards."""
    from whetstone.data.store import read_dataset_table

    table = read_dataset_table(store, "pairs/train")
    return table.num_rows, sum(len(p) for p in table.column("positive_ids").to_pylist())


class _Tee(io.TextIOBase):
    """stdout for the job: what it prints (and what Ray forwards from workers and actors) goes to the
    console as usual and into ``copy``."""

    def __init__(self, console, copy: io.StringIO):
        self.console, self.copy = console, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()


@pytest.fixture(scope="module")
def contrastive_job(ray_cluster, scifact_store, tiny_encoder_dir, tmp_path_factory) -> SimpleNamespace:
    """The job's report, its console output and the MLflow tracking URI it logged to."""
    from jobs.train_contrastive import main

    mlflow_uri = (tmp_path_factory.mktemp("mlflow") / "mlruns").as_uri()
    output = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, output)):
        report = main([
            "--config", "jobs/configs/train_contrastive/smoke.yaml",
            f"store_uri={scifact_store}",
            f"encoder.base_model={tiny_encoder_dir}",
            f"index.http_port={free_port()}",
            # A refresh asked for after every step: each takes longer than a step, so requests merge
            # (newest checkpoint wins) and fewer versions are published than asked for.
            "optim.max_steps=6", "refresh.every_steps=1", "negatives.max_steps_behind=6",
            "index.num_shards=2",  # the sharded path: two build tasks, two shard deployments, swaps across both
            f"tracking.mlflow_uri={mlflow_uri}", "tracking.mlflow_experiment=whetstone-test",
            "progress_every_s=0",  # a progress line for every embedded batch
        ])
    yield SimpleNamespace(report=report, output=output.getvalue(), mlflow_uri=mlflow_uri)
    from ray import serve

    serve.delete("whetstone-index")


@pytest.fixture(scope="module")
def contrastive_report(contrastive_job) -> dict:
    return contrastive_job.report


def test_report_has_the_loop(contrastive_report):
    report = contrastive_report
    assert report["steps"] == 6
    # every step mined negatives from the live index: 1 per query, 8 queries per worker
    assert report["negatives_served_by_index"] == 6 * 8
    assert report["fallback_steps_rank0"] == 0 and report["fallback_steps_by_reason_rank0"] == {}
    assert report["staleness_bound_steps"] == 6 and 0 <= report["max_index_steps_behind_rank0"] <= 5
    assert report["before"]["queries"] == report["after"]["queries"] == 77
    assert 0 <= report["after"]["ndcg@10"] <= 1


def test_refresh_slower_than_every_steps_merges_and_lag_is_counted_in_steps(contrastive_report):
    """Refreshes were asked for after steps 1 to 5; each took longer than a step, so requests
    merged. Counting versions would then report a lag that only grows (and fall back); the lag in
    steps is the step mined for minus the step its version's checkpoint was embedded at."""
    from whetstone.index.snapshot import read_manifest

    refreshes = contrastive_report["refreshes"]
    assert contrastive_report["refresh_errors"] == []
    assert 1 <= len(refreshes) < 5, "refreshes should be slower than a tiny model's step"
    assert [r["step"] for r in refreshes] == sorted({r["step"] for r in refreshes})
    assert [(r["old_version"], r["new_version"]) for r in refreshes] == [(v, v + 1) for v in range(1, len(refreshes) + 1)]
    first = refreshes[0]
    assert first["checkpoint"].endswith(f"step-{first['step']:06d}")
    # periodic evaluation comes with each refresh (the corpus was just embedded for the index)
    assert 0 <= first["ndcg@10_at_index_length"] <= 1 and 0 <= first["recall@100_at_index_length"] <= 1
    # the final model is promoted as the newest version
    promoted = len(refreshes) + 2
    assert contrastive_report["index_versions"] == list(range(1, promoted + 1))
    index_uri = str(Path(contrastive_report["run_uri"]) / "index")
    embedded_at = {v: read_manifest(index_uri, v).extra["step"] for v in range(1, promoted + 1)}
    assert embedded_at[1] == 0 and embedded_at[promoted] == 6
    assert [embedded_at[v + 1] for v in range(1, promoted - 1)] == [r["step"] for r in refreshes]
    history = json.loads((Path(contrastive_report["run_uri"]) / "train-history.json").read_text())
    for m in history:  # step m["step"] trained after m["step"] - 1 steps
        assert m["index_steps_behind"] == m["step"] - 1 - embedded_at[m["index_version"]], m


def test_index_service_serves_the_promoted_version(contrastive_report):
    import numpy as np
    from whetstone.index.client import IndexClient

    client = IndexClient.from_handle()
    result = client.search(np.ones((1, 32), dtype=np.float32), k=5)
    promoted = contrastive_report["index_versions"][-1]
    assert result.version == promoted and result.embedded_step == 6 and len(result.ids[0]) == 5
    assert contrastive_report["index"] == {"kind": "flat", "num_shards": 2, "replicas_per_shard": 1,
                                           "use_gpu": False, "documents": contrastive_report["index"]["documents"]}
    stats = client.stats()
    assert stats["num_shards"] == 2 and stats["size"] == contrastive_report["index"]["documents"]


def _embed_lines(output: str, what: str) -> tuple[list[tuple[int, int]], list[str]]:
    """A corpus embedding's ``[embed] <what>:`` lines (also when Ray forwarded them from an actor):
    the periodic ones as (done, total), and the closing ones."""
    periodic, closing = [], []
    for line in output.splitlines():
        line = re.sub(r"^(\x1b\[\d+m)?\([^)]*\)(\x1b\[0m)? ", "", line)  # Ray's "(IndexRefresher pid=...)" prefix
        match = re.fullmatch(rf"\[embed\] {re.escape(what)}: ([\d,]+)/([\d,]+) docs \([\d,.]+ docs/s\)(, eta \d+ s)?", line)
        if match:
            periodic.append((int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))))
        elif line.startswith(f"[embed] {what}: done, "):
            closing.append(line)
    return periodic, closing


def test_corpus_embeddings_print_progress_with_rates_and_the_totals(contrastive_job):
    """progress_every_s=0: a line per embedded batch, with the corpus size from the store's manifest
    as the total; the closing line's count is the number of documents the index holds."""
    report, output = contrastive_job.report, contrastive_job.output
    documents = report["index"]["documents"]
    assert documents == 2101
    for what, vectors in (("corpus, base model", f" into {report['run_uri']}/index/vectors/v1"),
                          ("corpus, final model", f" into {report['run_uri']}/index/vectors/v{report['index_versions'][-1]}")):
        periodic, closing = _embed_lines(output, what)
        assert periodic and all(total == documents for _, total in periodic), what
        assert [done for done, _ in periodic] == sorted(done for done, _ in periodic)
        assert len(closing) == 1 and closing[0].startswith(f"[embed] {what}: done, 2,101 docs in "), closing
        assert closing[0].endswith(f" docs/s){vectors}")
    # the background refreshes, in the refresher actor: Ray forwards its lines to the driver's console
    for refresh in report["refreshes"]:
        periodic, closing = _embed_lines(output, f"corpus v{refresh['new_version']}")
        assert periodic and len(closing) == 1 and closing[0].startswith(
            f"[embed] corpus v{refresh['new_version']}: done, {refresh['documents']:,} docs in ")
    assert re.search(r"^\[index\] v1 built: flat, 2 shards, 2,101 docs in [\d.]+ s", output, re.M)


def test_the_job_says_where_to_look(contrastive_job):
    report, output = contrastive_job.report, contrastive_job.output
    tensorboard = f"{report['run_uri']}/tensorboard"
    assert f"\n[run] TensorBoard: tensorboard --logdir {tensorboard}\n" in output
    assert report["tensorboard_uri"] == tensorboard
    assert re.search(rf"^\[run\] MLflow: run {report['mlflow_run_id']} in experiment 'whetstone-test' at "
                     rf"{re.escape(contrastive_job.mlflow_uri)}: mlflow ui --backend-store-uri ", output, re.M)
    assert "[run] Ray dashboard" not in output  # the test cluster runs without a dashboard: no line
    assert f"\ntensorboard: tensorboard --logdir {tensorboard}\n" in output  # in the closing summary too


def test_tensorboard_has_one_loss_per_step_and_the_evaluations(contrastive_report):
    run = Path(contrastive_report["run_uri"])
    history = json.loads((run / "train-history.json").read_text())
    train = read_scalars(run / "tensorboard" / "train")
    assert [step for step, _ in train["loss"]] == [1, 2, 3, 4, 5, 6]  # one loss scalar per step
    assert [value for _, value in train["loss"]] == pytest.approx([m["loss"] for m in history], rel=1e-6)
    assert [step for step, _ in train["pairs_per_s"]] == [1, 2, 3, 4, 5, 6] and "score_gap" in train
    assert not any(e.HasField("session_log") for e in read_events(run / "tensorboard" / "train"))  # no restart
    evals = read_scalars(run / "tensorboard" / "eval")
    before, after = contrastive_report["before"], contrastive_report["after"]
    assert evals["ndcg@10"] == [(0, pytest.approx(before["ndcg@10"])), (6, pytest.approx(after["ndcg@10"]))]
    assert [step for step, _ in evals["ndcg@10_at_index_length"]] == [r["step"] for r in contrastive_report["refreshes"]]


def test_mlflow_run_has_the_params_the_steps_and_the_report(contrastive_job):
    from whetstone.train.tracking import mlflow_client

    report = contrastive_job.report
    client = mlflow_client(contrastive_job.mlflow_uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    assert client.get_experiment(run.info.experiment_id).name == "whetstone-test"
    params = run.data.params
    assert params["optim.batch_size"] == "8" and params["negatives.mining.rank_end"] == "10"
    assert params["optim.max_steps"] == "6" and params["index.num_shards"] == "2"
    assert params["encoder.base_model"] == str(Path(params["encoder.base_model"]))  # the resolved, absolute path
    assert run.data.tags["whetstone.run_uri"] == report["run_uri"]
    history = json.loads((Path(report["run_uri"]) / "train-history.json").read_text())
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in losses] == pytest.approx([m["loss"] for m in history])
    ndcg = client.get_metric_history(run.info.run_id, "eval_ndcg_at_10")
    assert [(m.step, m.value) for m in ndcg] == [(0, pytest.approx(report["before"]["ndcg@10"])),
                                                (6, pytest.approx(report["after"]["ndcg@10"]))]
    assert run.data.metrics["after.ndcg_at_10"] == pytest.approx(report["after"]["ndcg@10"])
    assert json.loads((Path(report["run_uri"]) / "tracking.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_refresh_and_evaluate_jobs_stream_the_corpus(contrastive_report, scifact_store, tmp_path, capsys):
    """jobs.refresh_index re-embeds into vector chunks, builds the next version with the served
    layout (2 shards, read from the newest manifest) and swaps it in through the handle;
    jobs.evaluate ranks the streamed corpus exactly."""
    import numpy as np
    from whetstone.index.client import IndexClient
    from whetstone.index.snapshot import latest_version, read_manifest
    from whetstone.index.vector_chunks import read_vector_chunks

    from jobs.evaluate import main as evaluate
    from jobs.refresh_index import main as refresh

    index_uri = str(Path(contrastive_report["run_uri"]) / "index")
    documents = contrastive_report["index"]["documents"]
    capsys.readouterr()
    result = refresh([f"checkpoint={contrastive_report['model_uri']}", f"store_uri={scifact_store}",
                      f"index_uri={index_uri}", "swap=handle", "doc_max_length=64", "progress_every_s=0"])
    periodic, closing = _embed_lines(capsys.readouterr().out, f"corpus v{result['new_version']}")
    assert periodic and periodic[-1][1] == documents  # a line per batch, against the corpus size
    assert len(closing) == 1 and closing[0].startswith(f"[embed] corpus v{result['new_version']}: done, "
                                                       f"{documents:,} docs in ")
    promoted = contrastive_report["index_versions"][-1]
    assert (result["old_version"], result["new_version"], result["num_shards"]) == (promoted, promoted + 1, 2)
    assert result["documents"] == documents and read_vector_chunks(result["vectors"]).count == documents
    assert latest_version(index_uri) == promoted + 1 and read_manifest(index_uri, promoted + 1).count == documents
    assert IndexClient.from_handle().search(np.ones((1, 32), dtype=np.float32), k=3).version == promoted + 1
    out = tmp_path / "eval.json"
    metrics = evaluate([f"model={contrastive_report['model_uri']}", f"store_uri={scifact_store}",
                        f"output_uri={out}", "doc_max_length=64", "progress_every_s=0"])
    periodic, closing = _embed_lines(capsys.readouterr().out, f"corpus, {contrastive_report['model_uri']}")
    assert periodic and len(closing) == 1 and f": done, {documents:,} docs in " in closing[0]
    assert metrics["documents"] == documents and metrics["queries"] == 77
    assert json.loads(out.read_text())["ndcg@10"] == metrics["ndcg@10"]


def test_model_loads_in_sentence_transformers_and_transformers(contrastive_report, tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model_dir = contrastive_report["model_uri"]
    st = SentenceTransformer(model_dir, device="cpu")
    vectors = st.encode(["a claim about proteins"])
    assert vectors.shape == (1, 32)
    assert AutoModel.from_pretrained(model_dir).config.hidden_size == 32
    plot = Path(contrastive_report["plot_uri"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    history = json.loads((Path(contrastive_report["run_uri"]) / "train-history.json").read_text())
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 6] and all("loss" in m and "score_gap" in m for m in history)
    report_file = Path(contrastive_report["run_uri"]) / "report.json"
    assert json.loads(report_file.read_text())["steps"] == 6
    # sentence-transformers' model card, with the run's base model, steps and nDCG@10 before and after
    card = (Path(model_dir) / "README.md").read_text()
    assert contrastive_report["model_card_uri"] == str(Path(model_dir) / "README.md")
    assert "library_name: sentence-transformers" in card and "| Steps | 6 |" in card
    assert f"`{tiny_encoder_dir}`" in card
    for when in ("before", "after"):
        assert f"{contrastive_report[when]['ndcg@10']:.4f}" in card


def test_gist_matryoshka_and_false_negative_margin_in_the_job(ray_cluster, scifact_store, tiny_encoder_dir):
    """The configurable parts of the loop: a frozen guide (GIST), Matryoshka widths evaluated one by
    one, the margin rule fed by the positives' scores from the index, every (query, positive) pair
    as a row (the decoupled softmax), topic-aware batches (TAS) and bf16 autocast."""
    from jobs.train_contrastive import main

    report = main([
        "--config", "jobs/configs/train_contrastive/smoke.yaml",
        f"store_uri={scifact_store}", f"encoder.base_model={tiny_encoder_dir}", f"index.http_port={free_port()}",
        "run_name=smoke-gist", "optim.max_steps=2", "refresh.every_steps=null",
        "loss.kind=gist", f"loss.guide_model={tiny_encoder_dir}", "loss.matryoshka_dims=[32,16]",
        # a relative margin of 0.9 keeps only candidates scoring under a tenth of the positive's score
        "negatives.mining.relative_margin=0.9", "negatives.mining.rank_end=20", "loss.positives=all",
        "optim.topic_clusters=4", "encoder.precision=bfloat16",
    ])
    from ray import serve

    serve.delete("whetstone-index")
    assert report["steps"] == 2 and report["fallback_steps_rank0"] == 0
    assert report["precision"] == "bfloat16" and math.isfinite(report["final_loss"])
    queries, pairs = scifact_train_counts(scifact_store)
    assert pairs > queries  # scifact has multi-positive queries: one row per (query, positive)
    assert report["positives"] == "all" and report["train_rows_per_epoch"] == pairs
    # topic-aware batches: rank 0's batches so far were drawn from one k-means topic each
    assert report["topic_clusters"] == 4 and report["topic_pure_batch_share"] == 1.0
    assert {"ndcg@10", "ndcg@10_dim16", "recall@100_dim16"} <= set(report["after"])
    assert report["negatives_dropped_as_false_negatives"] > 0
    assert 0 < report["false_negative_dropped_share"] <= 1
    # dropped candidates are replaced (random fill), never silently lost: every query still gets one
    assert report["negatives_served_by_index"] + report["negatives_random_fill"] == 2 * 8


def test_multitask_steps_follow_one_schedule_on_every_worker(ray_cluster, scifact_store, tiny_encoder_dir, tmp_path):
    """Piccolo2's mix in the job: retrieval pairs plus a graded-pair (CoSENT) and a labelled-text
    (label contrast) task; each step trains the task the (seed, step) draw names, on both workers
    (DDP would hang or fail if one worker ran another task's graph), and bad rows are quarantined.
    The run also merges its final model with the base (optim.merge_base_weight) and trains its
    retrieval steps against the index's stored vectors of the negatives (negatives.encode=false)."""
    import numpy as np
    from whetstone.losses.multitask import TaskScheduler

    from jobs.train_contrastive import main

    rng = np.random.default_rng(0)
    words = ["protein", "cell", "gene", "virus", "cancer", "brain", "heart", "drug"]
    sts = [{"sentence1": f"{a} study", "sentence2": f"{b} study", "score": float(a == b) * 4 + rng.random()}
           for a, b in zip(rng.choice(words, 40), rng.choice(words, 40), strict=True)]
    sts.append({"sentence1": "no second sentence", "score": 1.0})
    topics = {"biology": ["cells divide", "genes mutate"], "medicine": ["a drug trial", "heart surgery"],
              "physics": ["light bends", "atoms decay"]}
    cls = [{"text": f"{t} {i}", "label": label} for i in range(8) for label, ts in topics.items() for t in ts]
    cls.append({"text": "a text without a label"})
    (tmp_path / "sts.jsonl").write_text("\n".join(json.dumps(r) for r in sts))
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in cls))
    tasks = [{"name": "sts", "kind": "sts", "data": str(tmp_path / "sts.jsonl"), "share": 1.0},
             {"name": "topics", "kind": "classification", "data": str(tmp_path / "cls.jsonl"), "share": 1.0,
              "max_negatives": 2}]
    report = main([
        "--config", "jobs/configs/train_contrastive/smoke.yaml", f"store_uri={scifact_store}",
        f"encoder.base_model={tiny_encoder_dir}", f"index.http_port={free_port()}", f"output_uri={tmp_path / 'run'}",
        "optim.max_steps=8", "refresh.every_steps=null", "eval.split=null",
        f"multitask.tasks={json.dumps(tasks)}", "multitask.retrieval_share=1.0", "optim.merge_base_weight=0.5",
        "negatives.encode=false",
    ])
    from ray import serve

    serve.delete("whetstone-index")
    schedule = TaskScheduler({"retrieval": 1.0, "sts": 1.0, "topics": 1.0}, seed=0).schedule(0, 8)
    assert report["steps"] == 8 and len(set(schedule)) == 3  # this seed's first 8 steps visit all three
    for name in ("retrieval", "sts", "topics"):
        assert report["tasks"][name]["steps"] == schedule.count(name)
    assert report["tasks"]["sts"]["rows"] == 40 and report["tasks"]["sts"]["quarantined"] == 1
    assert report["tasks"]["topics"]["labels"] == 3 and report["tasks"]["topics"]["quarantined"] == 1
    bad = (tmp_path / "run" / "quarantine" / "task-topics").glob("*.jsonl")
    assert "missing field 'label'" in "".join(p.read_text() for p in bad)
    # the history names each step's task: retrieval steps carry `loss`, the others `loss_<task>`
    history = json.loads((tmp_path / "run" / "train-history.json").read_text())
    seen = ["retrieval" if "loss" in m else next(k[5:] for k in m if k.startswith("loss_")) for m in history]
    assert seen == schedule
    assert all(0 <= m["topics_label_accuracy"] <= 1 for m in history if "loss_topics" in m)
    # negatives came from the live index on every retrieval step (8 queries per worker), as stored
    # vectors: no fallback to in-batch negatives
    assert report["negatives_served_by_index"] == 8 * schedule.count("retrieval")
    assert report["fallback_steps_rank0"] == 0
    # the final model is the trained one merged half-way back to the base, and the index serves it
    assert report["model_uri"].endswith("train/final-merged") and report["trained_model_uri"].endswith("train/final")
    assert (Path(report["model_uri"]) / "model.safetensors").is_file()
    assert report["merge_base_weight"] == 0.5 and report["index_versions"] == [1, 2]


def test_static_negatives_are_mined_once_and_resolved_by_id(ray_cluster, scifact_store, tiny_encoder_dir, tmp_path):
    """negatives.source=static: every training query's negatives mined once with the base model
    through the served v1 (same rank window), stored with the pairs, resolved to text by id."""
    import numpy as np
    from whetstone.data.store import read_dataset_table
    from whetstone.data.stream import DocStore, pairs_dataset
    from whetstone.index.client import IndexClient
    from whetstone.models.encoder import Encoder

    from jobs.train_contrastive import main

    report = main([
        "--config", "jobs/configs/train_contrastive/smoke.yaml", f"store_uri={scifact_store}",
        f"encoder.base_model={tiny_encoder_dir}", f"index.http_port={free_port()}", "run_name=smoke-static",
        f"output_uri={tmp_path / 'run'}", "negatives.source=static", "negatives.mining.num_negatives=2",
        "refresh.every_steps=null", "optim.max_steps=3", "eval.split=null",
    ])
    mining = report["static_mining"]
    assert report["negatives_source"] == "static" and mining["pairs"] == 188 and mining["index_version"] == 1
    assert mining["negatives_from_index"] + mining["negatives_random_fill"] == 188 * 2
    assert mining["negatives_from_index"] > 188  # the window (ranks 1-9) mostly has room for two
    # every step trained on its batch's mined negatives: 8 queries x 2 per worker, no fallback
    assert report["negatives_served_by_index"] == 3 * 8 * 2 and report["fallback_steps_rank0"] == 0

    mined = read_dataset_table(mining["store_uri"], "pairs/train").to_pylist()
    corpus = DocStore.load(scifact_store)
    assert len(mined) == 188 and all(len(row["negative_ids"]) == 2 for row in mined)
    assert all(not set(row["negative_ids"]) & set(row["positive_ids"]) for row in mined)
    assert all(doc_id in corpus for row in mined for doc_id in row["negative_ids"])
    # Mined from the base model's ranking of v1: the negatives sit inside its rank window.
    sample = mined[:20]
    encoder = Encoder.load_query(str(tiny_encoder_dir), device="cpu")
    vectors = encoder.encode([row["query"] for row in sample], max_length=32)
    found = IndexClient.from_handle().search(vectors, k=10, exclude_ids=[row["positive_ids"] for row in sample])
    assert found.version == 1
    in_window = [doc_id in ranked[1:10] for row, ranked in zip(sample, found.ids, strict=True)
                 for doc_id in row["negative_ids"]]
    assert np.mean(in_window) >= 0.9, in_window  # random fill only where the window ran short

    # The data pipeline resolves them by id: texts are the corpus's.
    rows = pairs_dataset(scifact_store, "train", seed=0, negatives_per_query=2,
                         pairs_store_uri=mining["store_uri"]).take(16)
    assert len(rows) == 16
    for row in rows:
        assert list(row["negative_texts"]) == corpus.texts(list(row["negative_ids"]))


def test_partial_refresh_reembeds_a_slice_plus_served_negatives(ray_cluster, scifact_store, tiny_encoder_dir,
                                                                 tmp_path):
    """refresh.fraction=0.5: each refresh re-embeds one of two slices plus the negatives the workers
    reported, layered on the previous version; every version still holds every document once, and
    the manifests record how old its vectors are."""
    from whetstone.index.snapshot import read_manifest

    from jobs.train_contrastive import main

    report = main([
        "--config", "jobs/configs/train_contrastive/smoke.yaml", f"store_uri={scifact_store}",
        f"encoder.base_model={tiny_encoder_dir}", f"index.http_port={free_port()}", "run_name=smoke-partial",
        f"output_uri={tmp_path / 'run'}", "refresh.fraction=0.5", "refresh.every_steps=2", "optim.max_steps=6",
        "eval.split=null",
    ])
    documents, refreshes = report["index"]["documents"], report["refreshes"]
    assert report["refresh_errors"] == [] and 1 <= len(refreshes) <= 2 and report["fallback_steps_rank0"] == 0
    index_uri = str(Path(report["run_uri"]) / "index")
    for number, refresh in enumerate(refreshes, start=1):
        partial = refresh["partial"]
        assert (partial["refresh"], partial["slice"], partial["slices"], partial["full"]) == (number, number - 1, 2,
                                                                                              False)
        assert partial["served_reported"] > 0  # the workers reported the negatives they mined
        # about half the corpus (one slice) plus the served negatives of the other half
        assert 0.4 * documents < refresh["documents"] < 0.6 * documents + partial["served_reembedded"]
        manifest = read_manifest(index_uri, refresh["new_version"])
        assert manifest.count == documents  # every document once, the newest vector of each
        assert manifest.extra["step"] == refresh["step"] and manifest.extra["age"] == refresh["age"]
        shares = refresh["age"]["share_by_step"]
        assert abs(sum(shares.values()) - 1) < 1e-3 and refresh["age"]["newest_step"] == refresh["step"]
    first_age = refreshes[0]["age"]
    assert first_age["oldest_step"] == 0 and 0.3 < first_age["share_by_step"]["0"] < 0.6
    if len(refreshes) == 2:  # both slices re-embedded: nothing left from the base model
        assert refreshes[1]["age"]["oldest_step"] == refreshes[0]["step"]
