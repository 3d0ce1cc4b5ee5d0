"""Embedding endpoint: ``POST /embed`` served from the newest promoted checkpoint.

"Promoted" means the checkpoint that the newest index version was built from: the contrastive
job promotes its final model by publishing an index version built with it. Given ``index_uri``
the service follows the index's ``LATEST`` pointer (polling every ``poll_interval_s``) and
reloads the encoder when it changes, so queries embedded here match the served index. Given
``model_uri`` instead it serves that fixed model.

  serve run services.embed.app:build_app index_uri=.whetstone/store/scifact-subset/runs/quickstart/index
  curl -X POST localhost:8000/embed/ -H 'content-type: application/json' -d '{"texts": ["a claim"]}'
"""

# No `from __future__ import annotations`: FastAPI must see the request model as a class.
import asyncio
import logging
import threading

from fastapi import FastAPI, HTTPException
from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application
from whetstone.config.base import StorageConfig, StrictModel

from services.embed.schemas import DEPLOYMENT_NAME, EmbedRequest, EmbedResponse

logger = logging.getLogger(__name__)
app = FastAPI(title="Whetstone embedding service")


class EmbedServiceArgs(StrictModel):
    index_uri: str | None = Field(None, description="follow this index's promoted checkpoint")
    model_uri: str | None = Field(None, description="or serve this fixed model (path, URI or alias)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0)
    max_texts: int = Field(256, ge=1, description="texts per request")
    max_length: int = Field(256, ge=8, le=512)
    poll_interval_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.index_uri is None) == (self.model_uri is None):
            raise ValueError("set exactly one of index_uri (follow promotions) or model_uri")
        return self


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(app)
class EmbedService:
    def __init__(self, args: dict):
        self.args = EmbedServiceArgs.model_validate(args)
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

    @app.post("/", response_model=EmbedResponse)
    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        if len(request.texts) > self.args.max_texts:
            raise HTTPException(413, f"texts: {len(request.texts)} texts exceed max_texts={self.args.max_texts}")
        with self.lock:
            encoder = self.query_encoder if request.kind == "query" else self.encoder
            checkpoint, version = self.checkpoint, self.version
        if request.dim is not None and request.dim > encoder.dim:
            raise HTTPException(422, f"dim: {request.dim} exceeds the model's {encoder.dim}")
        vectors = await asyncio.to_thread(encoder.encode, request.texts, 64, self.args.max_length, request.dim)
        return EmbedResponse(checkpoint=checkpoint, index_version=version, dim=vectors.shape[1],
                             vectors=vectors.tolist())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "checkpoint": self.checkpoint, "index_version": self.version}


def build_app(args: EmbedServiceArgs | dict) -> Application:
    """Typed app builder: ``serve run services.embed.app:build_app model_uri=all-MiniLM-L6-v2``."""
    args = EmbedServiceArgs.model_validate(args) if isinstance(args, dict) else args
    wire = args.model_dump(mode="json")
    wire["storage"] = args.storage.resolved().to_wire()
    return EmbedService.options(num_replicas=args.num_replicas,
                                ray_actor_options={"num_cpus": args.num_cpus}).bind(wire)
