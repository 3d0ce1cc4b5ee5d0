"""Config of the contrastive training job (and the quickstart that wraps it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from whetstone.config.base import (
    KEEP_VERSIONS_HELP,
    MAX_FAILURES,
    MAX_FAILURES_HELP,
    RayTrainLogLevel,
    StorageConfig,
    StrictModel,
    TrackingConfig,
    renamed_field,
)
from whetstone.console import DEFAULT_EVERY_S, PROGRESS_EVERY_S_HELP
from whetstone.index.ann import AnnConfig
from whetstone.index.mining import MiningConfig

# Index kinds that store every document's full vector: the only ones that can score a given
# document (the false-negative margin needs each positive's score) or return its vector (cached
# negatives). IVF-Flat keeps vectors only inside its cell lists, IVF-PQ only codes.
KINDS_WITH_VECTORS = ("flat", "hnsw")


class EncoderConfig(StrictModel):
    base_model: str = Field("all-MiniLM-L6-v2", description="path, storage URI or the MiniLM alias")
    query_max_length: int = Field(48, ge=8, le=512, description="tokens kept per query (training, negative "
                                  "searches, topic clustering and evaluation)")
    doc_max_length: int = Field(
        256, ge=16, le=512, description="tokens kept per training document: positives and re-encoded hard "
        "negatives (the index embeds the corpus with eval.doc_max_length)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: about half the training memory, ~15% slower")
    forward_chunk: int | None = Field(
        16, ge=1, description="encode each step's queries and documents in length-sorted chunks of this many "
                              "rows (same embeddings; on CPU a (64, 256) batch ran 1.5x slower per row than "
                              "chunks of 16); null = one batch per side")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout probability while training (hidden states and attention "
        "probabilities). 0 (default): on CPU attention then runs in SDPA's fused kernel, the step measured "
        "1.5x faster; 0.1 is MiniLM/BERT's own value, what sentence-transformers trains with")
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="bfloat16: the transformer's forward and backward run under bf16 autocast "
        "(weights, optimizer state, pooled embeddings and the loss stay float32). On a CPU with AVX-512 BF16 "
        "a MiniLM training step (16 queries, 32 documents of 256 tokens, one thread) measured 1.7x faster; "
        "on GPUs it needs bf16 support (Ampere or newer)")
    query_tower: Literal["shared", "frozen"] = Field(
        "shared", description="shared: one encoder for queries and documents, both trained. frozen: queries "
        "stay with the base model's weights and only the document tower trains (an asymmetric dual encoder; "
        "saved models are sentence-transformers Router models: encode_query uses the query tower, encode_document "
        "the document tower). Trained on scifact-subset with live negatives it "
        "gained 5.3 nDCG@10 points there (shared: 6.0) and lost 0.45 on msmarco-dl19 (shared: 0.70; "
        "benchmarks/contrastive_quality.py)")


class OptimConfig(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves; Ray gives it that many "
                                   "torch threads (whole CPUs, at least 1)")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker; the embedding actors then take "
                          "one too (see refresh.embed_gpus)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="SPREAD puts workers on different nodes when it can")
    batch_size: int = Field(16, ge=2, description="queries per worker per step")
    epochs: int = Field(1, ge=1, description="passes over the training pairs (max_steps can stop the run "
                        "earlier)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    lr: float = Field(2e-5, gt=0, lt=1, description="peak AdamW learning rate: linear warm-up over "
                      "warmup_ratio, then linear decay to 0 at the last step")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the run's total steps over which the "
                                "learning rate rises linearly to lr")
    max_grad_norm: float = Field(1.0, gt=0, description="clip the gradients' global L2 norm to this before "
                                 "each optimiser step")
    temperature: float = Field(
        0.05, gt=0, le=1, description="softmax temperature of the retrieval loss, InfoNCE or GIST (logits = "
        "cosine / temperature; 0.05 is sentence-transformers' scale 20)")
    symmetric: bool = Field(False, description="add the document-to-query term: each positive is also scored "
                            "against the batch's queries, averaged with the query-to-document loss")
    gather_across_workers: bool = Field(
        True, description="all-gather every worker's documents (positives and hard negatives), so each query "
        "is scored against the global batch; false: only its own worker's documents")
    seed: int = Field(
        0, description="seed of weight init, data shuffles, positive and negative draws, topic clustering "
        "and the task schedule (a resumed run draws what an uninterrupted one would)")
    shuffle_buffer: int = Field(
        2048, ge=0, description="rows in each worker's seeded local shuffle buffer (new batches every epoch)")
    topic_clusters: int | None = Field(
        None, ge=2, description="topic-aware batches (TAS): k-means the training queries, embedded by the base "
                                "model, into this many topics; each worker's batches hold one topic")
    merge_base_weight: float | None = Field(
        None, ge=0, le=1, description="after training, interpolate the weights with the base model's: "
        "(1 - w) * trained + w * base (WiSE-FT, LM-Cocktail), e.g. 0.5; see benchmarks/contrastive_transfer.py "
        "for what it traded on scifact")
    log_every: int = Field(1, ge=1, description="print a progress line and report metrics to Ray Train every N steps")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N steps (refreshes checkpoint at their own steps); "
                                "if_exists=resume continues from the newest complete checkpoint")


class LossConfig(StrictModel):
    """Which contrastive loss the job trains with (temperature and symmetry live in ``optim``)."""

    kind: Literal["infonce", "gist"] = Field(
        "infonce", description="infonce: in-batch + hard negatives; gist: InfoNCE with a frozen guide "
                               "encoder masking candidates it scores above the positive (GISTEmbed)")
    guide_model: str = Field("all-MiniLM-L6-v2", description="gist: frozen guide (path, storage URI or alias)")
    guide_margin: float = Field(0.0, ge=0, description="gist: also drop candidates within this margin")
    guide_margin_strategy: Literal["absolute", "relative"] = Field(
        "absolute", description="gist: drop candidates the guide scores above p - guide_margin (absolute, "
        "cosine units) or above p - |p| x guide_margin (relative), p: the guide's positive score")
    positives: Literal["sample", "all"] = Field(
        "sample", description="queries with several labelled positives. sample: one row per query, its "
                              "positive drawn anew each epoch; all: one row per (query, positive) every "
                              "epoch, the decoupled softmax (each term's denominator excludes the query's "
                              "other positives, which are masked out of its negatives either way)")
    matryoshka_dims: list[int] | None = Field(
        None, description="train every prefix of these widths too (Matryoshka), e.g. [384, 256, 128, 64]")
    matryoshka_weights: list[float] | None = Field(None, description="one per dim; default all 1")

    @model_validator(mode="after")
    def _matryoshka(self) -> LossConfig:
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if weights is not None and (dims is None or len(weights) != len(dims)):
            raise ValueError("loss.matryoshka_weights needs one weight per loss.matryoshka_dims entry")
        if dims is not None and (not dims or min(dims) < 1 or len(set(dims)) != len(dims)):
            raise ValueError(f"loss.matryoshka_dims must be distinct positive widths, got {dims}")
        return self


class NegativesConfig(StrictModel):
    source: Literal["index", "static", "none"] = Field(
        "index", description="index: live negatives, mined every step from the served index (refreshed with "
        "refresh.every_steps); static: mined once before training with the base model through the same index, "
        "rank window and false-negative margin, stored with the pairs (<run>/static-negatives) and resolved by "
        "the data pipeline; none: in-batch negatives only")
    mining: MiningConfig = MiningConfig()
    search_timeout_s: float = Field(
        10.0, gt=0, description="seconds an index search (or stored-vector fetch) may take; past it the step "
        "trains on in-batch negatives only and says so")
    max_steps_behind: int | None = Field(
        None, ge=0, description="staleness bound in training steps: a step whose answering index version was "
        "embedded from a checkpoint more than this many steps older falls back to in-batch negatives (and "
        "says so); live negatives resume with the next fresh version. None: 3 x refresh.every_steps with "
        "refresh on, no bound without (the run then mines its first version throughout). A version arrives "
        "about one refresh's duration after its checkpoint, so size it to 2 x that duration + every_steps")
    @model_validator(mode="before")
    @classmethod
    def _old_staleness_bound(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_versions_behind" in data:
            raise ValueError("negatives.max_versions_behind was replaced by negatives.max_steps_behind: staleness "
                             "is now measured in training steps, from the step each served version was embedded "
                             "at (refreshes that are merged never publish a version, so counting versions "
                             "overstated the lag); e.g. max_versions_behind=k with refresh.every_steps=E is about "
                             "max_steps_behind=(k + 1) * E")
        return data

    encode: bool = Field(
        True, description="False: train against the index's stored vectors of the mined negatives (a negative "
        "cache, Lindgren et al. 2021): no forward or backward for them, gradients through the queries only; "
        "needs index.kind flat or hnsw")


class RefreshConfig(StrictModel):
    every_steps: int | None = Field(None, ge=1, description="checkpoint + re-embed + swap every N steps")
    embed_batch_size: int = Field(32, ge=1, description="documents per encoder forward in each embedding "
                                  "actor (the base model's corpus embedding and every refresh)")
    embed_concurrency: int = Field(1, ge=1, description="embedding actors while training runs")
    embed_cpus: float = Field(1.0, gt=0, description="CPUs each refresh embedding actor reserves")
    doc_max_length: int | None = Field(None, ge=16, le=512,
                                       description="document length for refreshed indexes (None: eval's)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16: faster refreshes on CPU")
    fraction: float = Field(
        1.0, gt=0, le=1, description="share f of the corpus each refresh re-embeds: a rotating slice (every "
        "document within ceil(1/f) refreshes) plus the documents most recently served as hard negatives "
        "(up to served_share x f x N); the new vectors are layered on the previous version's (whetstone."
        "train.partial_refresh). 1: every refresh re-embeds everything")
    served_share: float = Field(0.5, ge=0, le=1, description="partial refresh: the served-negatives budget, as a "
                                                             "share of f x N, on top of the slice")
    embed_gpus: float | None = Field(
        None, ge=0, description="GPUs each embedding actor asks Ray for (the base model's embedding before training "
        "too); None: 1 when optim.use_gpu, else 0 (CPU). 0.5 puts two actors on a GPU")
    gpu_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="autocast dtype of embedding on GPUs (half precision; vectors stay float32)")
    embed_nice: int = Field(
        10, ge=0, le=19, description="CPU priority (nice) of the refresh's embedding actors: on CPUs shared with "
        "training they take what the training workers leave (0: equal share)")
    coordinator_cpus: float = Field(
        0.5, ge=0, description="CPUs the refresher actor reserves: it drives the embedding pipeline, writes the "
        "vector chunks as they pass and evaluates each checkpoint")


class IndexBuildConfig(AnnConfig):
    """How an index version is built: the FAISS kind and its knobs (those of
    :class:`whetstone.index.ann.AnnConfig`; typical values there) and the number of shards.

    A corpus of N documents is split into ``num_shards`` shards by a hash of the id, each built by
    its own Ray task from the vector chunks in storage (``nlist`` is per shard). One shard and
    ``flat`` (the defaults) is right up to a few million documents; docs/scale.md sizes the rest.
    """

    use_gpu: bool = Field(
        False, description="FAISS's GPU index for the shards (needs the `gpu` install extra); served shard "
                           "replicas then ask Ray for GPUs. HNSW has no GPU index in FAISS")
    num_shards: int = Field(1, ge=1, le=4096, description="shards the index is split into (one build task and "
                                                          "one Serve deployment each)")
    build_cpus: float = Field(1.0, gt=0, description="CPUs of each shard's build task (FAISS add/train threads)")

    @model_validator(mode="after")
    def _gpu_kind(self) -> IndexBuildConfig:
        if self.use_gpu and self.kind == "hnsw":
            raise ValueError("index.use_gpu=true with index.kind=hnsw: FAISS has no GPU HNSW index (the replicas "
                             "would hold GPUs they never use); use kind flat, ivf or ivfpq on GPUs")
        return self

    def ann_config(self) -> AnnConfig:
        """The FAISS part, as the index builders take it.

        ``use_gpu=true`` becomes FAISS's ``"auto"``: the build tasks ask Ray for no GPU and build on
        CPU, and a shard replica that asked Ray for GPUs sees one and moves its shard there;
        ``false`` stays false (CPU even where a GPU is visible).
        """
        fields = self.model_dump(include=set(AnnConfig.model_fields))
        return AnnConfig.model_validate({**fields, "use_gpu": "auto" if self.use_gpu else False})

    @property
    def scores_documents(self) -> bool:
        """Whether the kind keeps full vectors, so the index can score a named document (a positive)
        and hand back its stored vector; IVF kinds keep only cell lists (and PQ codes)."""
        return self.kind in KINDS_WITH_VECTORS


class IndexSection(IndexBuildConfig):
    """The job's index: how it is built (:class:`IndexBuildConfig`), served (Serve replicas per
    shard, their CPUs and GPUs) and where Serve listens."""

    replicas_per_shard: int = Field(1, ge=1, description="Serve replicas of each shard (throughput, availability); "
                                                         "num_replicas is accepted as its old name")
    num_cpus: float = Field(0.25, gt=0, description="CPU share of each shard replica")
    gpus_per_replica: float = Field(1.0, gt=0, description="GPUs of each shard replica when use_gpu (0.5: two "
                                                          "replicas share a GPU)")
    router_replicas: int = Field(1, ge=1, description="replicas of the index router (fans out, merges; no vectors)")
    swap_mode: Literal["beside", "blue_green"] = Field(
        "beside", description="how a refresh's swap loads the new version: beside the served one in every shard "
                              "replica (about 2x a shard per process for a moment), or blue_green (a second, idle "
                              "replica set per shard loads it: no process holds two versions; docs/scale.md)")
    initial_embed_concurrency: int = Field(2, ge=1, description="embedding actors before training")
    keep_versions: int | None = Field(10, ge=1, description=KEEP_VERSIONS_HELP)
    http_host: str = Field("127.0.0.1", description="Serve HTTP proxy host (0.0.0.0 to expose it)")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port for /index/search etc.")

    @model_validator(mode="before")
    @classmethod
    def _old_replicas_name(cls, data: Any) -> Any:
        return renamed_field(data, "num_replicas", "replicas_per_shard", "index.")


class EvalConfig(StrictModel):
    split: str | None = Field("test", description="qrels split to evaluate; None skips evaluation")
    doc_max_length: int = Field(
        256, ge=16, le=512, description="tokens kept per document when the corpus is embedded for evaluation "
        "and index v1 (refreshes too, unless refresh.doc_max_length)")
    batch_size: int = Field(32, ge=1, description="unused: evaluation embeds the corpus in "
                            "refresh.embed_batch_size batches")


class AuxTaskConfig(StrictModel):
    """One auxiliary task of a Piccolo2-style multi-task run (the retrieval pairs are the main task)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="names the task in logs and the report")
    kind: Literal["sts", "classification"] = Field(
        ..., description="sts: {sentence1, sentence2, score} with CoSENT; classification: {text, label} with "
        "label contrast")
    data: str = Field(..., description="JSONL(.gz) or Parquet file, or a folder / s3:// prefix of them")
    share: float = Field(..., gt=0, description="sampling weight of this task's steps (retrieval: "
                         "multitask.retrieval_share)")
    weight: float | None = Field(None, ge=0, description="loss multiplier; Piccolo2: sts 0.04, classification 0.2")
    temperature: float | None = Field(None, gt=0, le=1, description="Piccolo2: 0.05 for both kinds")
    max_negatives: int = Field(10, ge=1, description="classification: other labels per text (Piccolo2: 10)")
    batch_size: int | None = Field(None, ge=2, description="rows per worker per step; default optim.batch_size")
    max_length: int = Field(128, ge=8, le=512, description="tokens per text (both sides, and label texts)")


class MultiTaskSection(StrictModel):
    """Piccolo2's multi-task hybrid (arXiv 2405.06932): each step trains ONE task, drawn with
    probability proportional to its share from (seed, step) alone, so every worker takes the same
    task at the same step; an epoch is a pass over the retrieval pairs."""

    retrieval_share: float = Field(1.0, gt=0, description="sampling weight of retrieval steps")
    tasks: list[AuxTaskConfig] = Field(default_factory=list, description="auxiliary tasks; empty: retrieval only")

    @model_validator(mode="after")
    def _distinct_names(self) -> MultiTaskSection:
        names = [task.name for task in self.tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"multitask.tasks: names must be distinct, repeated {repeated}")
        if "retrieval" in names:
            raise ValueError("multitask.tasks: 'retrieval' names the main task (the pairs); pick another name")
        return self

    def shares(self) -> dict[str, float]:
        return {"retrieval": self.retrieval_share, **{task.name: task.share for task in self.tasks}}


class DocTextSection(StrictModel):
    """Where document texts come from during training: ``partitions`` Ray actors holding the corpus
    text once, split by a hash of the id (``whetstone.data.doc_lookup``); workers and the data
    pipeline ask them for the texts of mined negatives and positives instead of each loading the
    corpus."""

    partitions: int = Field(2, ge=1, le=1024, description="text lookup actors (each holds 1/partitions of the "
                                                          "corpus text)")
    num_cpus: float = Field(0.1, gt=0, description="CPU share each lookup actor reserves")


