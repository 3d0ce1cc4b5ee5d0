"""The index service's wire format, defined once: the Serve app and the training client import it.

What travels: the HTTP request and response models; the handle payloads (numpy in, numpy out, for
training workers calling through a Serve handle); the error codes every error answer carries.

Static limits (types, finite floats, k >= 1, exactly one of vectors/texts) are checked here, so
FastAPI answers 422 naming the field; limits that depend on the loaded index or the deployment's
settings (dimension, max k, batch size) are checked by the service and also answer 4xx.

Errors. The service answers an error over HTTP as ``{"detail": <message or field list>, "code":
<ErrorCode>}`` and raises :class:`IndexServiceError` (with ``code``, ``status`` and ``detail``)
to handle callers. Callers decide what an error means from ``(status, code)``, never from the
message: the message is for people. An error answer without a ``code`` did not come from the
service's routes (e.g. Serve's proxy: 404 for a route no application serves, 503 while none can).
"""

from enum import Enum
from typing import Annotated, NotRequired, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_NAME = "whetstone-index"
DEPLOYMENT_NAME = "IndexService"
ROUTE_PREFIX = "/index"

# JSON accepts NaN/Infinity literals through Python's parser; a finite float refuses them.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# One text to embed: the encoders truncate at a few hundred tokens, but tokenise the whole string
# first (an 8 MB text took 10 s), so longer texts are refused.
MAX_TEXT_CHARS = 32_768
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Wire):
    """A request body: strict types, so ``"k": "5"``, ``true`` inside a vector or ``5.0`` for an
    integer are refused with the field named, never coerced (an integer where a float is expected
    is still a number)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(_Request):
    """Query vectors (already embedded) or texts (embedded by the snapshot's encoder)."""

    vectors: list[list[FiniteFloat]] | None = Field(None, description="(Q, D) query vectors")
    texts: list[Text] | None = Field(None, description=f"Q query texts (at most {MAX_TEXT_CHARS} characters each)")
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
    embedded_step: int | None = Field(
        None, description="the training step whose checkpoint embedded this version (None: not recorded)")
    ids: list[list[str]]
    scores: list[list[float | None]]
    latency_ms: float
    excluded_scores: list[list[float | None]] | None = None


class SwapRequest(_Request):
    version: int = Field(ge=0, description="snapshot to load from storage; it becomes LATEST")


class SwapResponse(_Wire):
    version: int
    previous_version: int | None
    replica_id: str
    load_ms: float


class UpsertRequest(_Request):
    """Add or replace documents; the result is published as a new snapshot version."""

    ids: list[str] = Field(min_length=1)
    vectors: list[list[FiniteFloat]] | None = None
    texts: list[Text] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "UpsertRequest":
        if (self.vectors is None) == (self.texts is None):
            raise ValueError("give exactly one of `vectors` or `texts`")
        rows = self.vectors if self.vectors is not None else self.texts
        if len(rows) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids for {len(rows)} rows")
        return self


class DeleteRequest(_Request):
    ids: list[str] = Field(min_length=1)


class MutationResponse(_Wire):
    """The new version a mutation published (``version == previous_version`` when nothing changed)."""

    version: int
    previous_version: int | None
    changed: int
    size: int


class ReplicaInfo(_Wire):
    """One replica's last report: the ingress's own (``version`` = the version it pins searches
    to), or a shard replica's (``version`` = the LATEST it follows, ``versions`` = what it holds)."""

    replica_id: str
    version: int | None
    size: int = Field(description="documents in the replica's current version (its shard's, for a shard)")
    pid: int
    updated_at: float = Field(description="unix time of the replica's last report")
    versions: list[int] = Field(default_factory=list, description="versions held in memory (shard replicas)")
    shard: int | None = Field(None, description="the shard a shard replica serves; None for the ingress")
    requests_total: int | None = Field(None, description="search requests this replica served")
    faiss_calls_total: int | None = Field(None, description="FAISS searches it ran (shard replicas)")
    faiss_ms_p50: float | None = Field(None, description="median wall time of its (batched) FAISS calls")


class ShardInfo(_Wire):
    """One shard deployment in ``/stats``."""

    shard: int
    deployment: str = Field(description="its Serve deployment, e.g. IndexService-shard-2")
    count: int | None = Field(None, description="documents of this shard in the served version")
    available: bool = Field(description="whether the shard answered the last call")
    error: str | None = Field(None, description="why it is unavailable")
    replicas: list[ReplicaInfo] = Field(default_factory=list)


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
    faiss_ms_p50: float | None = Field(None, description="median wall time of one (batched) FAISS search; "
                                                           "sharded: the slowest shard replica's")
    replica_id: str = Field(description="the ingress replica that answered")
    pid: int
    replicas: list[ReplicaInfo] = Field(
        default_factory=list, description="every live ingress replica's last report (version per replica)"
    )
    num_shards: int = Field(1, description="shards the index is split into")
    cells_assigned_at_ingress: bool = Field(
        False, description="IVF over several shards: this ingress finds each query's cells once for every shard "
                           "(the shards share one quantizer); false while it is being fetched, and for other kinds")
    shards: list[ShardInfo] = Field(default_factory=list, description="each shard's replicas and versions")
    swap_mode: str = Field("beside", description="how swaps load a version: beside the served one in every "
                                                 "replica, or (blue_green) into a second, idle replica set")
    idle_shards: list[ShardInfo] = Field(default_factory=list, description="blue_green: the replica set not "
                                                                           "serving (it loads the next version)")


class ErrorCode(str, Enum):
    """Why the service refused a request; each code has one HTTP status (:attr:`status`)."""

    BAD_INPUT = "bad_input"  # 422: a field is invalid (shape, dimension, NaN, k, exclude lists)
    TOO_MANY_QUERIES = "too_many_queries"  # 413: more queries than max_queries_per_request (embed: max_texts)
    REQUEST_TOO_LARGE = "request_too_large"  # 413: the body is larger than max_request_bytes
    TEXTS_UNSUPPORTED = "texts_unsupported"  # 409: this version cannot embed texts (no usable encoder)
    NO_VERSION = "no_version"  # 503: no index version is loaded yet
    SNAPSHOT_NOT_FOUND = "snapshot_not_found"  # 404: the version asked for is not published
    SNAPSHOT_CONFLICT = "snapshot_conflict"  # 409: another writer published that version first
    SNAPSHOT_INVALID = "snapshot_invalid"  # 409: the snapshot is there but broken (checksum, files)
    UNAUTHORIZED = "unauthorized"  # 401: no bearer token
    FORBIDDEN = "forbidden"  # 403: wrong token, or no token configured for mutations
    NOT_FOUND = "not_found"  # 404: no such route in the service
    GONE = "gone"  # 410: a route that moved; the message says where (GET /metrics: Ray's metrics port)
    SHARD_UNAVAILABLE = "shard_unavailable"  # 503: a shard did not answer (the message names it)
    VERSION_UNAVAILABLE = "version_unavailable"  # 503: a shard does not hold the version asked for (yet)
    HTTP_ERROR = "http_error"  # any other refusal of the web framework (e.g. 405); status varies

    @property
    def status(self) -> int | None:
        """The HTTP status this code answers with (None for ``HTTP_ERROR``: it varies)."""
        return _STATUS[self]


_STATUS: dict[ErrorCode, int | None] = {
    ErrorCode.BAD_INPUT: 422, ErrorCode.TOO_MANY_QUERIES: 413, ErrorCode.REQUEST_TOO_LARGE: 413, ErrorCode.TEXTS_UNSUPPORTED: 409,
    ErrorCode.NO_VERSION: 503, ErrorCode.SNAPSHOT_NOT_FOUND: 404, ErrorCode.SNAPSHOT_CONFLICT: 409,
    ErrorCode.SNAPSHOT_INVALID: 409, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.GONE: 410, ErrorCode.SHARD_UNAVAILABLE: 503, ErrorCode.VERSION_UNAVAILABLE: 503,
    ErrorCode.HTTP_ERROR: None,
}


def parse_code(value: object) -> ErrorCode | str | None:
    """The ``code`` of an error body as an :class:`ErrorCode` (kept as a string when this side does
    not know it, e.g. a newer service; None when absent)."""
    if value is None:
        return None
    try:
        return ErrorCode(value)
    except ValueError:
        return str(value)


class IndexServiceError(Exception):
    """An error answer of the service: HTTP callers get ``{"detail", "code"}`` with ``status``;
    handle callers get this exception (Ray re-raises it with its type and attributes).

    Args:
        code: why the request was refused.
        detail: the message (it names the field at fault), or FastAPI's list of field errors.
        status: the HTTP status; defaults to the code's own.
        headers: extra response headers (``WWW-Authenticate`` on a 401).
    """

    def __init__(self, code: ErrorCode, detail, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        status = status if status is not None else ErrorCode(code).status
        if status is None:
            raise ValueError(f"status: required for code {code!r}")
        super().__init__(detail)
        self.code = ErrorCode(code)
        self.detail = detail
        self.status = status
        self.headers = headers

    def __reduce__(self):  # pickled by Ray to reach the handle caller
        return type(self), (self.code, self.detail, self.status, self.headers)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.code.value}: {self.detail}"

    def body(self) -> dict:
        """The JSON body of the HTTP answer."""
        return {"detail": self.detail, "code": self.code.value}


# ---------------------------------------------------------------- handle payloads
class SearchArrays(TypedDict):
    """What ``IndexService.search_arrays`` returns to handle callers (numpy, no JSON-shaped lists);
    each shard answers the ingress in the same shape for its part of the index."""

    version: int
    embedded_step: NotRequired[int | None]  # the ingress adds it: the step whose checkpoint embedded the version
    ids: list[list[str]]  # Q lists of k document ids ("" where padded)
    scores: np.ndarray  # (Q, k) float32, -inf where padded
    latency_ms: float
    excluded_scores: list[list[float | None]] | None  # per query and excluded id, when asked


class StoredVectors(TypedDict):
    """What ``IndexService.vectors_arrays`` returns: the stored vectors of the ids asked for."""

    version: int
    vectors: np.ndarray  # (len(ids), D) float32
