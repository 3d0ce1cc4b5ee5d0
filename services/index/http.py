"""The index service's HTTP layer around the replica: the FastAPI app, its bearer-token checks,
the error counter and the ``/search`` fast path. Token checks, error answers (every one carries a
``code``, see ``whetstone.index.wire``) and the OpenAPI document's security marks are shared with
the embedding service (``services.http_common``).

Everything here finds the replica it runs in through Serve's replica context; the replica (see
``services.index.router.IndexService``) provides ``args.protect_reads``, ``token``, ``recorder`` and
``fast_search(headers, body)`` (JSON bytes, an ``IndexServiceError`` to answer, or None).
"""

import json

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from whetstone.index.wire import ErrorCode, IndexServiceError

from services.http_common import (
    BODY_SCOPE_KEY,
    INDEX_TOKEN_ENV,
    access,
    add_error_handlers,
    bearer,
    bearer_matches,
    check_token,
    openapi_document,
    token_sources,
)
from services.http_common import servable as _servable

TOKEN_ENV = INDEX_TOKEN_ENV
TOKEN_SOURCES = token_sources(INDEX_TOKEN_ENV)

__all__ = ["READ", "TOKEN_ENV", "WRITE", "bearer_matches", "build_fastapi", "is_json", "route_label"]


def build_fastapi() -> FastAPI:
    """The service's FastAPI app: error answers with codes, the error counter, the fast path."""
    app = FastAPI(
        title="Whetstone index service",
        description="A live, versioned FAISS index. Every search response names the index version; "
                    "every error answer carries a `code` beside its `detail`.",
    )
    add_error_handlers(app)
    app.add_middleware(_ErrorCounter, service_app=app)
    app.add_middleware(_SearchFastPath, service_app=app)  # added last: outermost, so its answers skip the counter
    app.openapi = lambda: _openapi(app)
    return app


# ---------------------------------------------------------------- auth
async def require_write_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """HTTP-only dependency (handle callers skip it): mutations always need the token."""
    check_token(credentials, _servable().token, "mutation", TOKEN_SOURCES)


async def require_read_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    service = _servable()
    if service.args.protect_reads:
        check_token(credentials, service.token, "read", TOKEN_SOURCES)


# Route options: ``@fastapi_app.post("/search", **READ)``.
READ = access("read", require_read_token)
WRITE = access("write", require_write_token)


def is_json(headers) -> bool:
    """A JSON content type, as FastAPI decides it (``application/json`` or ``application/*+json``)."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.decode("latin-1").split(";", 1)[0].strip().lower()
            return kind == "application/json" or kind.startswith("application/") and kind.endswith("+json")
    return False


# ---------------------------------------------------------------- OpenAPI
_OPENAPI: dict[bool, dict] = {}  # per protect_reads
_READ_NOTES = {("read", True): "Needs the bearer token: this service protects reads.",
               ("read", False): "Open: this service does not protect reads."}


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document as this deployment answers: read routes (``READ``) list the bearer
    token only where ``protect_reads`` is on (FastAPI lists it on every route with the dependency)."""
    protect = bool(_servable().args.protect_reads)
    if protect not in _OPENAPI:
        _OPENAPI[protect] = openapi_document(app, {"read": protect}, _READ_NOTES)
    return _OPENAPI[protect]


# ---------------------------------------------------------------- the error counter
def route_label(scope, app: FastAPI) -> str:
    """The ``path`` label of a response: the app's route (``/search``, without the route prefix),
    or ``other`` for a path the app does not serve, so scanners cannot grow the metric's series."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path if any(getattr(r, "path", None) == path for r in app.routes) else "other"


class _ErrorCounter:
    """Pure ASGI middleware counting responses >= 400 per route (Starlette's @middleware("http")
    costs a task and a stream copy per request; this only peeks at the status line)."""

    def __init__(self, app, service_app: FastAPI) -> None:
        self.app = app
        self.service_app = service_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                _servable().recorder.error(route_label(scope, self.service_app), message["status"])
            await send(message)

        await self.app(scope, receive, send_counting)


class _SearchFastPath:
    """Pure ASGI: every request body is read here once, refused with 413 beyond
    ``max_request_bytes`` (before it is parsed), kept in the scope for error answers, and replayed
    to the app; and the fast path for the hot request, a valid ``POST /search`` with vectors.

    It parses the body with pydantic's JSON parser straight into ``SearchRequest``, runs the
    same checks and the same batched search as the FastAPI route, and writes the response with
    pydantic-core's serialiser. Anything else (texts, a missing or wrong token where reads are
    protected, an input that fails a check) is handed to the FastAPI route with the body replayed,
    so every error answer comes from one implementation; a search that ran and failed (a shard
    down) is answered here with the same error body, so it is not run twice. Under 32 concurrent clients on 2 cores,
    FastAPI's request machinery and stdlib JSON were a third of the replica's event loop.
    """

    def __init__(self, app, service_app: FastAPI) -> None:
        self.app = app
        self.service_app = service_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        service = _servable()
        limit = service.args.max_request_bytes
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            return await self._refuse_size(scope, send, service, f"{declared} bytes (Content-Length)", limit)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay(b"".join(chunks), message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse_size(scope, send, service, f"more than {limit} bytes", limit)
        body = scope[BODY_SCOPE_KEY] = b"".join(chunks)
        if scope["method"] != "POST" or not scope["path"].endswith("/search"):
            return await self.app(scope, _replay(body, None, receive), send)
        answer = await service.fast_search(scope["headers"], body)
        if answer is None:
            return await self.app(scope, _replay(body, None, receive), send)
        status = 200
        if isinstance(answer, IndexServiceError):  # the search ran and failed (e.g. a shard is down)
            status = answer.status
            service.recorder.error("/search", status)
            answer = json.dumps(answer.body()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    async def _refuse_size(self, scope, send, service, size: str, limit: int) -> None:
        """413 with a code, before the body is parsed (or read further)."""
        err = IndexServiceError(ErrorCode.REQUEST_TOO_LARGE,
                                f"request body: {size} exceeds max_request_bytes={limit}")
        service.recorder.error(route_label(scope, self.service_app), err.status)
        answer = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": answer})


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, last: dict | None, receive):
    """An ASGI ``receive`` that gives ``body`` back as one message (then ``last``, then the rest)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}] + ([last] if last else [])

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed
