"""The index service's arguments (``serve run ... key=value`` or the Serve config's ``args``).

One model for the whole application: the router (``IndexService``, the ingress) and every shard
deployment (``IndexService-shard-{s}``) get the same validated copy.
"""

from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from whetstone.config.base import KEEP_VERSIONS_HELP, StorageConfig, StrictModel, renamed_field

from services.http_common import INDEX_TOKEN_ENV as TOKEN_ENV
from services.http_common import resolve_token as _resolve_token

# Settings `reconfigure` may change on a live deployment (user_config); the rest need a redeploy.
LIVE_FIELDS = ("protect_reads", "max_k", "max_queries_per_request", "max_exclude_per_query", "max_request_bytes",
               "batch_max_size", "batch_wait_timeout_s", "poll_interval_s", "shard_timeout_s", "swap_timeout_s")


class IndexServiceArgs(StrictModel):
    """Arguments of :func:`services.index.app.build_app`.

    ``num_replicas`` is the old name of ``replicas_per_shard`` and still accepted (the job configs
    and older Serve configs use it).
    """

    index_uri: str = Field(description="index root holding v{n}/, LATEST and STAGED (local dir or s3://)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    auth_token: SecretStr | None = Field(None, description=f"bearer token; falls back to ${TOKEN_ENV}")
    protect_reads: bool = False
    num_shards: int | None = Field(
        None, ge=1, description="shard deployments; must equal the snapshots' num_shards. None: the published "
                                "snapshot's (build_app reads LATEST's manifest), 1 when nothing is published")
    replicas_per_shard: int = Field(1, ge=1, description="replicas of each shard (throughput, availability)")
    swap_mode: Literal["beside", "blue_green"] = Field(
        "beside", description="beside: a swap loads v+1 into every shard replica beside v, then flips (a "
                              "replica holds two versions for a moment, about 2x its shard); blue_green: two "
                              "replica sets per shard, a swap loads v+1 into the idle set, flips, and the old "
                              "set drops v (no process holds two versions; idle replicas hold nothing between "
                              "swaps). Mutations stay in the serving set either way (docs/scale.md)")
    num_cpus: float = Field(0.25, gt=0, description="CPUs of each shard replica (FAISS runs there)")
    use_gpu: bool = Field(False, description="shard replicas ask Ray for GPUs and move their shard to FAISS GPU")
    gpus_per_replica: float = Field(1.0, gt=0, description="GPUs of each shard replica when use_gpu")
    shard_custom_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each shard replica asks for, e.g. {\"index\": 1} "
                                          "to place shards on the worker group that advertises it (docs/scale.md)")
    router_replicas: int = Field(1, ge=1, description="replicas of the ingress (it holds no vectors)")
    router_cpus: float = Field(0.25, gt=0, description="CPUs of each ingress replica (fan-out, merge, texts)")
    max_ongoing_requests: int = Field(128, ge=1, description="per replica; must exceed batch_max_size")
    max_k: int = Field(1000, ge=1)
    max_queries_per_request: int = Field(1024, ge=1)
    max_exclude_per_query: int = Field(1000, ge=0)
    keep_versions: int | None = Field(10, ge=1, description=KEEP_VERSIONS_HELP + "; applied after each mutation")
    max_request_bytes: int = Field(16 * 1024**2, ge=1024, description="largest request body; larger ones get "
                                                                      "413 before they are parsed")
    batch_max_size: int = Field(32, ge=1, description="requests merged into one FAISS call (per shard replica)")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a search waits for others to arrive before it starts (Serve's batch "
                               "window); 0: it starts at once, and what queues behind running calls is merged anyway")
    poll_interval_s: float = Field(2.0, gt=0, description="how often replicas follow LATEST and STAGED")
    shard_timeout_s: float = Field(
        5.0, gt=0, description="how long the ingress waits for a shard's answer before it answers 503 "
                               "shard_unavailable naming the shard (and fails fast until the shard "
                               "answers a probe again)")
    swap_timeout_s: float = Field(
        120.0, gt=0, description="how long a swap waits for every replica of every shard to load the version")
    encoder_device: str | None = Field(None, description="device for text queries (in the ingress); None = auto")
    health_check_period_s: float = Field(5.0, gt=0)
    search_threads: int | None = Field(
        None, ge=1, description="FAISS (OpenMP) threads per shard replica; None keeps Ray's setting, one thread "
                                "per whole CPU the replica asked for (at least one)")
    search_workers: int = Field(
        1, ge=1, description="FAISS calls a shard replica runs at once, each on its own thread with "
                             "`search_threads` OpenMP threads")
    access_log: bool = Field(False, description="Serve's per-request log lines (CPU at high QPS)")

    @model_validator(mode="before")
    @classmethod
    def _old_replicas_name(cls, data: Any) -> Any:
        return renamed_field(data, "num_replicas", "replicas_per_shard", "")

    @property
    def num_replicas(self) -> int:
        """The old name of :attr:`replicas_per_shard`."""
        return self.replicas_per_shard


def shard_deployment_name(router: str, shard: int, slot: int = 0) -> str:
    """``IndexService-shard-2``: the deployment serving ``shard`` beside the ingress ``router``;
    ``IndexService-shard-2-b``: its second replica set (``swap_mode=blue_green``)."""
    return f"{router}-shard-{shard}" + ("-b" if slot else "")


def num_slots(args: IndexServiceArgs) -> int:
    """Replica sets per shard: 2 for ``blue_green``, else 1."""
    return 2 if args.swap_mode == "blue_green" else 1


def resolve_token(args: IndexServiceArgs) -> str | None:
    """The configured bearer token, else ``$WHETSTONE_INDEX_TOKEN``, else None."""
    return _resolve_token(args.auth_token, TOKEN_ENV)


def live_update(args: IndexServiceArgs, user_config: dict) -> IndexServiceArgs:
    """``args`` with a deployment's ``user_config`` applied; only ``LIVE_FIELDS`` may change live."""
    unknown = set(user_config) - set(LIVE_FIELDS)
    if unknown:
        raise ValueError(f"user_config: {sorted(unknown)} cannot change live (allowed: {LIVE_FIELDS})")
    return IndexServiceArgs.model_validate({**args.model_dump(), **user_config})
