"""Embedding endpoint: ``POST /embed/`` served from the newest promoted checkpoint.

"Promoted" means the checkpoint that the newest index version was built from: the contrastive
job promotes its final model by publishing an index version built with it. Given ``index_uri``
the service follows the index's ``LATEST`` pointer (polling every ``poll_interval_s``) and
reloads the encoder when it changes, so queries embedded here match the served index. Given
``model_uri`` instead it serves that fixed model.

Auth. ``POST /embed/`` needs ``Authorization: Bearer <token>`` whenever a token is configured:
``auth_token``, else ``$WHETSTONE_EMBED_TOKEN``, else ``$WHETSTONE_INDEX_TOKEN`` (one Secret serves
both apps of the RayService; a separate embed token lets clients embed without being able to
mutate the index). Missing token: 401; wrong token: 403. With no token configured the route is
open (logged at start), as the index service's reads are, unless ``protect_embed=true``: then every
request is refused with 403 naming the variables, as the index refuses mutations without a token.
``protect_embed=false`` keeps it open even with a token. ``/healthz`` is always open. Error answers
carry a ``code`` (the index service's codes, ``whetstone.index.wire``).

  export WHETSTONE_EMBED_TOKEN=secret
  serve run services.embed.app:build_app index_uri=.whetstone/store/scifact-subset/runs/quickstart/index --route-prefix /embed
  curl -X POST localhost:8000/embed/ -H 'content-type: application/json' -H "Authorization: Bearer $WHETSTONE_EMBED_TOKEN" -d '{"texts": ["a claim"]}'
"""

# No `from __future__ import annotations`: FastAPI must see the request model as a class.
import asyncio
import logging
import threading

from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import Field, SecretStr, model_validator
from ray import serve
from ray.serve import Application
from whetstone.config.base import StorageConfig, StrictModel
from whetstone.index.wire import ErrorCode, IndexServiceError

