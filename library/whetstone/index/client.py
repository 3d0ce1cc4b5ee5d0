"""How training code talks to the index service: a Serve handle inside the cluster, HTTP outside.

The trainer asks for hard negatives every step and must never stall on the index. Every call has
a timeout; a timeout, a refused connection, a missing deployment, an index with no version yet or
a shard of a sharded index that does not answer raise :class:`IndexUnavailable`, the signal to
fall back to in-batch negatives for that step (and count it). After a failure the client fails fast for ``retry_after_s`` instead of waiting out
the timeout again on every step. A request the service rejects (wrong dimension, k out of range,
bad token) raises :class:`IndexRequestError`: that is a bug to fix, not an outage to ride out.
Which is which is decided by the answer's HTTP status and error code (:func:`is_outage`), never by
its message.

The client is picklable: build it on the driver, ship it in the train config or closure; the
handle or HTTP connection is created lazily in the process that uses it. Its sync methods must
not be called from inside an asyncio event loop (e.g. another Serve deployment).

Example::

    client = IndexClient.from_handle(timeout_s=2.0)         # inside the Ray cluster
    client = IndexClient.from_http("http://host:8000/index", token=...)  # anywhere
    try:
        result = client.search(query_vectors, k=30, exclude_ids=positive_ids)
    except IndexUnavailable:
        result = None  # in-batch negatives this step
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from whetstone.index.wire import (
    APP_NAME,
    DEPLOYMENT_NAME,
    DeleteRequest,
    ErrorCode,
    IndexServiceError,
    SearchArrays,
    SearchRequest,
    SearchResponse,
    StoredVectors,
    SwapRequest,
    UpsertRequest,
    parse_code,
)

logger = logging.getLogger(__name__)


class IndexUnavailable(RuntimeError):
    """The index service is slow, down, not deployed or has no version loaded: fall back."""


class IndexRequestError(ValueError):
    """The service rejected the request (4xx): ``status`` is the HTTP status code, ``code`` the
    service's :class:`~whetstone.index.wire.ErrorCode` (a string when this client does not know
    it, None when the answer carried none)."""

    def __init__(self, message: str, status: int, code: ErrorCode | str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# Codes that mean "not there now" whatever the status they came with.
_OUTAGE_CODES = (ErrorCode.NO_VERSION, ErrorCode.SHARD_UNAVAILABLE, ErrorCode.VERSION_UNAVAILABLE)


def is_outage(status: int, code: ErrorCode | str | None) -> bool:
    """Whether an error answer means "the index is not there now, fall back" (True) rather than
    "the service refused this request, fix it" (False).

    Any 5xx is an outage: the service's ``no_version`` (no index loaded yet), ``shard_unavailable``
    (one shard of a sharded index did not answer; the message names it) and ``version_unavailable``
    (a shard is still loading the version a swap just published) among them. An answer
    without the service's ``code`` did not come from its routes: a 404 then is Serve's proxy
    saying no application serves the route (not deployed yet, or deleted), an outage too; any
    other coded 4xx is the service refusing the request.
    """
    if status >= 500 or code in _OUTAGE_CODES:
        return True
    return code is None and status == 404


@dataclass
class SearchResult:
    """Results computed on one index ``version``.

    Attributes:
        ids: Q lists of k document ids ("" where padded).
        scores: (Q, k) float32 similarities (-inf where padded).
    """

    version: int
    ids: list[list[str]]
    scores: np.ndarray
    latency_ms: float | None = None
    excluded_scores: list[list[float | None]] | None = None  # per query, per excluded id (when asked)
    embedded_step: int | None = None  # the training step whose checkpoint embedded ``version``, when recorded


class IndexClient:
    """Search and manage the index service through a Serve handle or HTTP (see module docs)."""

    def __init__(
        self,
        mode: Literal["handle", "http"],
        *,
        app_name: str = APP_NAME,
        deployment: str = DEPLOYMENT_NAME,
        base_url: str | None = None,
        token: str | None = None,
        timeout_s: float = 5.0,
        admin_timeout_s: float = 120.0,
        retry_after_s: float = 5.0,
    ) -> None:
        if mode == "http" and not base_url:
            raise ValueError("base_url: required for an HTTP client")
        self.mode = mode
        self.app_name = app_name
        self.deployment = deployment
        self.base_url = (base_url or "").rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.admin_timeout_s = admin_timeout_s
        self.retry_after_s = retry_after_s
        self.unavailable_count = 0
        self._failed_at: float | None = None
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._methods: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def from_handle(
        cls, app_name: str = APP_NAME, deployment: str = DEPLOYMENT_NAME, timeout_s: float = 5.0, **kwargs
    ) -> IndexClient:
        """A client for code running inside the Ray cluster (e.g. a Ray Train worker)."""
        return cls("handle", app_name=app_name, deployment=deployment, timeout_s=timeout_s, **kwargs)

    @classmethod
    def from_http(cls, base_url: str, token: str | None = None, timeout_s: float = 5.0, **kwargs) -> IndexClient:
        """A client for ``base_url`` (the app's route prefix, e.g. ``http://127.0.0.1:8000/index``)."""
        return cls("http", base_url=base_url, token=token, timeout_s=timeout_s, **kwargs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_conn"] = None  # handles and HTTP pools are per process
        state["_methods"] = {}
        state.pop("_conn_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._conn_lock = threading.Lock()

    def __repr__(self) -> str:
        where = self.base_url if self.mode == "http" else f"{self.app_name}/{self.deployment}"
        return f"IndexClient({self.mode}: {where}, timeout_s={self.timeout_s})"

    # ------------------------------------------------------------------ public API
    def search(
        self,
        vectors: np.ndarray,
        k: int,
        exclude_ids: Sequence[Sequence[str]] | None = None,
        timeout_s: float | None = None,
        score_excluded: bool = False,
    ) -> SearchResult:
        """The k nearest documents of each query vector (Q, D), excluding ``exclude_ids``.

        With ``score_excluded`` the result also carries each excluded id's score (``None`` where
        unknown): training passes the labelled positives there and gets their scores for the
        false-negative margin in the same call.

        Raises:
            IndexUnavailable: timeout, connection failure, no deployment or no index version.
            IndexRequestError: the service rejected the request (the message names the field).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        excludes = [list(row) for row in exclude_ids] if exclude_ids is not None else None
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.mode == "handle":
            out: SearchArrays = self._call_handle("search_arrays", (vectors, int(k), excludes, score_excluded),
                                                  timeout_s)
            return SearchResult(out["version"], out["ids"], np.asarray(out["scores"], np.float32),
                                out["latency_ms"], out["excluded_scores"], out.get("embedded_step"))
        request = SearchRequest(vectors=vectors.tolist(), k=int(k), exclude_ids=excludes,
                                score_excluded=score_excluded)
        return self._result(SearchResponse.model_validate(self._post("/search", request, timeout_s)))

    def vectors(self, ids: Sequence[str], timeout_s: float | None = None) -> tuple[int, np.ndarray]:
        """``(version, (len(ids), D) float32)``: the index's stored vectors of ``ids`` (handle mode;
        flat and HNSW indexes). Training uses them as cached negative embeddings.

        Raises:
            IndexUnavailable: as :meth:`search`.
            IndexRequestError: unknown ids, or an index kind that stores no full vectors.
        """
        if self.mode != "handle":
            raise IndexRequestError("vectors: only the Serve handle serves stored vectors", 400,
                                    ErrorCode.BAD_INPUT)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        out: StoredVectors = self._call_handle("vectors_arrays", (list(ids),), timeout_s)
        return int(out["version"]), np.asarray(out["vectors"], np.float32)

    def search_texts(self, texts: Sequence[str], k: int, exclude_ids=None, timeout_s: float | None = None):
        """Like :meth:`search`, with texts embedded by the encoder the index was built with."""
        request = SearchRequest(texts=list(texts), k=int(k),
                                exclude_ids=[list(r) for r in exclude_ids] if exclude_ids is not None else None)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.mode == "handle":
            response = self._call_handle("search", (request,), timeout_s)
        else:
            response = SearchResponse.model_validate(self._post("/search", request, timeout_s))
        return self._result(response)

    def swap(self, version: int) -> dict:
        """Load ``version`` from storage into the service and publish it as LATEST."""
        return self._admin("swap", "/swap", SwapRequest(version=version))

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> dict:
        """Add or replace documents; the service publishes a new version and returns it."""
        request = UpsertRequest(ids=list(ids), vectors=np.asarray(vectors, np.float32).tolist())
        return self._admin("upsert", "/upsert", request)

    def delete(self, ids: Sequence[str]) -> dict:
        return self._admin("delete", "/delete", DeleteRequest(ids=list(ids)))

    def stats(self) -> dict:
        """Version, size, counters, latency percentiles and every replica's version."""
        if self.mode == "handle":
            return self._call_handle("stats", (), self.timeout_s, use_breaker=False)
        return self._request("GET", "/stats", None, self.timeout_s, use_breaker=False)

    def close(self) -> None:
        if self.mode == "http" and self._conn is not None:
            self._conn.close()
        self._conn = None

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _result(response: SearchResponse) -> SearchResult:
        scores = np.array([[-np.inf if s is None else s for s in row] for row in response.scores],
                          dtype=np.float32).reshape(len(response.ids), -1)
        return SearchResult(response.version, response.ids, scores, response.latency_ms, response.excluded_scores,
                            response.embedded_step)

    def _admin(self, method: str, path: str, request) -> dict:
        if self.mode == "handle":
            out = self._call_handle(method, (request,), self.admin_timeout_s, use_breaker=False)
            return out.model_dump() if hasattr(out, "model_dump") else out
        return self._post(path, request, self.admin_timeout_s, use_breaker=False)

    def _check_breaker(self) -> None:
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_after_s:
            self.unavailable_count += 1
            raise IndexUnavailable(f"index service failed {time.monotonic() - self._failed_at:.1f}s ago; "
                                   f"not retrying for {self.retry_after_s}s")

    def _unavailable(self, message: str, use_breaker: bool) -> IndexUnavailable:
        self.unavailable_count += 1
        if use_breaker:
            self._failed_at = time.monotonic()
        self._conn = None if self.mode == "handle" else self._conn  # a redeployed app: fresh handle
        return IndexUnavailable(message)

    def _handle(self):
        with self._conn_lock:
            if self._conn is None:
                import ray
                from ray import serve

                if not ray.is_initialized():
                    raise IndexUnavailable("not connected to a Ray cluster (ray.init first)")
                self._conn = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
            return self._conn

    def _method_handle(self, method: str):
        """``handle.<method>``, built once per method (each attribute access builds a new handle)."""
        handle = self._handle()
        cached = self._methods.get(method)
        if cached is None or cached[0] is not handle:
            cached = self._methods[method] = (handle, getattr(handle, method))
        return cached[1]

    def _call_handle(self, method: str, args: tuple, timeout_s: float, use_breaker: bool = True):
        if use_breaker:
            self._check_breaker()
        try:
            response = self._method_handle(method).remote(*args)
        except IndexUnavailable as err:
            raise self._unavailable(str(err), use_breaker) from None
        except Exception as err:  # noqa: BLE001 - no controller, no app, no deployment
            raise self._unavailable(f"no index deployment {self.app_name}/{self.deployment}: {err}",
                                    use_breaker) from None
        try:
            out = response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()
            raise self._unavailable(f"index search timed out after {timeout_s}s", use_breaker) from None
        except IndexServiceError as err:  # raised by the replica; Ray re-raises it with its type
            if is_outage(err.status, err.code):
                raise self._unavailable(f"index service: {err.detail}", use_breaker) from None
            raise IndexRequestError(str(err.detail), err.status, err.code) from None
        except Exception as err:  # noqa: BLE001 - dead replicas, back-pressure, shutdown
            raise self._unavailable(f"index service call failed: {type(err).__name__}: {err}",
                                    use_breaker) from None
        self._failed_at = None
        return out

    def _http(self):
        with self._conn_lock:
            if self._conn is None:
                import httpx

                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                self._conn = httpx.Client(base_url=self.base_url, headers=headers)
            return self._conn

    def _post(self, path: str, request, timeout_s: float, use_breaker: bool = True) -> dict:
        return self._request("POST", path, request.model_dump(mode="json", exclude_none=True),
                             timeout_s, use_breaker)

    def _request(self, verb: str, path: str, body: dict | None, timeout_s: float, use_breaker: bool = True):
        import httpx

        if use_breaker:
            self._check_breaker()
        try:
            response = self._http().request(verb, path, json=body, timeout=timeout_s)
        except httpx.TimeoutException:
            raise self._unavailable(f"{verb} {self.base_url}{path} timed out after {timeout_s}s",
                                    use_breaker) from None
        except httpx.TransportError as err:
            raise self._unavailable(f"{verb} {self.base_url}{path} failed: {err}", use_breaker) from None
        if response.status_code >= 400:
            detail, code = _error_body(response)
            if is_outage(response.status_code, code):
                raise self._unavailable(f"{verb} {self.base_url}{path}: HTTP {response.status_code} "
                                        f"{response.text[:300]}", use_breaker)
            raise IndexRequestError(f"HTTP {response.status_code}: {detail}", response.status_code, code)
        self._failed_at = None
        return response.json()


def _error_body(response) -> tuple[object, ErrorCode | str | None]:
    """``(detail, code)`` of an error answer; ``(text, None)`` when it is not the service's JSON."""
    try:
        body = response.json()
    except ValueError:
        return response.text, None
    if not isinstance(body, dict):
        return response.text, None
    return body.get("detail", response.text), parse_code(body.get("code"))
