"""The index service's HTTP layer around the replica: the FastAPI app, bearer-token checks, error
answers (every one carries a ``code``, see ``whetstone.index.wire``), the error counter and the
``/search`` fast path.

Everything here finds the replica it runs in through Serve's replica context; the replica (see
``services.index.router.IndexService``) provides ``args.protect_reads``, ``token``, ``recorder`` and
``fast_search(headers, body)`` (JSON bytes, an ``IndexServiceError`` to answer, or None).
"""

import hmac
import json

import pydantic_core
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from whetstone.index.wire import ErrorCode, IndexServiceError

TOKEN_ENV = "WHETSTONE_INDEX_TOKEN"

_bearer = HTTPBearer(auto_error=False)
# Refusals raised by the web framework itself (an unknown path, a wrong method), by status.
_FRAMEWORK_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


def build_fastapi() -> FastAPI:
    """The service's FastAPI app: error answers with codes, the error counter, the fast path."""
    app = FastAPI(
        title="Whetstone index service",
        description="A live, versioned FAISS index. Every search response names the index version; "
                    "every error answer carries a `code` beside its `detail`.",
    )
    app.add_exception_handler(IndexServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _framework_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_ErrorCounter)
    app.add_middleware(_SearchFastPath)  # added last: outermost, so its answers skip the counter
    app.openapi = lambda: _openapi(app)
    return app


def _servable():
    return serve.get_replica_context().servable_object


# ---------------------------------------------------------------- auth
def _check_token(credentials: HTTPAuthorizationCredentials | None, expected: str | None, what: str) -> None:
    if expected is None:
        raise IndexServiceError(ErrorCode.FORBIDDEN, f"{what} refused: no auth token is configured on the "
                                                     f"service (set auth_token or ${TOKEN_ENV})")
    if credentials is None:
        raise IndexServiceError(ErrorCode.UNAUTHORIZED, f"{what} needs an `Authorization: Bearer <token>` header",
                                headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise IndexServiceError(ErrorCode.FORBIDDEN, f"{what} refused: the bearer token is not valid")


async def require_write_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """HTTP-only dependency (handle callers skip it): mutations always need the token."""
    _check_token(credentials, _servable().token, "mutation")


async def require_read_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    service = _servable()
    if service.args.protect_reads:
        _check_token(credentials, service.token, "read")


# Route options: ``@fastapi_app.post("/search", **READ)``. The access mark lets the OpenAPI
# document say which routes the token guards on this deployment.
_ACCESS = "x-whetstone-access"
READ = {"dependencies": [Depends(require_read_token)], "openapi_extra": {_ACCESS: "read"}}
WRITE = {"dependencies": [Depends(require_write_token)], "openapi_extra": {_ACCESS: "write"}}


def bearer_matches(headers, expected: str | None) -> bool:
    """Whether raw ASGI ``headers`` carry ``Authorization: Bearer <expected>`` (the fast path's check)."""
    if expected is None:
        return False
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(),
                                                                      expected.encode())
    return False


def is_json(headers) -> bool:
    """A JSON content type, as FastAPI decides it (``application/json`` or ``application/*+json``)."""
    for name, value in headers:
        if name == b"content-type":
            kind = value.decode("latin-1").split(";", 1)[0].strip().lower()
            return kind == "application/json" or kind.startswith("application/") and kind.endswith("+json")
    return False


# ---------------------------------------------------------------- OpenAPI
_OPENAPI: dict[bool, dict] = {}  # per protect_reads


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI document as this deployment answers: read routes (``READ``) list the bearer
    token only where ``protect_reads`` is on (FastAPI lists it on every route with the dependency)."""
    protect = bool(_servable().args.protect_reads)
    if protect not in _OPENAPI:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                if operation.get(_ACCESS) == "read":
                    operation["description"] = operation.get("description", "") + (
                        "\n\nNeeds the bearer token: this service protects reads." if protect
                        else "\n\nOpen: this service does not protect reads.")
                    if not protect:
                        operation.pop("security", None)
        _OPENAPI[protect] = schema
    return _OPENAPI[protect]


# ---------------------------------------------------------------- error answers
async def _service_error(request: Request, err: IndexServiceError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _framework_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    body = request.scope.get(BODY_SCOPE_KEY)
    if err.status_code == 400 and body is not None:  # FastAPI's "error parsing the body" names nothing
        try:
            pydantic_core.from_json(body)
        except ValueError as parse:  # e.g. "recursion limit exceeded at line 1 column 213"
            return JSONResponse({"detail": [{"loc": ["body"], "msg": f"invalid JSON: {parse}", "type": "json_invalid"}],
                                 "code": ErrorCode.BAD_INPUT.value}, status_code=422)
    code = _FRAMEWORK_CODES.get(err.status_code, ErrorCode.HTTP_ERROR)
    return JSONResponse({"detail": err.detail, "code": code.value}, status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input: it can be a large matrix, and a NaN
    in it would make the default handler's JSON encoding fail (a 500)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in err.errors()]
    return JSONResponse({"detail": detail, "code": ErrorCode.BAD_INPUT.value}, status_code=422)


# ---------------------------------------------------------------- ASGI middleware
class _ErrorCounter:
    """Pure ASGI middleware counting responses >= 400 per path (Starlette's @middleware("http")
    costs a task and a stream copy per request; this only peeks at the status line)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counting(message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                _servable().recorder.error(scope.get("path", ""), message["status"])
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

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        servable = _servable()
        limit = servable.args.max_request_bytes
        declared = _content_length(scope["headers"])
        if declared is not None and declared > limit:
            return await _refuse_size(scope, send, servable, f"{declared} bytes (Content-Length)", limit)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay(b"".join(chunks), message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _refuse_size(scope, send, servable, f"more than {limit} bytes", limit)
        body = scope[BODY_SCOPE_KEY] = b"".join(chunks)
        if scope["method"] != "POST" or not scope["path"].endswith("/search"):
            return await self.app(scope, _replay(body, None, receive), send)
        answer = await servable.fast_search(scope["headers"], body)
        if answer is None:
            return await self.app(scope, _replay(body, None, receive), send)
        status = 200
        if isinstance(answer, IndexServiceError):  # the search ran and failed (e.g. a shard is down)
            status = answer.status
            servable.recorder.error(scope.get("path", ""), status)
            answer = json.dumps(answer.body()).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


BODY_SCOPE_KEY = "whetstone.body"  # the request body, read once by _SearchFastPath


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse_size(scope, send, servable, size: str, limit: int) -> None:
    """413 with a code, before the body is parsed (or read further)."""
    err = IndexServiceError(ErrorCode.REQUEST_TOO_LARGE, f"request body: {size} exceeds max_request_bytes={limit}")
    servable.recorder.error(scope.get("path", ""), err.status)
    answer = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": answer})


def _replay(body: bytes, last: dict | None, receive):
    """An ASGI ``receive`` that gives ``body`` back as one message (then ``last``, then the rest)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}] + ([last] if last else [])

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed
