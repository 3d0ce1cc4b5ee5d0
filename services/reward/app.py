"""Reward model service: ``POST /score`` rewards (prompt, response) pairs with one versioned reward
model, batching concurrent requests; online preference training calls it every step.

The model is a folder (or ``s3://`` URI) that the preference job's ``mode=reward_model`` saves,
loaded with ``whetstone.models.reward.RewardModel.load``. Its version is the one given
(``version``), else ``rm-`` and 8 hex digits of a hash of the folder's files, so the same files
always answer with the same version. Every answer carries the version that scored it.

Batching. Concurrent calls, HTTP ``POST /score`` and the handle method ``score_batch`` alike, go
through one ``@serve.batch`` queue: up to ``max_batch_size`` requests arriving within
``batch_wait_timeout_s`` of the first are merged, their pairs concatenated and scored in model
batches of ``score_batch_size`` pairs (length-sorted, so padding stays small), and the scores
split back per request. One request may carry up to ``max_items`` pairs. ``batch_log`` (handle)
lists what each recent batch held.

Reload. ``POST /reload {"model_uri", "version"}`` loads the new model beside the served one, then
swaps; a batch scores with the model it started with, so no answer mixes versions. A model that
does not load answers 422 and the old one keeps serving. A reload changes the one replica it
reaches, so it is refused (409) with ``num_replicas > 1``, and a replica that Serve restarts
comes back with the deployed ``model_uri``: to change the model for good, redeploy with the new
``model_uri`` (Serve replaces the replicas one by one); the version in each answer tells which
model scored it either way.

Auth. Token: ``auth_token``, else ``$WHETSTONE_REWARD_TOKEN``, else ``$WHETSTONE_INDEX_TOKEN``
(one Secret can serve every app). ``POST /score`` asks for ``Authorization: Bearer <token>``
whenever a token is configured (open, with a warning at start, when none is), unless ``protect``
says otherwise: true refuses every request with 403 when no token is configured, false keeps the
route open. ``POST /reload`` always needs the token (403 when none is configured). Missing token:
401; wrong: 403. ``/healthz`` is open. Handle calls come from inside the cluster and need no
token. Error answers carry a ``code`` (``whetstone.index.wire.ErrorCode``).

  export WHETSTONE_REWARD_TOKEN=secret
  serve run services.reward.app:build_app model_uri=.whetstone/runs/rm/model --route-prefix /reward
  curl -X POST localhost:8000/reward/score -H 'content-type: application/json' -H "Authorization: Bearer $WHETSTONE_REWARD_TOKEN" -d '{"prompts": ["Hi"], "responses": ["Hello!"]}'
"""

# No `from __future__ import annotations`: FastAPI must see the request model as a class.
import asyncio
import collections
import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field, SecretStr, ValidationError
from ray import serve
from ray.serve import Application
from whetstone.config.base import StorageConfig, StrictModel
from whetstone.index.wire import ErrorCode, IndexServiceError
from whetstone.online.generation import pick_device
from whetstone.online.reward_client import APP_NAME, ROUTE_PREFIX, RewardClient

from services.http_common import (
    INDEX_TOKEN_ENV,
    access,
    add_error_handlers,
    bearer,
    check_token,
    guard_open_route,
    openapi_document,
    servable,
    token_sources,
)
from services.reward.schemas import (
    DEPLOYMENT_NAME,
    HealthResponse,
    ReloadRequest,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
)

logger = logging.getLogger(__name__)
REWARD_TOKEN_ENV = "WHETSTONE_REWARD_TOKEN"
TOKEN_ENVS = (REWARD_TOKEN_ENV, INDEX_TOKEN_ENV)  # read in this order, after the auth_token argument
TOKEN_SOURCES = token_sources(*TOKEN_ENVS)
BATCH_LOG_SIZE = 1000  # recent batches kept for batch_log
app = FastAPI(title="Whetstone reward model service",
              description="Scores (prompt, response) pairs with one versioned reward model. Every error answer "
                          "carries a `code` beside its `detail`.")
add_error_handlers(app)


class RewardServiceArgs(StrictModel):
    model_uri: str = Field(..., min_length=1, description="folder or s3:// URI of a reward model (mode=reward_model)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    version: str | None = Field(None, min_length=1, description="the model's version; None: rm- + 8 hex digits of "
                                                                "a hash of its files")
    max_batch_size: int = Field(64, ge=1, description="requests merged into one batch (@serve.batch)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits for more requests")
    score_batch_size: int = Field(32, ge=1, description="pairs per forward pass of the reward model")
    max_items: int = Field(4096, ge=1, description="pairs per request (more: 413)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica sees a GPU")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    auth_token: SecretStr | None = Field(None, description=f"bearer token; falls back to ${REWARD_TOKEN_ENV}, then "
                                                            f"${INDEX_TOKEN_ENV}")
    protect: bool | None = Field(
        None, description="None: POST /score needs the bearer token whenever one is configured (open when none "
                          "is); true: always (with none configured every request gets 403); false: open. "
                          "POST /reload always needs it")


