"""The index service's error codes, without Ray: what the HTTP layer answers, and how the client
classifies an answer (by status and code, never by its message)."""

from __future__ import annotations

import pickle

import httpx
import numpy as np
import pytest
from whetstone.index.client import IndexClient, IndexRequestError, IndexUnavailable, is_outage
from whetstone.index.wire import ErrorCode, IndexServiceError, SearchRequest, parse_code

DIM = 4


def test_every_code_but_http_error_has_one_status():
    for code in ErrorCode:
        assert (code.status is None) == (code is ErrorCode.HTTP_ERROR), code
    err = IndexServiceError(ErrorCode.SNAPSHOT_NOT_FOUND, "no snapshot v9 under /x")
    assert (err.status, err.code, err.body()) == (404, ErrorCode.SNAPSHOT_NOT_FOUND,
                                                  {"detail": "no snapshot v9 under /x", "code": "snapshot_not_found"})
    assert IndexServiceError(ErrorCode.HTTP_ERROR, "Method Not Allowed", status=405).status == 405
    with pytest.raises(ValueError, match="status"):
        IndexServiceError(ErrorCode.HTTP_ERROR, "which status?")
    assert parse_code("no_version") is ErrorCode.NO_VERSION
    assert parse_code("from_a_newer_service") == "from_a_newer_service" and parse_code(None) is None


def test_service_error_survives_pickling_and_rays_wrapping():
    """Handle callers get the replica's exception through Ray: its code must come along."""
    from ray.exceptions import RayTaskError

    err = IndexServiceError(ErrorCode.UNAUTHORIZED, "needs a token", headers={"WWW-Authenticate": "Bearer"})
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.status, copy.detail, copy.headers) == (err.code, 401, "needs a token", err.headers)
    wrapped = RayTaskError("search_arrays", "Traceback ...", err).as_instanceof_cause()
    assert isinstance(wrapped, IndexServiceError)
    assert (wrapped.code, wrapped.status, wrapped.detail) == (ErrorCode.UNAUTHORIZED, 401, "needs a token")


@pytest.mark.parametrize(
    ("status", "code", "outage"),
    [
        (503, ErrorCode.NO_VERSION, True),
        (503, ErrorCode.SHARD_UNAVAILABLE, True),  # one shard of a sharded index did not answer
        (503, ErrorCode.VERSION_UNAVAILABLE, True),
        (500, None, True),  # an unhandled error in the replica, or the proxy
        (503, None, True),  # Serve's proxy: no replica can take it
        (404, None, True),  # Serve's proxy: no application serves the route
        (404, ErrorCode.SNAPSHOT_NOT_FOUND, False),  # the service: that version is not published
        (404, ErrorCode.NOT_FOUND, False),  # the service: no such route of its own
        (409, ErrorCode.SNAPSHOT_CONFLICT, False),
        (422, ErrorCode.BAD_INPUT, False),
        (413, ErrorCode.TOO_MANY_QUERIES, False),
        (401, ErrorCode.UNAUTHORIZED, False),
        (403, ErrorCode.FORBIDDEN, False),
        (409, "from_a_newer_service", False),
        (400, None, False),
    ],
)
def test_is_outage_reads_status_and_code(status, code, outage):
    assert is_outage(status, code) is outage


def http_client(answer: httpx.Response) -> IndexClient:
    """An HTTP client whose every request gets ``answer``."""
    client = IndexClient.from_http("http://index.test/index", retry_after_s=0)
    client._conn = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(lambda request: answer))
    return client


QUERY = np.zeros((1, DIM), np.float32)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (httpx.Response(404, json={"detail": "no snapshot v9 under /x", "code": "snapshot_not_found"}),
         ErrorCode.SNAPSHOT_NOT_FOUND),
        (httpx.Response(422, json={"detail": [{"loc": ["body", "k"], "msg": "bad"}], "code": "bad_input"}),
         ErrorCode.BAD_INPUT),
        (httpx.Response(401, json={"detail": "needs a token", "code": "unauthorized"}), ErrorCode.UNAUTHORIZED),
        # The message says "no snapshot", the code says conflict: the code decides.
        (httpx.Response(409, json={"detail": "no snapshot, or is there", "code": "snapshot_conflict"}),
         ErrorCode.SNAPSHOT_CONFLICT),
        (httpx.Response(409, json={"detail": "?", "code": "from_a_newer_service"}), "from_a_newer_service"),
    ],
)
def test_http_client_raises_request_errors_with_the_code(answer, code):
    with pytest.raises(IndexRequestError) as err:
        http_client(answer).search(QUERY, 3)
    assert err.value.status == answer.status_code and err.value.code == code


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(503, json={"detail": "no index version is loaded yet", "code": "no_version"}),
        httpx.Response(503, json={"detail": "shard 1 of 3 (IndexService-shard-1) did not answer: ...",
                                  "code": "shard_unavailable"}),
        httpx.Response(404, text="Path '/index/search' not found. Ping http://.../-/routes for available routes."),
        httpx.Response(404, json={"detail": "Not Found"}),  # JSON, but not the service's (no code)
        httpx.Response(500, text="Internal Server Error"),
    ],
)
def test_http_client_reads_outages_as_unavailable(answer):
    client = http_client(answer)
    with pytest.raises(IndexUnavailable):
        client.search(QUERY, 3)
    assert client.unavailable_count == 1


