"""The index service: a live, versioned FAISS index on Ray Serve for training workers and HTTP users.

Routes (under the route prefix, ``/index`` by default, so an ``/embed`` app can sit beside it):
``POST /search``, ``POST /upsert``, ``POST /delete``, ``POST /swap``, ``GET /stats``,
``GET /healthz``, ``GET /metrics`` (Prometheus text) and the usual ``/docs`` + ``/openapi.json``.
Training workers call the same methods through a Serve handle (see ``whetstone.index.client``);
``search`` requests from all callers share one ``@serve.batch`` queue, so many workers share one
FAISS call.

Versions and swaps. A replica holds one immutable :class:`Snapshot` (index + its encoder) and
replaces it by assigning one attribute, after the new one is fully loaded (double buffering).
Each request pins the snapshot it was validated against, and the batch handler groups requests
by snapshot, so a response is always computed on exactly one version, the one it reports.
``/swap`` loads the version, swaps, and writes ``LATEST``; every replica polls ``LATEST`` every
``poll_interval_s`` and follows it, and a restarted replica loads it on start. Upsert and delete
copy the current index, apply the change, publish it as version ``max + 1`` and swap it in.

Per-replica versions for ``/stats``: each replica reports (version, size, pid) to a small
registry actor every poll tick (``services.index.registry``).

Auth. Mutations (``/upsert``, ``/delete``, ``/swap``) need ``Authorization: Bearer <token>``
(``auth_token`` or env ``WHETSTONE_INDEX_TOKEN``; with neither set, HTTP mutations are refused);
reads need it too when ``protect_reads``. Missing token: 401; wrong token: 403. Handle callers
are inside the Ray cluster, the trust boundary, and are not asked for a token.

Errors. The wire format, error codes included, lives in ``whetstone.index.wire``. Every error
answer carries a ``code`` beside its ``detail`` (HTTP JSON), or is an ``IndexServiceError``
carrying it (handle callers). The HTTP layer (auth, error answers, the error counter, the
``/search`` fast path) is ``services.index.http``; the replica's state apart from Serve
(snapshots, batched search, counters) is ``services.index.replica``.

Run::

    serve run services.index.app:build_app index_uri=.whetstone/store/index --route-prefix /index
    serve deploy services/index/serve_config.yaml
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation as a class to
# validate the `key=value` args into IndexServiceArgs.
import asyncio
import logging
import os
import time

import numpy as np
import pydantic_core
from fastapi import Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import Field, SecretStr, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import DeploymentActorConfig
from ray.serve.schema import LoggingConfig
from whetstone.config.base import StorageConfig, StrictModel
from whetstone.index.ann import AnnInputError, SnapshotConflict, SnapshotError, SnapshotNotFound
from whetstone.index.wire import (
    APP_NAME,
    DEPLOYMENT_NAME,
    ROUTE_PREFIX,
    DeleteRequest,
    ErrorCode,
    IndexServiceError,
    MutationResponse,
    SearchArrays,
    SearchRequest,
    SearchResponse,
    StatsResponse,
    StoredVectors,
    SwapRequest,
    SwapResponse,
    UpsertRequest,
)

from services.index.http import (
    TOKEN_ENV,
    bearer_matches,
    build_fastapi,
    is_json,
    require_read_token,
    require_write_token,
)
from services.index.registry import REGISTRY_ACTOR, ReplicaRegistry
from services.index.replica import SearchCoalescer, Snapshot, SnapshotHolder, StatsRecorder, search_grouped

logger = logging.getLogger(__name__)

# Settings `reconfigure` may change on a live deployment (user_config); the rest need a redeploy.
LIVE_FIELDS = ("protect_reads", "max_k", "max_queries_per_request", "max_exclude_per_query",
               "batch_max_size", "batch_wait_timeout_s", "poll_interval_s")


class IndexServiceArgs(StrictModel):
    """Arguments of :func:`build_app` (``serve run ... key=value`` or the Serve config ``args``)."""

    index_uri: str = Field(description="index root holding v{n}/ and LATEST (local dir or s3://)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    auth_token: SecretStr | None = Field(None, description=f"bearer token; falls back to ${TOKEN_ENV}")
    protect_reads: bool = False
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    max_ongoing_requests: int = Field(128, ge=1, description="per replica; must exceed batch_max_size")
    max_k: int = Field(1000, ge=1)
    max_queries_per_request: int = Field(1024, ge=1)
    max_exclude_per_query: int = Field(1000, ge=0)
    batch_max_size: int = Field(32, ge=1, description="requests merged into one FAISS call")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long a search waits for others to arrive before it starts (Serve's batch "
                               "window); 0: it starts at once, and what queues behind running calls is merged anyway")
    poll_interval_s: float = Field(2.0, gt=0, description="how often replicas follow LATEST")
    encoder_device: str | None = Field(None, description="device for text queries; None = auto")
    health_check_period_s: float = Field(5.0, gt=0)
    search_threads: int | None = Field(
        None, ge=1, description="FAISS (OpenMP) threads per replica; None keeps Ray's setting, one thread "
                                "per whole CPU the replica asked for (at least one)")
    search_workers: int = Field(
        1, ge=1, description="FAISS calls a replica runs at once, each on its own thread with `search_threads` "
                             "OpenMP threads; on a shared, busy machine several 1-thread calls beat one "
                             "multi-threaded call, whose threads wait for each other")
    access_log: bool = Field(False, description="Serve's per-request log lines (CPU at high QPS)")


def resolve_token(args: IndexServiceArgs) -> str | None:
    """The configured bearer token, else ``$WHETSTONE_INDEX_TOKEN``, else None."""
    if args.auth_token is not None and args.auth_token.get_secret_value():
        return args.auth_token.get_secret_value()
    return os.environ.get(TOKEN_ENV) or None


fastapi_app = build_fastapi()


def _bad_input(err: Exception) -> IndexServiceError:
    return IndexServiceError(ErrorCode.BAD_INPUT, str(err))


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128, health_check_period_s=5.0)
@serve.ingress(fastapi_app)
class IndexService:
    """One replica: a snapshot holder, a batched search queue, a LATEST follower."""

    async def __init__(self, args: IndexServiceArgs | dict) -> None:
        self.args = IndexServiceArgs.model_validate(args if isinstance(args, dict) else args.model_dump())
        self.token = resolve_token(self.args)
        logger.info("index service args (secrets masked): %s", self.args.model_dump_json())
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.recorder = StatsRecorder(self.replica_id)
        # FAISS runs on `search_workers` search threads, each with `search_threads` OpenMP threads
        # set *in* it (set in this thread, it never reached the searches: a batch-64 flat search
        # took 12 ms in the replica against 3.4 ms in-process). Requests queued behind running
        # calls are merged into the next one.
        self._coalescer = SearchCoalescer(self._search_timed, self.args.batch_max_size, self.args.search_threads,
                                          self.args.search_workers)
        self.holder = SnapshotHolder(self.args.index_uri, self.args.storage, self.args.encoder_device)
        self._apply_batch_settings()
        # Load LATEST before serving (a restarted replica comes back with it); an empty root
        # is fine: the service answers 503 to searches until a version is published or swapped in.
        await asyncio.to_thread(self.holder.load_latest_if_newer)
        self._registry = self._registry_handle()
        self._stopping = False
        self._follower = asyncio.get_running_loop().create_task(self._follow_latest())
        logger.info("index replica %s up at version %s", self.replica_id, self.holder.version)

    def _apply_batch_settings(self) -> None:
        self._coalescer.max_requests = self.args.batch_max_size
        self._search_batch.set_max_batch_size(self.args.batch_max_size)
        self._search_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @staticmethod
    def _registry_handle():
        try:
            return serve.get_deployment_actor(REGISTRY_ACTOR)
        except Exception as err:  # noqa: BLE001 - /stats then lists this replica only
            logger.warning("no replica registry (%s); /stats will show this replica only", err)
            return None

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (``LIVE_FIELDS``) from the deployment's ``user_config``."""
        unknown = set(user_config) - set(LIVE_FIELDS)
        if unknown:
            raise ValueError(f"user_config: {sorted(unknown)} cannot change live (allowed: {LIVE_FIELDS})")
        self.args = IndexServiceArgs.model_validate({**self.args.model_dump(), **user_config})
        self._apply_batch_settings()

    # ---------------------------------------------------------------- background
    async def _follow_latest(self) -> None:
        """Follow LATEST and report to the registry until the replica stops (its heartbeat)."""
        while not self._stopping:
            try:
                await asyncio.to_thread(self.holder.load_latest_if_newer)
            except Exception as err:  # noqa: BLE001 - keep serving the current version
                if self._stopping:  # e.g. Serve shut the thread pool down behind __del__
                    return
                logger.warning("replica %s could not follow LATEST: %s", self.replica_id, err)
            self._report()
            await asyncio.sleep(self.args.poll_interval_s)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (after its requests finished), before it
        shuts the replica's thread pool down: stop following LATEST and free the search threads."""
        if getattr(self, "_stopping", True):  # already stopped, or __init__ never got this far
            return
        self._stopping = True
        self._follower.cancel()
        self._coalescer.shutdown()

    def _report(self) -> None:
        if self._registry is None:
            return
        try:
            self._registry.report.remote(self.replica_id, self._replica_info())
        except Exception:  # noqa: BLE001 - a recreated registry: fetch the new handle next tick
            self._registry = self._registry_handle()

    def _replica_info(self) -> dict:
        return {"version": self.holder.version, "size": self.holder.size, "pid": os.getpid()}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the LATEST follower must be alive."""
        if self._follower.done() and not self._stopping:  # __del__ cancels it on purpose
            raise RuntimeError(f"LATEST follower stopped: {self._follower.exception()!r}")

    # ---------------------------------------------------------------- search
    def _current(self) -> Snapshot:
        snapshot = self.holder.current
        if snapshot is None:
            raise IndexServiceError(ErrorCode.NO_VERSION, f"no index version is loaded yet (nothing published "
                                                          f"under {self.args.index_uri}); publish one or POST /swap")
        return snapshot

    def _check_query_shape(self, snapshot: Snapshot, count: int, k: int, exclude_ids) -> None:
        args = self.args
        if count > args.max_queries_per_request:
            raise IndexServiceError(ErrorCode.TOO_MANY_QUERIES, f"vectors/texts: {count} queries exceed "
                                                                f"max_queries_per_request={args.max_queries_per_request}")
        if not 1 <= k <= args.max_k:
            raise IndexServiceError(ErrorCode.BAD_INPUT, f"k: {k} is out of range [1, {args.max_k}]")
        if exclude_ids is not None:
            if len(exclude_ids) != count:
                raise IndexServiceError(ErrorCode.BAD_INPUT, f"exclude_ids: {len(exclude_ids)} lists for {count} queries")
            longest = max((len(e) for e in exclude_ids), default=0)
            if longest > args.max_exclude_per_query:
                raise IndexServiceError(ErrorCode.BAD_INPUT, f"exclude_ids: a query excludes {longest} ids, more "
                                                             f"than max_exclude_per_query={args.max_exclude_per_query}")

    async def _search(self, snapshot: Snapshot, vectors: np.ndarray, k: int, exclude_ids,
                      score_excluded: bool = False) -> tuple:
        started = time.perf_counter()
        pending = await self._search_batch((snapshot, vectors, k, exclude_ids, score_excluded))
        version, ids, scores, extra = await pending
        latency_ms = (time.perf_counter() - started) * 1000
        self.recorder.searched(len(vectors), latency_ms)
        return version, ids, scores, latency_ms, extra

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _search_batch(self, items: list[tuple]) -> list:
        """Hands the requests that arrived together to the coalescer and returns at once, one
        future per request, so Serve's next batch can join them while FAISS runs."""
        return self._coalescer.submit(items)

    def _search_timed(self, items: list[tuple]) -> list[tuple]:
        """One FAISS call per snapshot among the merged requests (usually exactly one)."""
        started = time.perf_counter()
        results = search_grouped(items)
        self.recorder.batched(len(items), time.perf_counter() - started)
        return results

    @fastapi_app.post("/search", dependencies=[Depends(require_read_token)])
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Top-k ids and scores for each query vector (or text), with the version used."""
        snapshot = self._current()
        count = len(request.vectors if request.vectors is not None else request.texts)
        self._check_query_shape(snapshot, count, request.k, request.exclude_ids)
        if request.texts is not None:
            vectors = await self._encode(snapshot, request.texts)
        else:
            vectors = self._as_matrix(snapshot, request.vectors)
        version, ids, scores, latency_ms, extra = await self._search(
            snapshot, vectors, request.k, request.exclude_ids, request.score_excluded)
        wire_scores = [[None if not np.isfinite(s) else float(s) for s in row] for row in scores.tolist()]
        return SearchResponse(version=version, ids=ids, scores=wire_scores, latency_ms=latency_ms,
                              excluded_scores=extra)

    async def fast_search(self, headers, body: bytes) -> bytes | None:
        """The JSON answer to a ``/search`` body, or None to let the FastAPI route answer it
        (texts, auth failures, invalid input: see :class:`_SearchFastPath`)."""
        if not is_json(headers) or self.args.protect_reads and not bearer_matches(headers, self.token):
            return None
        try:
            request = SearchRequest.model_validate_json(body)
        except ValidationError:
            return None
        if request.vectors is None:
            return None
        try:
            snapshot = self._current()
            self._check_query_shape(snapshot, len(request.vectors), request.k, request.exclude_ids)
            vectors = self._as_matrix(snapshot, request.vectors)
        except IndexServiceError:
            return None
        version, ids, scores, latency_ms, extra = await self._search(
            snapshot, vectors, request.k, request.exclude_ids, request.score_excluded)
        # The route's SearchResponse, field for field; padded (-inf) scores become null.
        return pydantic_core.to_json({"version": version, "ids": ids, "scores": scores.tolist(),
                                      "latency_ms": latency_ms, "excluded_scores": extra}, inf_nan_mode="null")

    async def search_arrays(self, vectors: np.ndarray, k: int, exclude_ids=None,
                            score_excluded: bool = False) -> SearchArrays:
        """Handle-only fast path for training workers: numpy in, numpy out, no JSON-shaped lists
        (:class:`whetstone.index.wire.SearchArrays`)."""
        snapshot = self._current()
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise IndexServiceError(ErrorCode.BAD_INPUT,
                                    f"vectors: expected a non-empty (Q, D) array, got shape {vectors.shape}")
        self._check_query_shape(snapshot, len(vectors), int(k), exclude_ids)
        vectors = self._as_matrix(snapshot, vectors)
        version, ids, scores, latency_ms, extra = await self._search(snapshot, vectors, int(k), exclude_ids,
                                                                     bool(score_excluded))
        return SearchArrays(version=version, ids=ids, scores=scores, latency_ms=latency_ms, excluded_scores=extra)

    async def vectors_arrays(self, ids: list[str]) -> StoredVectors:
        """Handle-only: the stored vectors of ``ids`` (flat and HNSW indexes), for training with
        cached negative embeddings (:class:`whetstone.index.wire.StoredVectors`)."""
        snapshot = self._current()
        if len(ids) > self.args.max_queries_per_request * self.args.max_k:
            raise IndexServiceError(ErrorCode.BAD_INPUT, f"ids: {len(ids)} ids in one request, more than "
                                                         f"{self.args.max_queries_per_request * self.args.max_k}")
        try:
            vectors = snapshot.index.vectors_for(list(ids))
        except AnnInputError as err:
            raise _bad_input(err) from None
        return StoredVectors(version=snapshot.version, vectors=np.ascontiguousarray(vectors, dtype=np.float32))

    @staticmethod
    def _as_matrix(snapshot: Snapshot, rows) -> np.ndarray:
        try:
            return snapshot.check_vectors(rows, "vectors")
        except AnnInputError as err:
            raise _bad_input(err) from None

    async def _encode(self, snapshot: Snapshot, texts: list[str]) -> np.ndarray:
        try:
            return await asyncio.to_thread(snapshot.encode, texts)
        except AnnInputError as err:
            raise IndexServiceError(ErrorCode.TEXTS_UNSUPPORTED, str(err)) from None

    # ---------------------------------------------------------------- mutation
    @fastapi_app.post("/swap", dependencies=[Depends(require_write_token)])
    async def swap(self, request: SwapRequest) -> SwapResponse:
        """Load ``version`` from storage, swap it in here and publish it as LATEST."""
        started = time.perf_counter()
        previous = self.holder.version
        await self._run_storage_op(self.holder.swap_to, request.version)
        self._report()
        return SwapResponse(version=request.version, previous_version=previous,
                            replica_id=self.replica_id, load_ms=(time.perf_counter() - started) * 1000)

    @fastapi_app.post("/upsert", dependencies=[Depends(require_write_token)])
    async def upsert(self, request: UpsertRequest) -> MutationResponse:
        """Add or replace documents; publishes a new version."""
        snapshot = self._current()
        if request.texts is not None:
            vectors = await self._encode(snapshot, request.texts)
        else:
            vectors = self._as_matrix(snapshot, request.vectors)
        result = await self._run_storage_op(self.holder.mutate, "upsert", request.ids, vectors)
        self._report()
        return MutationResponse(**result)

    @fastapi_app.post("/delete", dependencies=[Depends(require_write_token)])
    async def delete(self, request: DeleteRequest) -> MutationResponse:
        """Remove documents by id (unknown ids are ignored); publishes a new version."""
        self._current()
        result = await self._run_storage_op(self.holder.mutate, "delete", request.ids, None)
        self._report()
        return MutationResponse(**result)

    async def _run_storage_op(self, op, *op_args):
        try:
            return await asyncio.to_thread(op, *op_args)
        except AnnInputError as err:
            raise _bad_input(err) from None
        except SnapshotNotFound as err:
            raise IndexServiceError(ErrorCode.SNAPSHOT_NOT_FOUND, str(err)) from None
        except SnapshotConflict as err:
            raise IndexServiceError(ErrorCode.SNAPSHOT_CONFLICT, str(err)) from None
        except SnapshotError as err:
            raise IndexServiceError(ErrorCode.SNAPSHOT_INVALID, str(err)) from None

    # ---------------------------------------------------------------- reads
    @fastapi_app.get("/stats", dependencies=[Depends(require_read_token)])
    async def stats_route(self) -> StatsResponse:
        return await self.stats_model()

    async def stats(self) -> dict:
        """Handle method: the same as ``GET /stats``, as a dict."""
        return (await self.stats_model()).model_dump()

    async def stats_model(self) -> StatsResponse:
        replicas = [{"replica_id": self.replica_id, **self._replica_info(), "updated_at": time.time()}]
        if self._registry is not None:
            try:
                max_age = max(3 * self.args.poll_interval_s, 10.0)
                reported = await asyncio.wait_for(self._registry.list.remote(max_age), timeout=2.0)
                replicas += [r for r in reported if r["replica_id"] != self.replica_id]
            except Exception as err:  # noqa: BLE001 - report what we know
                logger.warning("replica registry unavailable: %s", err)
                self._registry = self._registry_handle()  # Serve may have recreated it
        return StatsResponse(**self.holder.describe(), **self.recorder.summary(), replica_id=self.replica_id,
                             pid=os.getpid(), replicas=sorted(replicas, key=lambda r: r["replica_id"]))

    @fastapi_app.get("/healthz")
    async def healthz(self):
        if self.holder.version is None:
            return JSONResponse({"status": "empty", "replica_id": self.replica_id}, status_code=503)
        return {"status": "ok", "version": self.holder.version, "replica_id": self.replica_id}

    @fastapi_app.get("/metrics", dependencies=[Depends(require_read_token)])
    async def metrics(self):
        body, content_type = self.recorder.prometheus(self.holder.version, self.holder.size)
        return PlainTextResponse(body, media_type=content_type)


def build_app(args: IndexServiceArgs) -> Application:
    """The Serve application (``serve run services.index.app:build_app index_uri=...``)."""
    if isinstance(args, dict):
        args = IndexServiceArgs.model_validate(args)
    # Fill S3 settings from this (the deploying) process's environment: replicas started
    # elsewhere may not share it. Secrets travel in the deployment's init args, never in logs.
    args = args.model_copy(update={"storage": args.storage.resolved()})
    deployment = IndexService.options(
        num_replicas=args.num_replicas,
        ray_actor_options={"num_cpus": args.num_cpus},
        max_ongoing_requests=max(args.max_ongoing_requests, args.batch_max_size),
        health_check_period_s=args.health_check_period_s,
        logging_config=LoggingConfig(enable_access_log=args.access_log),
        deployment_actors=[DeploymentActorConfig(name=REGISTRY_ACTOR, actor_class=ReplicaRegistry,
                                                 actor_options={"num_cpus": 0})],
    )
    return deployment.bind(args)


def start_serve(http_host: str, http_port: int) -> None:
    """Start Serve with its HTTP proxy on ``http_host:http_port``.

    A no-op (with a warning) when Serve already runs in this cluster, e.g. under a RayService.
    A Serve instance still shutting down (its proxy being force-killed) fails the start with
    ActorDiedError: wait for it to go and start again, a few times.
    """
    from ray.exceptions import ActorDiedError

    for attempt in range(4):
        try:
            serve.start(http_options={"host": http_host, "port": http_port})
            break
        except ActorDiedError as err:
            if attempt == 3:
                raise
            logger.warning("Serve start raced a shutting-down Serve instance (%s); retrying", err)
            time.sleep(2.0 * (attempt + 1))


def deploy(args: IndexServiceArgs, name: str = APP_NAME, route_prefix: str = ROUTE_PREFIX):
    """``serve.run`` the app (Serve must be started, or it starts with defaults); returns the handle."""
    return serve.run(build_app(args), name=name, route_prefix=route_prefix)


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the application (its registry actor goes with it)."""
    serve.delete(app_name)
