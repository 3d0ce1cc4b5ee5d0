"""Retrieval metrics by hand, negative mining rules, and config errors that name the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from whetstone.config.base import ConfigError, load_config
from whetstone.config.contrastive import ContrastiveJobConfig, QuickstartConfig
from whetstone.eval.retrieval import (
    evaluate_encoder,
    evaluate_rankings,
    exact_rankings,
    ndcg_at_k,
    per_query_ndcg,
    recall_at_k,
)
from whetstone.index.mining import MiningConfig, mine_negatives


def test_ndcg_by_hand():
    # rel a=1 at rank 2: DCG = 1/log2(3); IDCG = 1
    assert ndcg_at_k(["b", "a"], {"a": 1}, 10) == pytest.approx(1 / math.log2(3))
    # graded: ideal order [x(3), y(1)]; ranking [y, x]: DCG = 1 + 3/log2(3)
    dcg = 1 + 3 / math.log2(3)
    idcg = 3 + 1 / math.log2(3)
    assert ndcg_at_k(["y", "x"], {"x": 3, "y": 1}, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["z"], {"x": 1}, 10) == 0.0


def test_recall_and_skip_unjudged():
    assert recall_at_k(["a", "c"], {"a": 1, "b": 1, "c": 0}, 100) == 0.5
    metrics = evaluate_rankings({"q1": ["a"], "q2": ["b"]}, {"q1": {"a": 1}, "q2": {"x": 0}})
    assert metrics["queries"] == 1 and metrics["ndcg@10"] == 1.0


def test_per_query_ndcg_is_what_evaluate_rankings_averages():
    rankings = {"q1": ["a", "b"], "q2": ["b", "a"], "q3": ["c"]}
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}, "q3": {"x": 0}}  # q3 has nothing relevant: skipped
    per_query = per_query_ndcg(rankings, qrels)
    assert per_query == pytest.approx({"q1": 1.0, "q2": 1 / math.log2(3)})
    assert evaluate_rankings(rankings, qrels)["ndcg@10"] == pytest.approx(np.mean(list(per_query.values())))
    with pytest.raises(ValueError, match="no ranking"):
        per_query_ndcg({"q1": ["a"]}, qrels)


def test_exact_rankings_order():
    docs = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
    ranked = exact_rankings(["q"], np.array([[1, 0]], dtype=np.float32), ["a", "b", "c"], docs, k=3)
    assert ranked["q"] == ["a", "b", "c"]


class _TableEncoder:
    """Looks each text up in a fixed table of vectors (the metric path, not a model, is under test)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.calls: list[int] = []

    def encode(self, texts, batch_size: int, max_length: int) -> np.ndarray:
        self.calls.append(max_length)
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def test_evaluate_encoder_ranks_the_given_corpus_and_each_matryoshka_width():
    unit = lambda v: np.asarray(v, np.float32) / np.linalg.norm(v)  # noqa: E731
    # At full width q1 is nearest to d2 (the relevant one); on the first two coordinates d1 wins.
    docs = {"d1": unit([1.0, 0.0, 0.0]), "d2": unit([0.2, 0.3, 0.9]), "d3": unit([-1.0, 0.2, 0.0])}
    encoder = _TableEncoder({"q one": unit([0.6, 0.1, 0.8])})
    metrics = evaluate_encoder(encoder, {"q1": "q one"}, {"q1": {"d2": 1}}, list(docs),
                               np.stack(list(docs.values())), query_max_length=7, dims=(2, 3))
    assert encoder.calls == [7]
    assert metrics["ndcg@10"] == pytest.approx(1.0)  # d2 first at full width
    assert set(metrics) >= {"ndcg@10", "recall@100", "mrr@10", "queries", "ndcg@10_dim2"}
    assert "ndcg@10_dim3" not in metrics  # the full width is not repeated
    assert metrics["ndcg@10_dim2"] == pytest.approx(1 / math.log2(3))  # d2 second
    assert metrics["mrr@10_dim2"] == pytest.approx(0.5)
    assert "per_query_ndcg@10" not in metrics
    per_query = evaluate_encoder(encoder, {"q1": "q one"}, {"q1": {"d2": 1}}, list(docs),
                                 np.stack(list(docs.values())), query_max_length=7, per_query=True)
    assert per_query["per_query_ndcg@10"] == pytest.approx({"q1": 1.0})


def test_mining_window_margin_and_fill():
    ids = [["p", "a", "b", "c", "d"]]
    scores = np.array([[0.99, 0.9, 0.8, 0.7, 0.6]])
    config = MiningConfig(num_negatives=3, rank_start=1, rank_end=4, sampling="top", relative_margin=0.1)
    out = mine_negatives(ids, scores, config, np.random.default_rng(0), ["x", "y", "z"],
                         positive_scores=[0.95], exclude=[{"p"}])
    # window ranks 1..3 = a(0.9), b(0.8), c(0.7); margin limit 0.95 * 0.9 = 0.855 drops a
    assert out.ids[0][:2] == ["b", "c"]
    assert out.dropped_by_margin == 1 and out.from_index == 2 and out.random_fill == 1
    assert out.ids[0][2] in {"x", "y", "z"}