class _Handle:
    """A stand-in for ``handle.<method>``: ``.remote(...).result()`` raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def remote(self, *args):
        return self

    def result(self, timeout_s: float):
        raise self.error


def handle_client(error: Exception) -> IndexClient:
    client = IndexClient.from_handle(retry_after_s=0)
    client._method_handle = lambda method: _Handle(error)
    return client


def test_handle_client_classifies_the_replicas_error_by_code():
    from ray.exceptions import RayTaskError

    def raised(code: ErrorCode, detail: str = "msg"):
        return RayTaskError("search_arrays", "Traceback ...", IndexServiceError(code, detail)).as_instanceof_cause()

    with pytest.raises(IndexRequestError, match="k: 0 is out of range") as err:
        handle_client(raised(ErrorCode.BAD_INPUT, "k: 0 is out of range")).search(QUERY, 0)
    assert (err.value.status, err.value.code) == (422, ErrorCode.BAD_INPUT)
    with pytest.raises(IndexRequestError) as err:
        handle_client(raised(ErrorCode.SNAPSHOT_NOT_FOUND)).swap(9)
    assert (err.value.status, err.value.code) == (404, ErrorCode.SNAPSHOT_NOT_FOUND)
    with pytest.raises(IndexUnavailable, match="no index version"):
        handle_client(raised(ErrorCode.NO_VERSION, "no index version is loaded yet")).search(QUERY, 3)
    with pytest.raises(IndexUnavailable, match="shard 2 of 4"):
        handle_client(raised(ErrorCode.SHARD_UNAVAILABLE, "shard 2 of 4 (IndexService-shard-2) did not answer: x")
                      ).search(QUERY, 3)
    with pytest.raises(IndexUnavailable, match="ActorDiedError"):
        from ray.exceptions import ActorDiedError

        handle_client(ActorDiedError()).search(QUERY, 3)


# ---------------------------------------------------------------- the service's HTTP layer
class _ErrorLabels:
    """Where the replica's recorder sends its error counts (services.index.metrics.IndexMetrics in a
    replica): kept here as ``(path, status)`` labels."""

    def __init__(self) -> None:
        self.labels: list[tuple[str, int]] = []

    def error(self, path: str, status: int) -> None:
        self.labels.append((path, status))


class _Replica:
    """What the HTTP layer asks of the replica it runs in (see services.index.http)."""

    def __init__(self, token: str | None = "secret") -> None:
        from services.index.app import IndexServiceArgs
        from services.index.replica import StatsRecorder

        self.args = IndexServiceArgs(index_uri="unused")
        self.token = token
        self.recorder = StatsRecorder(_ErrorLabels())

    async def fast_search(self, headers, body: bytes):
        if b"shard-down" in body:  # searched, and a shard did not answer: the fast path answers it
            return IndexServiceError(ErrorCode.SHARD_UNAVAILABLE, "shard 1 of 2 (IndexService-shard-1) did not answer")
        return None  # every other search goes to the routes below


@pytest.fixture()
def layer(monkeypatch):
    """The service's FastAPI app (error handlers, counter, fast path) with two small routes."""
    from fastapi import Depends
    from fastapi.testclient import TestClient

    from services.index import http

    replica = _Replica()
    monkeypatch.setattr(http, "_servable", lambda: replica)
    app = http.build_fastapi()

    @app.post("/search")
    async def search(request: SearchRequest) -> dict:
        raise IndexServiceError(ErrorCode.NO_VERSION, "no index version is loaded yet")

    @app.post("/swap", dependencies=[Depends(http.require_write_token)])
    async def swap() -> dict:
        return {"ok": True}

    with TestClient(app) as client:
        yield client, replica


def test_every_error_answer_carries_a_code_beside_its_detail(layer):
    client, replica = layer
    answers = {
        "no_version": client.post("/search", json={"vectors": [[0.1] * DIM], "k": 2}),
        "bad_input": client.post("/search", json={"vectors": [[0.1] * DIM], "k": 0}),
        "unauthorized": client.post("/swap"),
        "forbidden": client.post("/swap", headers={"Authorization": "Bearer wrong"}),
        "not_found": client.get("/no-such-route"),
        "http_error": client.get("/swap"),  # 405
        "shard_unavailable": client.post("/search", json={"vectors": [[0.1] * DIM], "k": 2,
                                                          "exclude_ids": [["shard-down"]]}),
    }
    statuses = {code: r.status_code for code, r in answers.items()}
    assert statuses == {"no_version": 503, "bad_input": 422, "unauthorized": 401, "forbidden": 403,
                        "not_found": 404, "http_error": 405, "shard_unavailable": 503}
    assert "shard 1 of 2" in answers["shard_unavailable"].json()["detail"]
    for code, r in answers.items():
        assert r.json()["code"] == code and r.json()["detail"], r.text
    assert answers["unauthorized"].headers["www-authenticate"] == "Bearer"
    assert answers["bad_input"].json()["detail"][0]["loc"] == ["body", "k"]
    assert client.post("/swap", headers={"Authorization": "Bearer secret"}).status_code == 200
    assert replica.recorder.errors_total == len(answers)  # every error answer counted, once
    # labelled by the app's route, never by the raw path (a scanner cannot grow the series)
    assert sorted(replica.recorder.metrics.labels) == sorted([
        ("/search", 503), ("/search", 422), ("/swap", 401), ("/swap", 403), ("other", 404), ("/swap", 405),
        ("/search", 503)])
