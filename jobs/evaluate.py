"""Evaluate an embedding model on a BEIR-format split in the store: nDCG@10, Recall@100, MRR@10.

The corpus is embedded with Ray Data batch inference and ranked exactly as its batches stream in
(chunked FAISS search, a running top 100 per query: no process holds the corpus' vectors); the JSON result goes
to ``output_uri`` (default ``<store_uri>/eval/<name>.json``) and the last line printed is its path.

Launch:
  local:           python -m jobs.evaluate --config jobs/configs/evaluate/smoke.yaml
  ray job submit:  ray job submit --working-dir . -- python -m jobs.evaluate \
                       --config jobs/configs/evaluate/scifact.yaml model=s3://bucket/runs/x/train/final
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from pydantic import Field
from whetstone.config.base import StorageConfig, StrictModel
from whetstone.console import DEFAULT_EVERY_S, PROGRESS_EVERY_S_HELP


class EvaluateJobConfig(StrictModel):
    model: str = Field("all-MiniLM-L6-v2", description="model folder, storage URI or alias")
    store_uri: str = Field(..., description="an ingested store (local path or s3://)")
    split: str = Field("test", description="qrels split whose queries are evaluated")
    storage: StorageConfig = StorageConfig()
    query_max_length: int = Field(64, ge=8, le=512, description="tokens kept per query")
    doc_max_length: int = Field(256, ge=16, le=512, description="tokens kept per document (title and text)")
    batch_size: int = Field(32, ge=1, description="documents per encoder forward in each embedding actor")
    embed_concurrency: int = Field(2, ge=1, description="embedding actors (Ray Data) over the corpus")
    name: str = Field("eval", pattern=r"^[A-Za-z0-9_.-]+$", description="names the result: "
                      "<store_uri>/eval/<name>.json")
    output_uri: str | None = Field(None, description="where the JSON result is written; default "
                                   "<store_uri>/eval/<name>.json")
    ray_num_cpus: int = Field(8, ge=1, description="logical CPUs when this job starts its own local Ray")
    ray_object_store_mb: int = Field(512, ge=128, description="object store memory (MiB) when this job "
                                     "starts its own local Ray")
    progress_every_s: float = Field(DEFAULT_EVERY_S, ge=0, description=PROGRESS_EVERY_S_HELP)


def main(argv: Sequence[str] | None = None) -> dict:
    from whetstone import storage as store
    from whetstone.data.stream import load_eval_split
    from whetstone.eval.retrieval import evaluate_rankings, exact_rankings
    from whetstone.models.encoder import Encoder
    from whetstone.train.refresh import CorpusVectors, embed_progress, embedded_batches
    from whetstone.train.runtime import init_ray, parse_job_args

    config = parse_job_args(EvaluateJobConfig, argv, __doc__)
    init_ray(config.ray_num_cpus, config.ray_object_store_mb)
    started = time.monotonic()
    split = load_eval_split(config.store_uri, config.split, config.storage)
    encoder = Encoder.load_query(config.model, storage=config.storage)  # an asymmetric model's query tower
    query_ids = list(split.queries)
    query_vectors = encoder.encode([split.queries[q] for q in query_ids], max_length=config.query_max_length)
    corpus = CorpusVectors(embedded_batches(config.store_uri, config.model, config.storage, config.batch_size,
                                            config.doc_max_length, config.embed_concurrency),
                           progress=embed_progress(f"corpus, {config.model}", config.store_uri, config.storage,
                                                   config.progress_every_s))
    metrics = evaluate_rankings(exact_rankings(query_ids, query_vectors, corpus, None, 100), split.qrels)
    result = {"model": config.model, "store_uri": config.store_uri, "split": config.split,
              "documents": corpus.rows, **metrics, "seconds": round(time.monotonic() - started, 1)}
    output = config.output_uri or store.join(config.store_uri, "eval", f"{config.name}.json")
    store.write_bytes(output, json.dumps(result, indent=2).encode(), config.storage)
    print(f"[eval] {config.model} on {config.split}: nDCG@10 {metrics['ndcg@10']:.4f} "
          f"Recall@100 {metrics['recall@100']:.4f} MRR@10 {metrics['mrr@10']:.4f} "
          f"({int(metrics['queries'])} queries, {corpus.rows} docs)", flush=True)
    print(f"result: {output}", flush=True)
    return result


if __name__ == "__main__":
    main()
