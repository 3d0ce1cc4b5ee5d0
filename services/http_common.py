"""HTTP pieces the index service and the embedding service share.

* Bearer tokens: from the app's ``auth_token`` argument or environment variables (read in the
  replica's own process, e.g. from the pod's Secret), compared in constant time. A missing token
  is a 401 with ``WWW-Authenticate: Bearer``; a wrong one, or none configured where the route
  needs one, a 403. Every message names where the service reads its token from.
* Error answers: ``{"detail", "code"}`` with the codes of ``whetstone.index.wire`` (one parser on
  the client side serves both services), validation errors without echoing the input.
* The OpenAPI document: FastAPI lists the bearer scheme on every route that has the token
  dependency; routes carry an access mark (:func:`access`) and the document drops ``security``
  from those this deployment leaves open.

Everything that depends on the running replica finds it through Serve's replica context
(:func:`servable`).
"""

import hmac
import os
from collections.abc import Callable

import pydantic_core
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from whetstone.index.wire import ErrorCode, IndexServiceError

INDEX_TOKEN_ENV = "WHETSTONE_INDEX_TOKEN"
EMBED_TOKEN_ENV = "WHETSTONE_EMBED_TOKEN"
BODY_SCOPE_KEY = "whetstone.body"  # the request body, where a middleware read it once (index fast path)
ACCESS = "x-whetstone-access"  # the OpenAPI extension naming a route's access mark

bearer = HTTPBearer(auto_error=False)
# Refusals raised by the web framework itself (an unknown path, a wrong method), by status.
_FRAMEWORK_CODES = {401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND}


def servable():
    """The deployment object of the replica this request runs in."""
    from ray import serve

    return serve.get_replica_context().servable_object


# ---------------------------------------------------------------- tokens
def resolve_token(configured: SecretStr | None, *env_names: str) -> str | None:
    """``configured`` when set and non-empty, else the first non-empty of ``env_names``, else None."""
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    for name in env_names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def token_required(token: str | None, protect: bool | None) -> bool:
    """Whether a route that may be left open asks for the bearer token: ``protect`` when set, else
    whether a token is configured."""
    return token is not None if protect is None else protect


def guard_open_route(route: str, configured: SecretStr | None, protect: bool | None, protect_field: str,
                     *env_names: str) -> tuple[str | None, bool]:
    """A replica's token and whether ``route`` asks for it (:func:`token_required`), with the
    start-up warning when the route is open or refuses everything; ``(token, protected)``."""
    import logging

    log = logging.getLogger("services")
    token = resolve_token(configured, *env_names)
    protected = token_required(token, protect)
    if not protected:
        log.warning("%s is open to anyone who reaches it: %s", route, f"{protect_field}=false" if protect is False
                    else f"no token is configured ({token_sources(*env_names)})")
    elif token is None:
        log.warning("%s refuses every request: %s=true and no token is configured (set %s)", route, protect_field,
                    token_sources(*env_names))
    return token, protected


def token_sources(*env_names: str) -> str:
    """Where a service reads its token, for messages: ``auth_token or $A (else $B)``."""
    names = [f"${name}" for name in env_names]
    return "auth_token or " + " (else ".join(names) + ")" * (len(names) - 1)


def check_token(credentials: HTTPAuthorizationCredentials | None, expected: str | None, what: str,
                sources: str) -> None:
    """Raise the 401/403 answer unless ``credentials`` carry ``expected``. ``what`` names the
    request in the message (``"mutation"``); ``sources`` where the token is set (:func:`token_sources`)."""
    if expected is None:
        raise IndexServiceError(ErrorCode.FORBIDDEN, f"{what} refused: no auth token is configured on the "
                                                     f"service (set {sources})")
    if credentials is None:
        raise IndexServiceError(ErrorCode.UNAUTHORIZED, f"{what} needs an `Authorization: Bearer <token>` header "
                                                        f"with the service's token ({sources})",
                                headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise IndexServiceError(ErrorCode.FORBIDDEN, f"{what} refused: the bearer token is not the service's "
                                                     f"({sources})")


def bearer_matches(headers, expected: str | None) -> bool:
    """Whether raw ASGI ``headers`` carry ``Authorization: Bearer <expected>``."""
    if expected is None:
        return False
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(),
                                                                      expected.encode())
    return False


def access(mark: str, dependency: Callable) -> dict:
    """Route options: ``@app.post("/search", **access("read", require_read_token))``. The mark
    lets :func:`openapi_document` say which routes the token guards on this deployment."""
    return {"dependencies": [Depends(dependency)], "openapi_extra": {ACCESS: mark}}


# ---------------------------------------------------------------- OpenAPI
def openapi_document(app: FastAPI, guarded: dict[str, bool], notes: dict[tuple[str, bool], str]) -> dict:
    """The app's OpenAPI document as a deployment answers. ``guarded``: per access mark, whether
    the token is asked for there (an open route's operation loses its ``security`` list);
    ``notes[(mark, guarded)]``: text appended to the description of the routes with that mark."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            mark = operation.get(ACCESS)
            if mark not in guarded:
                continue
            note = notes.get((mark, guarded[mark]))
            if note:
                operation["description"] = operation.get("description", "") + "\n\n" + note
            if not guarded[mark]:
                operation.pop("security", None)
    return schema


# ---------------------------------------------------------------- error answers
def add_error_handlers(app: FastAPI) -> None:
    """Every error answer of ``app`` carries a ``code``."""
    app.add_exception_handler(IndexServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _framework_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


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
