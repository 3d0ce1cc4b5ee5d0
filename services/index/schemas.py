"""The index service's wire format, defined once: the Serve app and the training client import it.

Static limits (types, finite floats, k >= 1, exactly one of vectors/texts) are checked here, so
FastAPI answers 422 naming the field; limits that depend on the loaded index or the deployment's
settings (dimension, max k, batch size) are checked by the service and also answer 4xx.
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_NAME = "whetstone-index"
DEPLOYMENT_NAME = "IndexService"
ROUTE_PREFIX = "/index"

# JSON accepts NaN/Infinity literals through Python's parser; a finite float refuses them.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Wire):
    """Query vectors (already embedded) or texts (embedded by the snapshot's encoder)."""

    vectors: list[list[FiniteFloat]] | None = Field(None, description="(Q, D) query vectors")
    texts: list[str] | None = Field(None, description="Q query texts")
    k: int = Field(10, ge=1, description="results per query")
    exclude_ids: list[list[str]] | None = Field(None, description="per query, ids never to return")
    score_excluded: bool = Field(
        False, description="also return each excluded id's score (e.g. the labelled positives, for a "
                           "false-negative margin); null where the id is unknown or the kind keeps no vectors")

    @model_validator(mode="after")
    def _one_input(self) -> "SearchRequest":
        if (self.vectors is None) == (self.texts is None):
            raise ValueError("give exactly one of `vectors` or `texts`")
        queries = self.vectors if self.vectors is not None else self.texts
        if not queries:
            raise ValueError("`vectors` / `texts` must hold at least one query")
        if self.exclude_ids is not None and len(self.exclude_ids) != len(queries):
            raise ValueError(f"`exclude_ids` has {len(self.exclude_ids)} lists for {len(queries)} queries")
        return self


class SearchResponse(_Wire):
    """Results computed on one index version. ``scores`` are None where a row is padded
    (fewer than k documents qualified): JSON has no -inf."""

    version: int
    ids: list[list[str]]
    scores: list[list[float | None]]
    latency_ms: float
    excluded_scores: list[list[float | None]] | None = None


class SwapRequest(_Wire):
    version: int = Field(ge=0, description="snapshot to load from storage; it becomes LATEST")


class SwapResponse(_Wire):
    version: int
    previous_version: int | None
    replica_id: str
    load_ms: float


class UpsertRequest(_Wire):
    """Add or replace documents; the result is published as a new snapshot version."""

    ids: list[str] = Field(min_length=1)
    vectors: list[list[FiniteFloat]] | None = None
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "UpsertRequest":
        if (self.vectors is None) == (self.texts is None):
            raise ValueError("give exactly one of `vectors` or `texts`")
        rows = self.vectors if self.vectors is not None else self.texts
        if len(rows) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids for {len(rows)} rows")
        return self


class DeleteRequest(_Wire):
    ids: list[str] = Field(min_length=1)


class MutationResponse(_Wire):
    """The new version a mutation published (``version == previous_version`` when nothing changed)."""

    version: int
    previous_version: int | None
    changed: int
    size: int


class ReplicaInfo(_Wire):
    replica_id: str
    version: int | None
    size: int
    pid: int
    updated_at: float = Field(description="unix time of the replica's last report")


class StatsResponse(_Wire):
    version: int | None
    checkpoint: str | None
    size: int
    dim: int | None
    kind: str | None
    built_at: str | None
    requests_total: int
    queries_total: int
    errors_total: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    faiss_calls_total: int = Field(0, description="FAISS searches run; batched requests share one")
    requests_per_faiss_call: float | None = Field(None, description="mean search requests merged per FAISS call")
    faiss_ms_p50: float | None = Field(None, description="median wall time of one (batched) FAISS search")
    replica_id: str
    pid: int
    replicas: list[ReplicaInfo] = Field(
        default_factory=list, description="every live replica's last report (version per replica)"
    )