from services.embed.schemas import DEPLOYMENT_NAME, EmbedRequest, EmbedResponse
from services.http_common import (
    EMBED_TOKEN_ENV,
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

logger = logging.getLogger(__name__)
TOKEN_ENVS = (EMBED_TOKEN_ENV, INDEX_TOKEN_ENV)  # read in this order, after the auth_token argument
TOKEN_SOURCES = token_sources(*TOKEN_ENVS)
app = FastAPI(title="Whetstone embedding service",
              description="Embeds texts with the model the served index was built from. Every error answer "
                          "carries a `code` beside its `detail`.")
add_error_handlers(app)


class EmbedServiceArgs(StrictModel):
    index_uri: str | None = Field(None, description="follow this index's promoted checkpoint")
    model_uri: str | None = Field(None, description="or serve this fixed model (path, URI or alias)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    max_texts: int = Field(256, ge=1, description="texts per request")
    max_length: int = Field(256, ge=8, le=512)
    poll_interval_s: float = Field(5.0, gt=0)
    auth_token: SecretStr | None = Field(None, description=f"bearer token; falls back to ${EMBED_TOKEN_ENV}, then "
                                                            f"${INDEX_TOKEN_ENV}")
    protect_embed: bool | None = Field(
        None, description="None: POST /embed/ needs the bearer token whenever one is configured (open when "
                          "none is); true: always (with none configured every request gets 403); false: open")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.index_uri is None) == (self.model_uri is None):
            raise ValueError("set exactly one of index_uri (follow promotions) or model_uri")
        return self


async def require_embed_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    service = servable()
    if service.protected:
        check_token(credentials, service.token, "embedding", TOKEN_SOURCES)


EMBED = access("embed", require_embed_token)
_OPENAPI: dict[bool, dict] = {}  # per token_required
_NOTES = {("embed", True): f"Needs the bearer token: {TOKEN_SOURCES} on the service.",
          ("embed", False): "Open: this deployment asks for no token."}


def _openapi() -> dict:
    """The OpenAPI document as this deployment answers: the bearer scheme only where it is asked for."""
    protected = bool(servable().protected)
    if protected not in _OPENAPI:
        _OPENAPI[protected] = openapi_document(app, {"embed": protected}, _NOTES)
    return _OPENAPI[protected]


app.openapi = _openapi


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class EmbedService:
    def __init__(self, args: dict):
        self.args = EmbedServiceArgs.model_validate(args)
        self.token, self.protected = guard_open_route("POST /embed/", self.args.auth_token, self.args.protect_embed,
                                                      "protect_embed", *TOKEN_ENVS)
        self.lock = threading.Lock()
        self.encoder = self.query_encoder = None
        self.checkpoint: str | None = None
        self.version: int | None = None
        self._load_newest()
        if self.args.index_uri:
            self._poller = asyncio.get_event_loop().create_task(self._follow())

    def _load_newest(self) -> None:
        from whetstone.index.snapshot import latest_version, read_manifest
        from whetstone.models.encoder import Encoder

        version, checkpoint = None, self.args.model_uri
        if self.args.index_uri:
            version = latest_version(self.args.index_uri, self.args.storage)
            if version is None:
                raise RuntimeError(f"no index version under {self.args.index_uri}")
            checkpoint = read_manifest(self.args.index_uri, version, self.args.storage)["checkpoint"]
        if checkpoint == self.checkpoint:
            self.version = version
            return
        encoder = Encoder.load(checkpoint, device=None, storage=self.args.storage)
        query_encoder = Encoder.load_query_tower(checkpoint, device=None, storage=self.args.storage)
        query_encoder = query_encoder if query_encoder is not None else encoder
        with self.lock:  # swap the whole model at once; in-flight requests keep the old object
            self.encoder, self.query_encoder = encoder, query_encoder
            self.checkpoint, self.version = checkpoint, version
        logger.info("serving embeddings from %s (index v%s)", checkpoint, version)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.args.poll_interval_s)
            try:
                await asyncio.to_thread(self._load_newest)
            except Exception:  # noqa: BLE001 - keep serving the model we have
                logger.exception("could not load the newest promoted checkpoint")

    @app.post("/", response_model=EmbedResponse, **EMBED)
    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """The texts' embeddings, from the model the newest index version was built from."""
        if len(request.texts) > self.args.max_texts:
            raise IndexServiceError(ErrorCode.TOO_MANY_QUERIES,
                                    f"texts: {len(request.texts)} texts exceed max_texts={self.args.max_texts}")
        with self.lock:
            encoder = self.query_encoder if request.kind == "query" else self.encoder
            checkpoint, version = self.checkpoint, self.version
        if request.dim is not None and request.dim > encoder.dim:
            raise IndexServiceError(ErrorCode.BAD_INPUT, f"dim: {request.dim} exceeds the model's {encoder.dim}")
        vectors = await asyncio.to_thread(encoder.encode, request.texts, 64, self.args.max_length, request.dim)
        return EmbedResponse(checkpoint=checkpoint, index_version=version, dim=vectors.shape[1],
                             vectors=vectors.tolist())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "checkpoint": self.checkpoint, "index_version": self.version}


def build_app(args: EmbedServiceArgs | dict) -> Application:
    """Typed app builder: ``serve run services.embed.app:build_app model_uri=all-MiniLM-L6-v2``."""
    args = EmbedServiceArgs.model_validate(args) if isinstance(args, dict) else args
    return EmbedService.options(num_replicas=args.num_replicas,
                                ray_actor_options={"num_cpus": args.num_cpus}).bind(wire_args(args))


def wire_args(args: EmbedServiceArgs) -> dict:
    """The replica's init argument: plain JSON, S3 settings filled from this (the deploying)
    process's environment, the token's value kept (a JSON dump masks it). Secrets travel in the
    init args, never in logs."""
    wire = args.model_dump(mode="json")
    wire["storage"] = args.storage.resolved().to_wire()
    wire["auth_token"] = args.auth_token.get_secret_value() if args.auth_token is not None else None
    return wire