def test_mining_never_returns_positives():
    ids = [["p", "a", "b"]]
    config = MiningConfig(num_negatives=2, rank_start=0, rank_end=3, sampling="random")
    out = mine_negatives(ids, np.array([[0.9, 0.8, 0.7]]), config, np.random.default_rng(1), ["p", "q", "r"],
                         exclude=[{"p"}])
    assert "p" not in out.ids[0] and len(out.ids[0]) == 2


def test_mining_window_must_be_ordered():
    with pytest.raises(ValueError, match="rank_end"):
        MiningConfig(rank_start=5, rank_end=5)


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  batch_size: 1\n  lr: 2e-5\n")
    with pytest.raises(ConfigError, match=r"optim\.batch_size"):
        load_config(ContrastiveJobConfig, path)
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(ContrastiveJobConfig, None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="ingest"):
        load_config(QuickstartConfig, None, [])
    with pytest.raises(ConfigError, match="ray_train_log_level"):
        load_config(ContrastiveJobConfig, None, ["ray_train_log_level=LOUD"])
    assert load_config(ContrastiveJobConfig, None, ["ray_train_log_level=INFO"]).ray_train_log_level == "INFO"


def test_overrides_parse_values(tmp_path):
    config = load_config(ContrastiveJobConfig, None, ["optim.lr=1e-5", "refresh.every_steps=3",
                                                      "eval.split=null", "optim.symmetric=true"])
    assert config.optim.lr == 1e-5 and config.refresh.every_steps == 3
    assert config.eval.split is None and config.optim.symmetric is True


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    models = {"quickstart": QuickstartConfig, "train_contrastive": ContrastiveJobConfig}
    checked = 0
    for job, model in models.items():
        for path in sorted((root / job).glob("*.yaml")):
            load_config(model, path)
            checked += 1
    assert checked >= 2


def test_worker_config_round_trips_with_secrets(monkeypatch):
    """The quickstart's config crosses to workers as a ContrastiveJobConfig, secrets included."""
    from whetstone.train.runtime import worker_job_config

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    config = QuickstartConfig.model_validate({"ingest": {"source": "builtin:scifact-subset"}})
    job = worker_job_config(config, ContrastiveJobConfig)
    assert "ingest" not in job
    restored = ContrastiveJobConfig.model_validate(job)
    assert restored.storage.secret_access_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(restored)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    from whetstone.train.contrastive_run import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    config = ContrastiveJobConfig.model_validate({"store_uri": ".whetstone/store/x"})
    fixed = absolute_local_paths(config)
    assert fixed.store_uri == str(tmp_path / ".whetstone/store/x")
    assert fixed.run_uri.startswith(str(tmp_path))
    s3 = absolute_local_paths(ContrastiveJobConfig.model_validate({"store_uri": "s3://b/p"}))
    assert s3.store_uri == "s3://b/p"


def test_every_job_config_validates_against_its_job():
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    models = {"evaluate": ("jobs.evaluate", "EvaluateJobConfig"),
              "refresh_index": ("jobs.refresh_index", "RefreshIndexJobConfig"),
              "ingest": ("jobs.ingest", "IngestJobConfig")}
    for job, (module, name) in models.items():
        model = getattr(importlib.import_module(module), name)
        files = sorted((root / job).glob("*.yaml"))
        assert files, job
        for path in files:
            load_config(model, path)


def test_cached_negatives_need_stored_vectors_and_no_guide():
    assert load_config(ContrastiveJobConfig, None, ["negatives.encode=false", "index.kind=hnsw"]).negatives.encode is False
    with pytest.raises(ConfigError, match="index.kind=ivf keeps no full vectors: negatives.encode=false needs"):
        load_config(ContrastiveJobConfig, None, ["negatives.encode=false", "index.kind=ivf"])
    with pytest.raises(ConfigError, match="does not combine with loss.kind=gist"):
        load_config(ContrastiveJobConfig, None, ["negatives.encode=false", "loss.kind=gist"])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
@pytest.mark.parametrize("margin", ["relative_margin=0.1", "absolute_margin=0.05"])
def test_a_margin_on_a_kind_that_cannot_score_positives_is_refused(kind, margin):
    """IVF kinds keep no full vectors: the positives' scores would come back None and the margin rule
    would silently not run, so the config is refused, naming the fields at fault."""
    name = margin.split("=")[0]
    with pytest.raises(ConfigError, match=rf"index.kind={kind} keeps no full vectors: "
                                          rf"negatives.mining.{name}=\S+ needs each positive's score.*"
                                          rf"remove negatives.mining.{name}"):
        load_config(ContrastiveJobConfig, None, [f"negatives.mining.{margin}", f"index.kind={kind}"])
    for scoring_kind in ("flat", "hnsw"):
        config = load_config(ContrastiveJobConfig, None, [f"negatives.mining.{margin}", f"index.kind={scoring_kind}"])
        assert config.index.scores_documents
    # both rules at once: one message naming both
    with pytest.raises(ConfigError, match=r"absolute_margin=0.05 needs.*negatives.encode=false needs.*"
                                          r"remove negatives.mining.absolute_margin and set negatives.encode=true"):
        load_config(ContrastiveJobConfig, None, ["negatives.mining.absolute_margin=0.05", "negatives.encode=false",
                                                 f"index.kind={kind}"])
    assert load_config(ContrastiveJobConfig, None, [f"index.kind={kind}"]).index.kind == kind  # no rule: fine