async def require_score_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    service = servable()
    if service.protected:
        check_token(credentials, service.token, "scoring", TOKEN_SOURCES)


async def require_reload_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    check_token(credentials, servable().token, "reload", TOKEN_SOURCES)


SCORE = access("score", require_score_token)
RELOAD = access("reload", require_reload_token)
_OPENAPI: dict[bool, dict] = {}  # per token_required
_NOTES = {("score", True): f"Needs the bearer token: {TOKEN_SOURCES} on the service.",
          ("score", False): "Open: this deployment asks for no token.",
          ("reload", True): f"Always needs the bearer token ({TOKEN_SOURCES}); refused with 403 when the "
                            "service has none configured."}


def _openapi() -> dict:
    """The OpenAPI document as this deployment answers: the bearer scheme only where it is asked for."""
    protected = bool(servable().protected)
    if protected not in _OPENAPI:
        _OPENAPI[protected] = openapi_document(app, {"score": protected, "reload": True}, _NOTES)
    return _OPENAPI[protected]


app.openapi = _openapi


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class Served:
    """One loaded reward model and what answers name it by; swapped whole on reload."""

    model: Any  # whetstone.models.reward.RewardModel, in eval mode on the replica's device
    version: str
    model_uri: str


def content_version(folder: str | Path) -> str:
    """``rm-`` + 8 hex digits of the SHA-256 over the folder's files (relative path, size, bytes;
    in path order): the same files give the same version wherever they were copied."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return "rm-" + digest.hexdigest()[:8]


def load_served(model_uri: str, storage: StorageConfig, version: str | None, device: str) -> Served:
    """Load the reward model at ``model_uri`` (a folder, an ``s3://`` URI, copied to a temporary
    folder that goes once the model is in memory, or a model alias) and name its version.

    Raises:
        FileNotFoundError: nothing is at ``model_uri``; others from ``RewardModel.load``.
    """
    from whetstone import storage as store
    from whetstone.models.assets import resolve_model_path
    from whetstone.models.reward import RewardModel

    path = resolve_model_path(model_uri)
    with tempfile.TemporaryDirectory(prefix="whetstone-reward-") as tmp:
        folder = store.download_dir(path, tmp, storage) if store.is_s3(path) else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model_uri: {model_uri} is not a folder")
        model = RewardModel.load(folder, device=device).eval()
        version = version or content_version(folder)
    return Served(model=model, version=version, model_uri=model_uri)


def _bad_input(err: ValidationError) -> IndexServiceError:
    """A handle call's invalid arguments, as FastAPI would name them over HTTP (no input echoed)."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in err.errors()]
    return IndexServiceError(ErrorCode.BAD_INPUT, detail)


# ---------------------------------------------------------------- the deployment
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class RewardService:
    def __init__(self, args: dict):
        self.args = RewardServiceArgs.model_validate(args)
        self.token, self.protected = guard_open_route("POST /score", self.args.auth_token, self.args.protect,
                                                      "protect", *TOKEN_ENVS)
        if self.token is None:
            logger.warning("POST /reload refuses every request: no token is configured (set %s)", TOKEN_SOURCES)
        self.device = str(pick_device(self.args.device))  # cuda only where Ray gave the replica a GPU
        self.served = load_served(self.args.model_uri, self.args.storage, self.args.version, self.device)
        self.batches: collections.deque[dict] = collections.deque(maxlen=BATCH_LOG_SIZE)
        self._reload_lock = asyncio.Lock()
        self._scored.set_max_batch_size(self.args.max_batch_size)
        self._scored.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        logger.info("serving reward model %s (version %s) on %s", self.served.model_uri, self.served.version,
                    self.device)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)  # both set from the args in __init__
    async def _scored(self, requests: list[tuple[list[str], list[str]]]) -> list[dict]:
        """Score every request of a batch in one pass: pairs concatenated, answers split back."""
        served = self.served  # the whole batch scores with one model, even across a reload
        prompts = [p for request_prompts, _ in requests for p in request_prompts]
        responses = [r for _, request_responses in requests for r in request_responses]
        scores = await asyncio.to_thread(served.model.score, prompts, responses, self.args.score_batch_size)
        self.batches.append({"requests": len(requests), "items": len(prompts)})
        answers, begin = [], 0
        for request_prompts, _ in requests:
            end = begin + len(request_prompts)
            answers.append({"scores": scores[begin:end].tolist(), "version": served.version,
                            "model_uri": served.model_uri})
            begin = end
        return answers

    def _check_size(self, request: ScoreRequest) -> None:
        if len(request.prompts) > self.args.max_items:
            raise IndexServiceError(ErrorCode.TOO_MANY_QUERIES, f"prompts: {len(request.prompts)} pairs exceed "
                                                                f"max_items={self.args.max_items}")

    @app.post("/score", response_model=ScoreResponse, **SCORE)
    async def score(self, request: ScoreRequest) -> dict:
        """The reward of each (prompt, response) pair, and the model version that scored them."""
        self._check_size(request)
        return await self._scored((request.prompts, request.responses))

    async def score_batch(self, prompts: list[str], responses: list[str]) -> dict:
        """Handle method for trainers: ``POST /score``'s answer, through the same batch queue."""
        try:
            request = ScoreRequest.model_validate({"prompts": list(prompts), "responses": list(responses)})
        except ValidationError as err:
            raise _bad_input(err) from None
        self._check_size(request)
        return await self._scored((request.prompts, request.responses))

    @app.post("/reload", response_model=ReloadResponse, **RELOAD)
    async def reload(self, request: ReloadRequest) -> dict:
        """Load another reward model, then swap it in; answers carry its version from then on."""
        if self.args.num_replicas > 1:  # the request reaches one replica: the others would keep the old model
            raise IndexServiceError(ErrorCode.HTTP_ERROR, f"reload swaps the model of the one replica it reaches; "
                                                          f"with num_replicas={self.args.num_replicas} redeploy "
                                                          f"with the new model_uri instead", status=409)
        async with self._reload_lock:  # one load at a time; scoring goes on with the served model
            previous, start = self.served, time.monotonic()
            try:
                served = await asyncio.to_thread(load_served, request.model_uri, self.args.storage,
                                                 request.version, self.device)
            except Exception as err:  # noqa: BLE001 - any failure to load leaves the served model in place
                logger.warning("reload of %s failed: %s: %s", request.model_uri, type(err).__name__, err)
                raise IndexServiceError(ErrorCode.BAD_INPUT, f"model_uri: could not load a reward model from "
                                                             f"{request.model_uri} ({type(err).__name__}: {err}); "
                                                             f"still serving {previous.version}") from None
            self.served = served
        logger.info("reward model %s -> %s (%s)", previous.version, served.version, served.model_uri)
        return {"version": served.version, "model_uri": served.model_uri, "previous_version": previous.version,
                "load_s": round(time.monotonic() - start, 3)}

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> dict:
        return self.info()

    def info(self) -> dict:
        """Handle method: ``GET /healthz``'s answer."""
        return {"status": "ok", "version": self.served.version, "model_uri": self.served.model_uri}

    def batch_log(self) -> list[dict]:
        """Handle method: ``{"requests", "items"}`` per recent batch, oldest first (how well batching merges)."""
        return list(self.batches)


