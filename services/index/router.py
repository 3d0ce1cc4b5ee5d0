"""The index service's ingress (deployment ``IndexService``): HTTP routes and handle methods over
``num_shards`` shard deployments (``services.index.shard``). It holds no vectors: only the served
version's manifest (and, for text queries, its encoder).

Search. A request is pinned to the version the ingress serves (``active``), fanned out to every
shard with that version named, and the shards' top-k lists are merged by score. Every shard's
answer must carry the pinned version, so a response never mixes two versions. A shard that does
not hold the version (a replica that just restarted, an ingress that missed a flip) answers
``version_unavailable``: the ingress re-reads LATEST and retries once.

Swap (two phases). ``/swap`` reads the version's manifest (its ``num_shards`` must match the
deployment's), writes STAGED, waits until every replica of every shard holds the version beside
the served one, then writes LATEST and flips, and clears STAGED. Other ingress replicas follow
LATEST every ``poll_interval_s``; shard replicas keep the previous version for two poll intervals
after the flip, so searches pinned to it finish on it. ``swap_mode=blue_green``: the idle replica
set loads it instead (``services.index.swap``), so no replica holds two versions.

Mutations. ``/upsert`` and ``/delete`` group the ids by shard (``shard_of``); only the touched
shards write new files under ``v{new}``; the new manifest reuses the untouched shards' entries
(their files stay where they are); then the two-phase swap.

Unavailable shards. A shard that does not answer gives ``shard_unavailable`` (503) naming it; the
training client falls back as for any outage. See ``services.index.fleet``.
"""

import asyncio
import logging
import math
import os
import time
from datetime import datetime, timezone

