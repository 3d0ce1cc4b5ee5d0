"""Shared parts of the contrastive benchmarks: data, the sentence-transformers baseline, Whetstone
runs and one evaluation used for every model (so the methods differ only in how they trained).

Not a benchmark itself; ``contrastive_quality.py`` and ``contrastive_throughput.py`` import it.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "retrieval"
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Beir:
    corpus: dict[str, str]  # doc id -> "title. text" (as Whetstone embeds documents)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade


def load_beir(folder: Path, split: str) -> Beir:
    """A BEIR folder; qrels with or without a header row (msmarco-dl19-subset has none)."""
    from whetstone.data.schemas import document_text

    def rows(path: Path):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            yield from (json.loads(line) for line in fh if line.strip())

    corpus_file = next(p for p in (folder / "corpus.jsonl", folder / "corpus.jsonl.gz") if p.exists())
    query_file = next(p for p in (folder / "queries.jsonl", folder / "queries.jsonl.gz") if p.exists())
    corpus = {str(r["_id"]): document_text(r.get("title") or "", r["text"]) for r in rows(corpus_file)}
    queries = {str(r["_id"]): r["text"] for r in rows(query_file)}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[2].strip().lstrip("-").isdigit():
            continue  # header row
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return Beir(corpus, {q: queries[q] for q in qrels if q in queries}, qrels)


def train_pairs(beir: Beir) -> list[tuple[str, str, str]]:
    """(query id, query, positive text) for every positive judgment: the ST baselines' rows."""
    return [(qid, beir.queries[qid], beir.corpus[doc]) for qid, rels in beir.qrels.items()
            for doc, grade in rels.items() if grade > 0 and qid in beir.queries and doc in beir.corpus]


def evaluate(model_dir: str, beir: Beir, doc_max_length: int = 256, query_max_length: int = 64,
             per_query: bool = False) -> dict:
    """nDCG@10 / Recall@100 of ``model_dir`` on ``beir`` (exact cosine search, float32); with
    ``per_query`` also ``per_query_ndcg@10`` (query id -> nDCG@10)."""
    from whetstone.eval.retrieval import evaluate_encoder
    from whetstone.models.encoder import Encoder

    encoder = Encoder.load(model_dir)
    doc_ids = list(beir.corpus)
    doc_vectors = encoder.encode([beir.corpus[d] for d in doc_ids], batch_size=32, max_length=doc_max_length)
    metrics = evaluate_encoder(Encoder.load_query(model_dir), beir.queries, beir.qrels, doc_ids, doc_vectors, query_max_length,
                               per_query=per_query)
    keep = ("ndcg@10", "recall@100", "per_query_ndcg@10")
    return {key: metrics[key] for key in keep if key in metrics}


def peak_rss_gib() -> float:
    """This process's peak RSS (``VmHWM``; see ``benchmarks.index_scale_data.peak_rss_gib``)."""
    from benchmarks.index_scale_data import peak_rss_gib as own_peak

    return own_peak()


def train_sentence_transformers(base: str, rows: list[tuple[str, str]] | list[tuple[str, str, str]], out_dir: str,
                                steps: int, batch: int, lr: float, max_length: int, seed: int,
                                dropout: float | None = None, bf16: bool = False) -> dict:
    """The baseline: ``SentenceTransformerTrainer`` with MultipleNegativesRankingLoss (scale 20,
    i.e. temperature 0.05), no duplicate texts in a batch, ``steps`` steps of ``batch`` rows.

    ``rows`` are (anchor, positive) or (anchor, positive, negative) texts. ``dropout``: None keeps
    the model's own (0.1 for MiniLM, what sentence-transformers users train with); a number sets it.
    ``bf16``: the trainer's ``bf16=True`` (its forward and backward under bf16 autocast, float32
    weights; on CPU too).
    """
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.training_args import BatchSamplers

    torch.manual_seed(seed)
    model = SentenceTransformer(base, device="cpu")
    model.max_seq_length = max_length
    if dropout is not None:
        from whetstone.models.encoder import set_dropout

        set_dropout(model, dropout)
    columns = {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]}
    if len(rows[0]) == 3:
        columns["negative"] = [r[2] for r in rows]
    args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="st-bench-"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, warmup_ratio=0.1, seed=seed, data_seed=seed, save_strategy="no", logging_steps=1,
        report_to=[], batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True,
        disable_tqdm=True, use_cpu=True, bf16=bf16,
    )
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of each step, measured as Whetstone's are: from the end of the previous step
        (or the start of training) to the end of this one, so data loading counts."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, *args, **kwargs) -> None:
            self.marks = [time.perf_counter()]

        def on_step_end(self, *args, **kwargs) -> None:
            self.marks.append(time.perf_counter())

    clock = StepClock()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=20.0),
                                         callbacks=[clock])
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    model.save(out_dir)
    step_s = [round(b - a, 3) for a, b in zip(clock.marks[:-1], clock.marks[1:], strict=True)]
    return {"steps": output.global_step, "seconds": round(seconds, 2),
            # the comparison figure: steady pairs/s by the same rule as Whetstone's (steps after the first two)
            "pairs_per_s": round(steady_pairs_per_s([{"step_s": t} for t in step_s], batch), 3),
            "pairs_per_s_whole_train": round(output.global_step * batch / seconds, 3),
            "step_s": step_s, "final_loss": output.training_loss, "peak_rss_gib": round(peak_rss_gib(), 2)}


