"""One shard of the index as a Serve deployment (``IndexService-shard-{s}``), called only by the
ingress (``services.index.router``) through Serve handles; it serves no HTTP.

A replica holds its shard's versions (``services.index.shard_state``: LATEST, STAGED and, for a
grace, the previous LATEST; with ``swap_mode=blue_green`` only what its replica set's ``SLOT-{n}``
names), follows LATEST and STAGED in storage every ``poll_interval_s`` and
reports what it holds to its deployment's registry actor (``services.index.registry``), which the
ingress reads to know when every replica of every shard holds a staged version. A restarted
replica loads LATEST (and STAGED) before it serves.

Every search names the version it is pinned to; a replica that does not hold it answers
``version_unavailable`` (and checks storage at once) instead of answering from another version.
Searches of all callers share one ``@serve.batch`` queue and the coalescer, so concurrent
requests share FAISS calls.
"""

import asyncio
import logging
import os
import time

import numpy as np
from ray import serve
from whetstone.index.coarse import Assignment
from whetstone.index.wire import ErrorCode, IndexServiceError, StoredVectors

from services.index.args import IndexServiceArgs, live_update, num_slots
from services.index.metrics import IndexMetrics
from services.index.registry import registry_handle
from services.index.replica import SearchCoalescer, StatsRecorder, run_storage_op, search_grouped
from services.index.shard_state import ShardHolder, ShardVersion

logger = logging.getLogger(__name__)