import numpy as np
import pydantic_core
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from whetstone.index.ann import AnnInputError
from whetstone.index.coarse import Assignment
from whetstone.index.retention import retain_versions
from whetstone.index.snapshot import (
    SnapshotError,
    latest_version,
    list_versions,
    publish_manifest,
    read_manifest,
    set_latest_version,
)
from whetstone.index.wire import (
    DEPLOYMENT_NAME,
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

from services.index.args import IndexServiceArgs, live_update, resolve_token
from services.index.fleet import ShardFleet
from services.index.http import READ, WRITE, bearer_matches, build_fastapi, is_json
from services.index.metrics import IndexMetrics, metrics_moved
from services.index.registry import registry_handle
from services.index.replica import StatsRecorder, run_storage_op
from services.index.routing import (
    EncoderCache,
    ServedVersion,
    gather_vectors,
    group_by_shard,
    slot_holding,
    split_excludes,
)
from services.index.swap import two_phase_swap

logger = logging.getLogger(__name__)

fastapi_app = build_fastapi()


def _bad_input(err: Exception) -> IndexServiceError:
    return IndexServiceError(ErrorCode.BAD_INPUT, str(err))


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128, health_check_period_s=5.0)
@serve.ingress(fastapi_app)
class IndexService:
    """One ingress replica: the served version, the shard fleet, a LATEST follower."""

    async def __init__(self, args: IndexServiceArgs | dict, shards: list, spare_shards: list | None = None) -> None:
        self.args = IndexServiceArgs.model_validate(args if isinstance(args, dict) else args.model_dump())
        if len(shards) != self.args.num_shards:
            raise ValueError(f"shards: {len(shards)} shard deployments for num_shards={self.args.num_shards}")
        self.token = resolve_token(self.args)
        logger.info("index service args (secrets masked): %s", self.args.model_dump_json())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.recorder = StatsRecorder(IndexMetrics())
        # one fleet per replica set: [shards] or, blue/green, [shards, their second set]
        self.fleets = [ShardFleet(handles, DEPLOYMENT_NAME, self.args.shard_timeout_s, slot)
                       for slot, handles in enumerate([shards] + ([spare_shards] if spare_shards else []))]
        self._encoders = EncoderCache(self.args.storage, self.args.encoder_device)
        self.served: ServedVersion | None = None
        self._swap_lock = asyncio.Lock()
        self._side_tasks: set[asyncio.Task] = set()
        await self._follow_latest_once()
        self._registry = self._registry_handle()
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow_latest()), loop.create_task(self._probe_shards())]
        logger.info("index ingress %s up at version %s over %d shards", self.replica_id, self.version,
                    self.args.num_shards)

    @property
    def fleet(self) -> ShardFleet:
        """The replica set serving the served version (blue/green: the one its slot names)."""
        served = self.served
        return self.fleets[served.slot if served is not None and served.slot is not None else 0]

    @property
    def version(self) -> int | None:
        served = self.served
        return None if served is None else served.version

    @staticmethod
    def _registry_handle():
        return registry_handle("/stats will show this replica only")

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (``LIVE_FIELDS``) from the deployment's ``user_config``."""
        self.args = live_update(self.args, user_config)
        for fleet in self.fleets:
            fleet.timeout_s = self.args.shard_timeout_s

    # ---------------------------------------------------------------- background
    def _read_served(self, version: int) -> ServedVersion:
        """The manifest of ``version``, checked against the deployment (worker thread)."""
        manifest = read_manifest(self.args.index_uri, version, self.args.storage)
        if manifest.num_shards != self.args.num_shards:
            raise SnapshotError(f"{self.args.index_uri}/v{version}: the snapshot has {manifest.num_shards} shards, "
                                f"the service was deployed with num_shards={self.args.num_shards}; redeploy with "
                                f"num_shards={manifest.num_shards} or swap to a snapshot of "
                                f"{self.args.num_shards} shards")
        return ServedVersion(manifest, self._encoders, slot=slot_holding(self.args, version, len(self.fleets)))

    async def _follow_latest_once(self, gated: bool = False) -> ServedVersion | None:
        """Serve the version LATEST names. ``gated``: only once every shard replica holds it (a
        LATEST another ingress replica flipped is held already; one a job wrote directly is not
        yet, and flipping early would fail searches until the shards load it)."""
        latest = await asyncio.to_thread(latest_version, self.args.index_uri, self.args.storage)
        if latest is not None and latest != self.version:
            served = await run_storage_op(self._read_served, latest)
            if served.slot is None:  # blue/green: LATEST written without a swap, no set holds it
                if gated:
                    async with self._swap_lock:
                        await self._swap_locked(latest, served)
                return self.served
            if gated and self.served is not None and not await self.fleets[served.slot].holds(latest):
                return self.served  # the shards are still loading it: flip on a later tick
            self.served = served
            logger.info("ingress %s serves v%d", self.replica_id, latest)
        return self.served

    async def _follow_latest(self) -> None:
        while not self._stopping:
            try:
                if not self._swap_lock.locked():  # a swap here flips by itself
                    await self._follow_latest_once(gated=True)
            except Exception as err:  # noqa: BLE001 - keep serving the current version
                if self._stopping:
                    return
                logger.warning("ingress %s could not follow LATEST: %s", self.replica_id, err)
            self._report()
            await asyncio.sleep(self.args.poll_interval_s)

    async def _probe_shards(self) -> None:
        while not self._stopping:
            for fleet in self.fleets:
                if fleet.down:
                    await fleet.probe_down()
            await asyncio.sleep(min(0.5, self.args.poll_interval_s))

    def __del__(self) -> None:
        if getattr(self, "_stopping", True):
            return
        self._stopping = True
        for task in self._tasks:
            task.cancel()

    def _report(self) -> None:
        self.recorder.served(self.version, self._replica_info()["size"])  # the Prometheus gauges
        if self._registry is None:
            return
        try:
            self._registry.report.remote(self.replica_id, self._replica_info())
        except Exception:  # noqa: BLE001 - a recreated registry: fetch the new handle next tick
            self._registry = self._registry_handle()

    def _replica_info(self) -> dict:
        served = self.served
        return {"version": self.version, "size": 0 if served is None else served.manifest.count,
                "pid": os.getpid(), "requests_total": self.recorder.requests_total}

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the LATEST follower must be alive."""
        for task in self._tasks:
            if task.done() and not self._stopping:
                raise RuntimeError(f"background task stopped: {task.exception()!r}")

    # ---------------------------------------------------------------- search
    def _current(self) -> ServedVersion:
        served = self.served
        if served is None:
            raise IndexServiceError(ErrorCode.NO_VERSION, f"no index version is loaded yet (nothing published "
                                                          f"under {self.args.index_uri}); publish one or POST /swap")
        return served

    def _check_query_shape(self, count: int, k: int, exclude_ids) -> None:
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

    @staticmethod
    def _check_kind(served: ServedVersion, score_excluded: bool) -> None:
        if score_excluded:
            try:
                served.require_full_vectors("score_excluded")
            except AnnInputError as err:
                raise _bad_input(err) from None

    async def _search(self, served: ServedVersion, vectors: np.ndarray, k: int, exclude_ids,
                      score_excluded: bool = False) -> tuple:
        """Fan out pinned to ``served``; on ``version_unavailable`` re-read LATEST and retry once."""
        started = time.perf_counter()
        split = split_excludes(exclude_ids, len(vectors), self.fleet.num_shards)
        for attempt in (0, 1):
            try:
                assigned = await self._assignment(served, vectors)
                ids, scores, extra = await self.fleets[served.slot].search(served.version, vectors, k, split,
                                                                           score_excluded, assigned)
                break
            except IndexServiceError as err:
                if err.code != ErrorCode.VERSION_UNAVAILABLE or attempt:
                    raise
                logger.info("retrying a search: %s", err.detail)
                await asyncio.sleep(0.05)  # the shard replica that said so is looking at storage now
                served = await self._follow_latest_once() or served
                if served.dim != vectors.shape[1]:
                    raise
                self._check_kind(served, score_excluded)
        latency_ms = (time.perf_counter() - started) * 1000
        self.recorder.searched(len(vectors), latency_ms)
        return served, ids, scores, latency_ms, extra

    async def _assignment(self, served: ServedVersion, vectors: np.ndarray) -> Assignment | None:
        """IVF over several shards: the queries' cells, found here once for every shard (the
        shards would each search all centroids otherwise); None until the quantizer is here."""
        if not served.shares_cells:
            return None
        if served.assigner is None:
            if time.monotonic() >= served.assigner_due:
                served.assigner_due = math.inf
                task = asyncio.get_running_loop().create_task(self.fleets[served.slot].fetch_assigner(served))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
            return None
        return await asyncio.to_thread(served.assigner.assign, vectors)

    @fastapi_app.post("/search", **READ)
    async def search(self, request: SearchRequest) -> SearchResponse:
        """Top-k ids and scores for each query vector (or text), with the version used."""
        served = self._current()
        count = len(request.vectors if request.vectors is not None else request.texts)
        self._check_query_shape(count, request.k, request.exclude_ids)
        self._check_kind(served, request.score_excluded)
        if request.texts is not None:
            vectors = await self._encode(served, request.texts)
        else:
            vectors = self._as_matrix(served, request.vectors)
        served, ids, scores, latency_ms, extra = await self._search(
            served, vectors, request.k, request.exclude_ids, request.score_excluded)
        wire_scores = [[None if not np.isfinite(s) else float(s) for s in row] for row in scores.tolist()]
        return SearchResponse(version=served.version, embedded_step=served.embedded_step, ids=ids,
                              scores=wire_scores, latency_ms=latency_ms, excluded_scores=extra)

    async def fast_search(self, headers, body: bytes) -> bytes | None:
        """The JSON answer to a ``/search`` body, or None to let the FastAPI route answer it
        (texts, auth failures, invalid input: see ``services.index.http._SearchFastPath``)."""
        if not is_json(headers) or self.args.protect_reads and not bearer_matches(headers, self.token):
            return None
        try:
            request = SearchRequest.model_validate_json(body)
        except ValidationError:
            return None
        if request.vectors is None:
            return None
        try:
            served = self._current()
            self._check_query_shape(len(request.vectors), request.k, request.exclude_ids)
            self._check_kind(served, request.score_excluded)
            vectors = self._as_matrix(served, request.vectors)
        except IndexServiceError:
            return None
        try:
            served, ids, scores, latency_ms, extra = await self._search(
                served, vectors, request.k, request.exclude_ids, request.score_excluded)
        except IndexServiceError as err:  # e.g. a shard down: answered as the route would, not searched twice
            return err
        return pydantic_core.to_json({"version": served.version, "embedded_step": served.embedded_step,
                                      "ids": ids, "scores": scores.tolist(),
                                      "latency_ms": latency_ms, "excluded_scores": extra}, inf_nan_mode="null")

    async def search_arrays(self, vectors: np.ndarray, k: int, exclude_ids=None,
                            score_excluded: bool = False) -> SearchArrays:
        """Handle-only fast path for training workers: numpy in, numpy out, no JSON-shaped lists
        (:class:`whetstone.index.wire.SearchArrays`)."""
        served = self._current()
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise IndexServiceError(ErrorCode.BAD_INPUT,
                                    f"vectors: expected a non-empty (Q, D) array, got shape {vectors.shape}")
        self._check_query_shape(len(vectors), int(k), exclude_ids)
        self._check_kind(served, bool(score_excluded))
        vectors = self._as_matrix(served, vectors)
        served, ids, scores, latency_ms, extra = await self._search(served, vectors, int(k), exclude_ids,
                                                                    bool(score_excluded))
        return SearchArrays(version=served.version, embedded_step=served.embedded_step, ids=ids, scores=scores,
                            latency_ms=latency_ms, excluded_scores=extra)

    async def vectors_arrays(self, ids: list[str]) -> StoredVectors:
        """Handle-only: the stored vectors of ``ids`` (flat and HNSW indexes), for training with
        cached negative embeddings (:class:`whetstone.index.wire.StoredVectors`)."""
        served = self._current()
        limit = self.args.max_queries_per_request * self.args.max_k
        if len(ids) > limit:
            raise IndexServiceError(ErrorCode.BAD_INPUT, f"ids: {len(ids)} ids in one request, more than {limit}")
        try:
            served.require_full_vectors("vectors")
        except AnnInputError as err:
            raise _bad_input(err) from None
        ids = list(ids)
        fleet = self.fleets[served.slot]
        groups = group_by_shard(ids, fleet.num_shards)
        answers = await fleet.gather({
            s: fleet.call(s, "vectors_arrays", served.version, [ids[i] for i in positions])
            for s, positions in groups.items()})
        vectors = gather_vectors(groups, {s: a["vectors"] for s, a in answers.items()}, len(ids), served.dim)
        return StoredVectors(version=served.version, vectors=vectors)

    @staticmethod
    def _as_matrix(served: ServedVersion, rows) -> np.ndarray:
        try:
            return served.check_vectors(rows, "vectors")
        except AnnInputError as err:
            raise _bad_input(err) from None

    async def _encode(self, served: ServedVersion, texts: list[str]) -> np.ndarray:
        try:
            return await asyncio.to_thread(served.encode, texts)
        except AnnInputError as err:
            raise IndexServiceError(ErrorCode.TEXTS_UNSUPPORTED, str(err)) from None

    # ---------------------------------------------------------------- swap and mutation
    async def _swap_locked(self, version: int, served: ServedVersion | None = None,
                           in_place: bool = False) -> int | None:
        """The two-phase swap to ``version`` (``_swap_lock`` held; ``services.index.swap``; a
        mutation is ``in_place``: it stays in the serving replica set). Returns the previous version."""
        served = served or await run_storage_op(self._read_served, version)
        previous, current = self.version, self.served.slot if self.served is not None else None
        if version == previous:
            await run_storage_op(set_latest_version, self.args.index_uri, version, self.args.storage)
            return previous

        def flip(target: int) -> None:
            served.slot = target
            self.served = served

        target = await two_phase_swap(self.args, self.fleets, version, previous, current, in_place, flip)
        self._report()
        logger.info("ingress %s swapped v%s -> v%d (replica set %d)", self.replica_id, previous, version, target)
        return previous

    @fastapi_app.post("/swap", **WRITE)
    async def swap(self, request: SwapRequest) -> SwapResponse:
        """Load ``version`` on every shard (beside the served one), then flip and publish it as LATEST."""
        started = time.perf_counter()
        async with self._swap_lock:
            previous = await self._swap_locked(request.version)
        return SwapResponse(version=request.version, previous_version=previous,
                            replica_id=self.replica_id, load_ms=(time.perf_counter() - started) * 1000)

    @fastapi_app.post("/upsert", **WRITE)
    async def upsert(self, request: UpsertRequest) -> MutationResponse:
        """Add or replace documents; publishes a new version."""
        served = self._current()
        if request.texts is not None:
            vectors = await self._encode(served, request.texts)
        else:
            vectors = self._as_matrix(served, request.vectors)
        return MutationResponse(**await self._mutate("upsert", request.ids, vectors))

    @fastapi_app.post("/delete", **WRITE)
    async def delete(self, request: DeleteRequest) -> MutationResponse:
        """Remove documents by id (unknown ids are ignored); publishes a new version."""
        self._current()
        return MutationResponse(**await self._mutate("delete", request.ids, None))

    async def _mutate(self, op: str, ids: list[str], vectors: np.ndarray | None) -> dict:
        """Touched shards write ``v{new}`` files; the manifest reuses the others'; then the swap."""
        async with self._swap_lock:
            served = await self._follow_latest_once()  # build on what is published (no lost updates)
            if served is None:
                self._current()
            base = served.manifest
            new_version = max(await run_storage_op(list_versions, self.args.index_uri, self.args.storage)
                              + [base.version]) + 1
            groups = group_by_shard(ids, self.fleet.num_shards)
            timeout_s = self.args.swap_timeout_s
            results = await self.fleet.gather({
                s: self.fleet.call(s, "apply_mutation", base.version, new_version, op, [ids[i] for i in positions],
                                   None if vectors is None else vectors[positions], timeout_s=timeout_s,
                                   mark_down=False)
                for s, positions in groups.items()})
            changed = sum(r["changed"] for r in results.values())
            if changed == 0:
                return {"version": base.version, "previous_version": base.version, "changed": 0, "size": base.count}
            entries = [results[s]["entry"] if s in results and results[s]["changed"] else entry
                       for s, entry in enumerate(base.shards)]
            manifest = await run_storage_op(
                lambda: publish_manifest(
                    self.args.index_uri, new_version, entries, checkpoint=base.checkpoint or "", dim=base.dim,
                    kind=base.kind, config=base.config, storage=self.args.storage, set_latest=False,
                    built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    extra={**base.extra, "parent_version": base.version, "mutation": op}))
            await self._swap_locked(new_version, ServedVersion(manifest, self._encoders), in_place=True)
            if self.args.keep_versions:  # every version a mutation publishes is a full manifest: keep N
                await run_storage_op(retain_versions, self.args.index_uri, self.args.keep_versions, self.args.storage)
        return {"version": new_version, "previous_version": base.version, "changed": changed, "size": manifest.count}

    # ---------------------------------------------------------------- reads
    @fastapi_app.get("/stats", **READ)
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
        served = self.served
        counts = [e.count for e in served.manifest.shards] if served else [None] * self.fleet.num_shards
        shards, faiss = await self.fleet.summary(counts)
        idle = [await fleet.summary([None] * fleet.num_shards) for fleet in self.fleets if fleet is not self.fleet]
        described = served.describe() if served else {"version": None, "checkpoint": None, "size": 0, "dim": None,
                                                      "kind": None, "built_at": None}
        return StatsResponse(**described, **{**self.recorder.summary(), **faiss}, replica_id=self.replica_id,
                             pid=os.getpid(), replicas=sorted(replicas, key=lambda r: r["replica_id"]),
                             num_shards=self.fleet.num_shards, shards=shards, swap_mode=self.args.swap_mode,
                             idle_shards=idle[0][0] if idle else [])

    @fastapi_app.get("/healthz")
    async def healthz(self):
        if self.version is None:
            return JSONResponse({"status": "empty", "replica_id": self.replica_id}, status_code=503)
        if self.fleet.down:
            return JSONResponse({"status": "degraded", "version": self.version, "replica_id": self.replica_id,
                                 "down": {self.fleet.describe(s): why for s, why in self.fleet.down.items()}},
                                status_code=503)
        return {"status": "ok", "version": self.version, "replica_id": self.replica_id}

    @fastapi_app.get("/metrics", include_in_schema=False, **READ)  # 410: see services.index.metrics
    async def metrics(self):
        raise await metrics_moved()