def ingest_scifact(root: str) -> str:
    """The shipped scifact-subset ingested into a store under ``root`` (train/test pairs, corpus)."""
    from whetstone.data.ingest import ingest_beir
    from whetstone.datasets import path

    store = str(Path(root) / "scifact")
    if not (Path(store) / "manifest.json").exists():
        ingest_beir(str(path("scifact-subset")), store, rows_per_shard=500)
    return store


def run_whetstone(store: str, base: str, out_uri: str, *, workers: int, batch_per_worker: int, epochs: int | None,
                  max_steps: int | None, lr: float, live: bool, seed: int, doc_max_length: int = 256,
                  query_max_length: int = 64, refresh_every: int | None = None, extra: dict | None = None,
                  gradient_checkpointing: bool = False) -> dict:
    """One contrastive job in this process's Ray (started on first use); returns its report plus
    per-step timings read from the run's history."""
    from ray import serve
    from whetstone.config.contrastive import ContrastiveJobConfig

    from jobs.train_contrastive import run

    raw = {
        "run_name": f"bench-{int(time.time() * 1000) % 10**9}", "store_uri": store, "output_uri": out_uri,
        "if_exists": "overwrite",
        "encoder": {"base_model": base, "query_max_length": query_max_length, "doc_max_length": doc_max_length,
                    "gradient_checkpointing": gradient_checkpointing},
        "optim": {"num_workers": workers, "batch_size": batch_per_worker, "epochs": epochs or 1,
                  "max_steps": max_steps, "lr": lr, "temperature": 0.05, "seed": seed, "log_every": 5},
        "negatives": {"source": "index" if live else "none",
                      "mining": {"num_negatives": 1, "rank_start": 3, "rank_end": 30, "sampling": "random"},
                      "max_steps_behind": 3 * refresh_every if live and refresh_every else None},
        "refresh": {"every_steps": refresh_every if live else None, "doc_max_length": 128, "dtype": "bfloat16"},
        "index": {"kind": "flat", "initial_embed_concurrency": 2},
        # The benchmarks evaluate every model with one function (evaluate()), so the job skips its own.
        "eval": {"split": None, "doc_max_length": 128},
        "ray_object_store_mb": 512,
    }
    for dotted, value in (extra or {}).items():
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    config = ContrastiveJobConfig.model_validate(raw)
    started = time.perf_counter()
    report = run(config)
    report["wall_s"] = round(time.perf_counter() - started, 2)
    history_uri = Path(out_uri) / "train-history.json"
    history = json.loads(history_uri.read_text()) if history_uri.exists() else []
    report["history"] = history
    if live:
        serve.delete("whetstone-index")
    return report


def variant_overrides(name: str) -> dict:
    """The job overrides a benchmark method's or mode's name asks for: ``_cached`` (the index's stored
    vectors as negatives), ``_bf16`` (bf16 autocast), ``_frozen_queries`` (a frozen query tower),
    ``_partial`` (``refresh.fraction=0.25``)."""
    extra: dict = {}
    if "_cached" in name:
        extra["negatives.encode"] = False
    if "_bf16" in name:
        extra["encoder.precision"] = "bfloat16"
    if name.endswith("_frozen_queries"):
        extra["encoder.query_tower"] = "frozen"
    if "_partial" in name:  # partial refresh: a rotating quarter of the corpus plus recently served negatives
        extra["refresh.fraction"] = 0.25
    return extra


def steady_pairs_per_s(history: list[dict], global_batch: int, skip: int = 2) -> float:
    """Global pairs/s over the steps after the first ``skip`` (start-up, first index search)."""
    times = [m["step_s"] for m in history[skip:]] or [m["step_s"] for m in history]
    return global_batch * len(times) / sum(times)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1_5_15": list(os.getloadavg()),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def mean_spread(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "n": len(array)}