@serve.deployment(name="IndexShard", max_ongoing_requests=128, health_check_period_s=5.0)
class IndexShard:
    """One replica of shard ``shard``: its held versions, a batched search queue, a follower."""

    async def __init__(self, args: IndexServiceArgs | dict, shard: int, slot: int = 0) -> None:
        self.args = IndexServiceArgs.model_validate(args if isinstance(args, dict) else args.model_dump())
        self.shard = int(shard)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        blue_green = num_slots(self.args) > 1
        self.name = f"shard {self.shard} of {self.args.num_shards}" + (f" (replica set {slot})" if blue_green else "")
        self.recorder = StatsRecorder(IndexMetrics())
        # FAISS runs on `search_workers` threads, each with `search_threads` OpenMP threads set in it.
        self._coalescer = SearchCoalescer(self._search_timed, self.args.batch_max_size, self.args.search_threads,
                                          self.args.search_workers)
        self.holder = ShardHolder(self.args.index_uri, self.args.storage, self.shard, self.args.num_shards,
                                  grace_s=2 * self.args.poll_interval_s, keep_s=self.args.swap_timeout_s,
                                  use_gpu=self.args.use_gpu, slot=int(slot) if blue_green else None)
        self._apply_batch_settings()
        # Hold LATEST (and STAGED) before serving: a restarted replica comes back at the current
        # version. An empty root is fine: nothing is served until a version is published.
        await run_storage_op(self.holder.follow)
        self._registry = self._registry_handle()
        self._stopping = False
        self._wake = asyncio.Event()
        self._follower = asyncio.get_running_loop().create_task(self._follow())
        logger.info("%s replica %s up holding %s", self.name, self.replica_id, self.holder.versions())

    def _apply_batch_settings(self) -> None:
        self._coalescer.max_requests = self.args.batch_max_size
        self._search_batch.set_max_batch_size(self.args.batch_max_size)
        self._search_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @staticmethod
    def _registry_handle():
        return registry_handle("the ingress will see this replica only")

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (``LIVE_FIELDS``) from the deployment's ``user_config``."""
        self.args = live_update(self.args, user_config)
        self.holder.grace_s = 2 * self.args.poll_interval_s
        self.holder.keep_s = self.args.swap_timeout_s
        self._apply_batch_settings()

    # ---------------------------------------------------------------- background
    async def _follow(self) -> None:
        """Follow LATEST and STAGED and report to the registry until the replica stops."""
        while not self._stopping:
            try:
                await asyncio.to_thread(self.holder.follow)
            except Exception as err:  # noqa: BLE001 - keep serving what is held
                if self._stopping:  # e.g. Serve shut the thread pool down behind __del__
                    return
                logger.warning("%s replica %s could not follow LATEST: %s", self.name, self.replica_id, err)
            self._report()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.args.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: stop following, leave the registry."""
        if getattr(self, "_stopping", True):
            return
        self._stopping = True
        self._follower.cancel()
        self._coalescer.shutdown()
        if self._registry is not None:
            try:
                self._registry.forget.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - it ages out anyway
                pass

    def _info(self) -> dict:
        return {"version": self.holder.latest, "versions": self.holder.versions(), "size": self.holder.size,
                "pid": os.getpid(), "shard": self.shard, "requests_total": self.recorder.requests_total,
                "faiss_calls_total": self.recorder.faiss_calls_total,
                "faiss_ms_p50": self.recorder.summary()["faiss_ms_p50"]}

    def _report(self) -> None:
        self.recorder.served(self.holder.latest, self.holder.size)
        if self._registry is None:
            self._registry = self._registry_handle()
            if self._registry is None:
                return
        try:
            self._registry.report.remote(self.replica_id, self._info())
        except Exception:  # noqa: BLE001 - a recreated registry: fetch the new handle next tick
            self._registry = None

    def check_health(self) -> None:
        """Serve restarts the replica when this raises: the follower must be alive."""
        if self._follower.done() and not self._stopping:
            raise RuntimeError(f"LATEST follower stopped: {self._follower.exception()!r}")

    # ---------------------------------------------------------------- search
    def _held(self, version: int) -> ShardVersion:
        held = self.holder.get(int(version))
        if held is None:
            self._wake.set()  # storage may name it already: look now, not at the next tick
            raise IndexServiceError(ErrorCode.VERSION_UNAVAILABLE,
                                    f"{self.name}: replica {self.replica_id} does not hold v{version} "
                                    f"(it holds {self.holder.versions()}); retry")
        return held

    async def search_arrays(self, version: int, vectors: np.ndarray, k: int, exclude_ids=None,
                            score_excluded: bool = False, assigned: Assignment | None = None) -> dict:
        """Top-k of this shard on ``version`` (the ingress checked shapes): ``{"version", "ids",
        "scores" (Q, k) float32, "excluded_scores", "latency_ms"}``. ``assigned``: the IVF cells
        of the queries, found once by the ingress (see ``whetstone.index.coarse``)."""
        held = self._held(version)
        started = time.perf_counter()
        pending = await self._search_batch((held, np.asarray(vectors, np.float32), int(k), exclude_ids,
                                            bool(score_excluded), assigned))
        answered, ids, scores, extra = await pending
        latency_ms = (time.perf_counter() - started) * 1000
        self.recorder.searched(len(vectors), latency_ms)
        return {"version": answered, "ids": ids, "scores": scores, "excluded_scores": extra,
                "latency_ms": latency_ms}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _search_batch(self, items: list[tuple]) -> list:
        """Hands the requests that arrived together to the coalescer and returns at once, one
        future per request, so Serve's next batch can join them while FAISS runs."""
        return self._coalescer.submit(items)

    def _search_timed(self, items: list[tuple]) -> list[tuple]:
        started = time.perf_counter()
        results = search_grouped(items)
        self.recorder.batched(len(items), time.perf_counter() - started)
        return results

    async def coarse_quantizer(self, version: int, with_quantizer: bool = False) -> dict | None:
        """This shard's IVF quantizer on ``version``: ``{"fingerprint", "nprobe", "normalize"}`` and,
        with ``with_quantizer``, the serialised ``"quantizer"``; None for kinds without one."""
        held = self._held(version)
        assigner = await asyncio.to_thread(held.index.coarse_assigner)
        if assigner is None:
            return None
        return assigner.to_wire(with_quantizer)

    async def vectors_arrays(self, version: int, ids: list[str]) -> StoredVectors:
        """The stored vectors of ``ids`` (all of this shard) on ``version``."""
        held = self._held(version)
        vectors = await run_storage_op(held.index.vectors_for, list(ids))
        return StoredVectors(version=held.version, vectors=np.ascontiguousarray(vectors, dtype=np.float32))

    # ---------------------------------------------------------------- versions
    async def stage(self, version: int) -> dict:
        """Phase 1 of a swap on this replica: hold ``version`` beside LATEST. Returns ``_info()``."""
        await run_storage_op(self.holder.stage, int(version))
        self._report()
        return {"replica_id": self.replica_id, **self._info()}

    async def apply_mutation(self, base_version: int, new_version: int, op: str, ids: list[str],
                             vectors: np.ndarray | None) -> dict:
        """Write this shard's files of ``new_version``: ``base_version`` with the upsert or delete
        of ``ids`` applied. Returns ``{"entry": ShardEntry, "changed", "count"}``."""
        result = await run_storage_op(self.holder.mutate, int(base_version), int(new_version), op, list(ids),
                                      vectors)
        self._report()
        return result

    async def replicas(self, max_age_s: float | None = None) -> list[dict]:
        """Every live replica of this shard, as its registry last heard of it (this one included)."""
        mine = {"replica_id": self.replica_id, **self._info(), "updated_at": time.time()}
        if self._registry is None:
            return [mine]
        max_age = max_age_s if max_age_s is not None else max(3 * self.args.poll_interval_s, 10.0)
        try:
            reported = await asyncio.wait_for(self._registry.list.remote(max_age), timeout=2.0)
        except Exception as err:  # noqa: BLE001 - report what we know
            logger.warning("%s: replica registry unavailable: %s", self.name, err)
            self._registry = None
            return [mine]
        return [mine] + [r for r in reported if r["replica_id"] != self.replica_id]

    async def ping(self) -> dict:
        """Liveness for the ingress's probe: this replica and what it holds."""
        return {"replica_id": self.replica_id, **self._info()}

    async def stats(self) -> dict:
        """This replica's counters (requests, FAISS calls, latencies)."""
        return {"replica_id": self.replica_id, **self._info(), **self.recorder.summary()}