def test_index_section_reaches_every_faiss_knob_and_the_shard_layout():
    from whetstone.index.ann import AnnConfig

    config = load_config(ContrastiveJobConfig, None, [
        "index.kind=ivfpq", "index.nlist=256", "index.nprobe=16", "index.pq_m=48", "index.pq_nbits=6",
        "index.hnsw_m=24", "index.ef_construction=120", "index.ef_search=64", "index.use_gpu=true",
        "index.num_shards=4", "index.replicas_per_shard=2", "index.gpus_per_replica=0.5"])
    ann = config.index.ann_config()
    assert type(ann) is AnnConfig
    assert ann == AnnConfig(kind="ivfpq", nlist=256, nprobe=16, pq_m=48, pq_nbits=6, hnsw_m=24, ef_construction=120,
                            ef_search=64, use_gpu="auto")  # CPU build tasks, GPU replicas
    assert (config.index.num_shards, config.index.replicas_per_shard, config.index.gpus_per_replica) == (4, 2, 0.5)
    defaults = ContrastiveJobConfig().index
    assert (defaults.kind, defaults.num_shards, defaults.replicas_per_shard, defaults.use_gpu) == ("flat", 1, 1, False)
    assert defaults.ann_config().use_gpu is False  # CPU unless asked: "auto" would pick a GPU the replica never got
    with pytest.raises(ConfigError, match=r"index\.nprobe"):
        load_config(ContrastiveJobConfig, None, ["index.nprobe=0"])
    with pytest.raises(ConfigError, match=r"index\.num_shards"):
        load_config(ContrastiveJobConfig, None, ["index.num_shards=0"])
    with pytest.raises(ConfigError, match="FAISS has no GPU HNSW"):
        load_config(ContrastiveJobConfig, None, ["index.use_gpu=true", "index.kind=hnsw"])


def test_index_num_replicas_is_the_old_name_of_replicas_per_shard():
    assert load_config(ContrastiveJobConfig, None, ["index.num_replicas=3"]).index.replicas_per_shard == 3
    with pytest.raises(ConfigError, match="give one"):
        load_config(ContrastiveJobConfig, None, ["index.num_replicas=3", "index.replicas_per_shard=2"])


def test_train_log_level_reaches_ray_trains_per_report_logger():
    """The per-step "Reporting training result" logger is named after its file, outside ``ray.train``."""
    import logging

    from ray.train.v2._internal.execution import context
    from whetstone.train.progress import apply_train_log_level

    reporter = logging.getLogger(context.__file__)
    assert context.logger is reporter
    before = reporter.level
    try:
        apply_train_log_level("WARNING")
        assert not reporter.isEnabledFor(logging.INFO) and reporter.isEnabledFor(logging.WARNING)
        apply_train_log_level("INFO")
        assert reporter.isEnabledFor(logging.INFO)
    finally:
        reporter.setLevel(before)


def test_train_run_config_keeps_worker_prints_single_and_sets_the_log_level(tmp_path):
    import logging

    from whetstone.train.runtime import quiet_state_api_warnings, train_run_config

    run_config = train_run_config("train", str(tmp_path / "run"), None, "ERROR")
    assert run_config.logging_config.log_level == "ERROR"
    # Ray Train would otherwise log every worker print as well as print it: two console lines each
    assert run_config.worker_runtime_env["env_vars"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert run_config.name == "train" and run_config.storage_path == str(tmp_path / "run")

    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert placement_group_cleaner.logger is cleaner
    before = cleaner.level
    try:
        quiet_state_api_warnings()
        assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
    finally:
        cleaner.setLevel(before)


def test_staleness_is_bounded_in_steps_and_the_old_version_count_is_refused():
    config = ContrastiveJobConfig.model_validate({"refresh": {"every_steps": 4}})
    assert config.negatives.max_steps_behind is None and config.staleness_bound == 12  # 3 x every_steps
    assert ContrastiveJobConfig.model_validate({"negatives": {"max_steps_behind": 0}}).staleness_bound == 0
    assert ContrastiveJobConfig().staleness_bound is None  # no refresh: the first version serves the whole run
    with pytest.raises(ValueError, match=r"max_versions_behind was replaced by negatives.max_steps_behind.*"
                                         r"\(k \+ 1\) \* E"):
        ContrastiveJobConfig.model_validate({"negatives": {"max_versions_behind": 2}})