class ContrastiveJobConfig(StrictModel):
    """Train an embedding model with live hard negatives from the index service."""

    run_name: str = Field(
        "contrastive", pattern=r"^[A-Za-z0-9_.-]+$", description="names the run: its outputs go to "
        "<store_uri>/runs/<run_name> unless output_uri is set")
    store_uri: str = Field(".whetstone/store", description="ingested shards (local path or s3://)")
    output_uri: str | None = Field(None, description="run outputs; default <store_uri>/runs/<run_name>")
    storage: StorageConfig = StorageConfig()
    if_exists: Literal["error", "overwrite", "resume"] = Field(
        "error", description="what to do when the run's outputs already exist")
    max_failures: int = Field(MAX_FAILURES, ge=-1, description=MAX_FAILURES_HELP)
    train_split: str = Field("train", description="pairs split trained on (the store's pairs/<split>)")
    encoder: EncoderConfig = EncoderConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    negatives: NegativesConfig = NegativesConfig()
    refresh: RefreshConfig = RefreshConfig()
    index: IndexSection = IndexSection()
    eval: EvalConfig = EvalConfig()
    multitask: MultiTaskSection = MultiTaskSection()
    doc_text: DocTextSection = DocTextSection()
    ray_num_cpus: int = Field(8, ge=1, description="logical CPUs when this job starts its own local Ray")
    ray_object_store_mb: int = Field(1024, ge=128, description="object store memory (MiB) when this job "
                                     "starts its own local Ray")
    ray_train_log_level: RayTrainLogLevel = Field(
        "WARNING", description="console level of Ray Train's own logs (INFO: its per-step report lines too)")
    tracking: TrackingConfig = TrackingConfig()
    progress_every_s: float = Field(DEFAULT_EVERY_S, ge=0, description=PROGRESS_EVERY_S_HELP)

    @model_validator(mode="after")
    def _refresh_needs_index(self) -> ContrastiveJobConfig:
        if self.refresh.every_steps and self.negatives.source != "index":
            raise ValueError("refresh.every_steps needs negatives.source=index")
        self._index_can_score()
        if self.negatives.source == "static" and not self.negatives.encode:
            raise ValueError("negatives.source=static needs negatives.encode=true (static negatives are re-encoded "
                             "with the current weights every step; the cached vectors come from the live index)")
        if not self.negatives.encode and self.loss.kind == "gist":
            raise ValueError("negatives.encode=false does not combine with loss.kind=gist (the guide "
                             "scores the negatives' text)")
        if self.encoder.query_tower == "frozen" and self.multitask.tasks:
            raise ValueError("encoder.query_tower=frozen does not combine with multitask.tasks (their pairs "
                             "are symmetric; both sides go through one tower)")
        return self

    def _index_can_score(self) -> None:
        """Refuse the rules that need a document's score or stored vector from an index kind that keeps
        neither (IVF), instead of training without them: the search would answer, the rule would not run."""
        if self.index.scores_documents:
            return
        mining = self.negatives.mining
        needs, fixes = [], []
        for name, value in (("relative_margin", mining.relative_margin), ("absolute_margin", mining.absolute_margin)):
            if value:
                needs.append(f"negatives.mining.{name}={value} needs each positive's score")
                fixes.append(f"remove negatives.mining.{name}")
        if not self.negatives.encode:
            needs.append("negatives.encode=false needs each negative's stored vector")
            fixes.append("set negatives.encode=true")
        if needs:
            raise ValueError(f"index.kind={self.index.kind} keeps no full vectors: {'; '.join(needs)}. Use "
                             f"index.kind flat or hnsw, or {' and '.join(fixes)}")

    @property
    def embed_gpus(self) -> float:
        """GPUs per embedding actor: ``refresh.embed_gpus``, or 1 when the run trains on GPUs."""
        if self.refresh.embed_gpus is not None:
            return self.refresh.embed_gpus
        return 1.0 if self.optim.use_gpu else 0.0

    @property
    def staleness_bound(self) -> int | None:
        """``negatives.max_steps_behind``, or its default: 3 x ``refresh.every_steps`` with refresh on,
        no bound without (see the field)."""
        if self.negatives.source != "index":
            return None
        if self.negatives.max_steps_behind is not None:
            return self.negatives.max_steps_behind
        return 3 * self.refresh.every_steps if self.refresh.every_steps else None

    @property
    def run_uri(self) -> str:
        from whetstone.storage import join

        return self.output_uri or join(self.store_uri, "runs", self.run_name)


class IngestSpec(StrictModel):
    source: str = Field(..., description="BEIR folder (local), e.g. data/scifact-subset")
    format: Literal["beir"] = Field("beir", description="source format (a BEIR folder only)")
    rows_per_shard: int = Field(1000, ge=1, description="rows per Parquet shard written")
    skip_if_present: bool = Field(True, description="skip the ingest when <store_uri>/manifest.json exists; "
                                  "false: ingest again, replacing the store")


class QuickstartConfig(ContrastiveJobConfig):
    """Ingest a BEIR folder into the store, then run the contrastive job on it."""

    run_name: str = Field(
        "quickstart", pattern=r"^[A-Za-z0-9_.-]+$", description="names the run: its outputs go to "
        "<store_uri>/runs/<run_name> unless output_uri is set")
    ingest: IngestSpec