# ---------------------------------------------------------------- building
def build_app(args: RewardServiceArgs | dict) -> Application:
    """Typed app builder: ``serve run services.reward.app:build_app model_uri=<folder>``; a driver
    deploys it with :func:`deploy_reward_service`."""
    args = RewardServiceArgs.model_validate(args) if isinstance(args, dict) else args
    # Serve lets a replica hold 5 requests by default: a batch could never merge more than that.
    return RewardService.options(num_replicas=args.num_replicas, max_ongoing_requests=2 * args.max_batch_size,
                                 ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                                 ).bind(wire_args(args))


def wire_args(args: RewardServiceArgs) -> dict:
    """The replica's init argument: plain JSON, S3 settings filled from this (the deploying)
    process's environment, the token's value kept (a JSON dump masks it). Secrets travel in the
    init args, never in logs."""
    wire = args.model_dump(mode="json")
    wire["storage"] = args.storage.resolved().to_wire()
    wire["auth_token"] = args.auth_token.get_secret_value() if args.auth_token is not None else None
    return wire


# ---------------------------------------------------------------- deploying from a driver
def deploy_reward_service(model_uri: str, storage: StorageConfig | dict | None = None, app_name: str = APP_NAME,
                          route_prefix: str = ROUTE_PREFIX, version: str | None = None, num_cpus: float = 0.5,
                          num_gpus: float = 0.0, max_batch_size: int = 64, http_host: str | None = None,
                          http_port: int | None = None, **args) -> RewardClient:
    """Deploy the reward model service as ``app_name`` (``serve.run``, which returns once the
    replicas have loaded the model) and return a handle client, checked to answer.

    Serve's HTTP proxy starts on ``http_host``/``http_port`` when either is given, else with
    Serve's defaults (127.0.0.1:8000) if Serve is not running yet; a running Serve keeps its
    proxy. ``args``: any other field of :class:`RewardServiceArgs` (``auth_token``, ``protect``,
    ``batch_wait_timeout_s``, ``score_batch_size``, ``max_items``, ``device``, ...).
    """
    if http_host is not None or http_port is not None:
        serve.start(http_options={k: v for k, v in (("host", http_host), ("port", http_port)) if v is not None})
    fields = {"model_uri": model_uri, "version": version, "num_cpus": num_cpus, "num_gpus": num_gpus,
              "max_batch_size": max_batch_size, **args}
    if storage is not None:
        fields["storage"] = storage
    serve.run(build_app(fields), name=app_name, route_prefix=route_prefix)
    client = RewardClient.from_handle(app_name)
    logger.info("reward service %s at %s: %s", app_name, route_prefix, client.info())
    return client


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the application (its replicas and their models go with it)."""
    serve.delete(app_name)
