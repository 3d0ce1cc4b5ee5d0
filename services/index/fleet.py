"""The ingress's view of its shards: one Serve handle per shard deployment, which shards are down,
the fan-out of a search pinned to one version, and phase 1 of a swap (every replica of every shard
holds the version).

A shard that does not answer (its replica died, no replica can take the call, or it timed out)
is marked down and every call to it fails at once with ``shard_unavailable`` (503) naming it,
until a background probe (:meth:`ShardFleet.probe_down`) gets an answer again: callers fail fast
instead of each waiting out the timeout while Serve restarts the replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from whetstone.index.coarse import Assignment, CoarseAssigner
from whetstone.index.merge import merge_topk
from whetstone.index.wire import ErrorCode, IndexServiceError, ReplicaInfo, ShardInfo

from services.index.args import shard_deployment_name
from services.index.routing import ServedVersion, SplitExcludes, join_excluded_scores

logger = logging.getLogger(__name__)

_REPLICA_FIELDS = set(ReplicaInfo.model_fields)


class ShardFleet:
    """The shards behind one ingress replica.

    Args:
        handles: one Serve ``DeploymentHandle`` per shard, in shard order.
        router: the ingress's deployment name (names the shard deployments in messages).
        timeout_s: how long a search waits for a shard.
        slot: which replica set of a blue/green service these are (0 otherwise).
    """

    def __init__(self, handles: Sequence[Any], router: str, timeout_s: float, slot: int = 0) -> None:
        self.handles = list(handles)
        self.router = router
        self.slot = slot
        self.timeout_s = timeout_s
        self.down: dict[int, str] = {}  # shard -> why it is down
        self._methods: dict[tuple[int, str], Any] = {}
        self._probing: set[int] = set()

    @property
    def num_shards(self) -> int:
        return len(self.handles)

    def describe(self, shard: int) -> str:
        return f"shard {shard} of {self.num_shards} ({shard_deployment_name(self.router, shard, self.slot)})"

    def unavailable(self, shards: dict[int, str], what: str = "did not answer") -> IndexServiceError:
        """``shard_unavailable`` naming every shard in ``shards`` and why."""
        named = "; ".join(f"{self.describe(s)} {what}: {reason}" for s, reason in sorted(shards.items()))
        return IndexServiceError(ErrorCode.SHARD_UNAVAILABLE, named)

    def _method(self, shard: int, name: str):
        method = self._methods.get((shard, name))
        if method is None:  # each attribute access builds a new handle object: build it once
            method = self._methods[(shard, name)] = getattr(self.handles[shard], name)
        return method

    async def call(self, shard: int, name: str, *args, timeout_s: float | None = None, mark_down: bool = True):
        """``shard.<name>(*args)``; the shard's own refusals (IndexServiceError) pass through.

        Raises:
            IndexServiceError: ``shard_unavailable`` naming the shard when it is down, does not
                answer within ``timeout_s`` (default: the search timeout) or its replica failed.
        """
        if shard in self.down:
            raise self.unavailable({shard: self.down[shard]})
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        for attempt in (0, 1):
            try:
                return await asyncio.wait_for(self._method(shard, name).remote(*args),
                                              timeout=max(deadline - time.monotonic(), 0.001))
            except IndexServiceError:
                raise
            except asyncio.TimeoutError:
                reason = f"no answer to {name} within {timeout_s:g}s"
                break
            except Exception as err:  # noqa: BLE001 - a dead replica, no replica, a shut-down Serve
                # Once more: the replica that failed may have a live sibling Serve now routes to.
                lines = str(err).strip().splitlines()
                reason = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
                logger.info("%s failed %s (attempt %d): %s", self.describe(shard), name, attempt + 1, reason)
        if mark_down:
            self.down.setdefault(shard, reason)
            logger.warning("%s is down: %s", self.describe(shard), reason)
        raise self.unavailable({shard: reason})

    async def gather(self, calls: dict[int, Any]) -> dict[int, Any]:
        """Await one call per shard; raise one error naming every shard that failed.

        Shards that did not answer come first (503 ``shard_unavailable`` naming all of them); else
        the lowest shard's own refusal (e.g. ``version_unavailable``, ``bad_input``) is raised.
        """
        shards = list(calls)
        answers = await asyncio.gather(*calls.values(), return_exceptions=True)
        failed = {s: a for s, a in zip(shards, answers, strict=True) if isinstance(a, BaseException)}
        if failed:
            missing = {s: err for s, err in failed.items()
                       if isinstance(err, IndexServiceError) and err.code == ErrorCode.SHARD_UNAVAILABLE}
            if len(missing) > 1:
                raise IndexServiceError(ErrorCode.SHARD_UNAVAILABLE, "; ".join(e.detail for e in missing.values()))
            raise (next(iter(missing.values())) if missing else failed[min(failed)])
        return dict(zip(shards, answers, strict=True))

    async def probe_down(self, timeout_s: float = 2.0) -> None:
        """Ping every down shard (one probe per shard at a time); an answer marks it up again."""

        async def probe(shard: int) -> None:
            self._probing.add(shard)
            try:
                await asyncio.wait_for(self._method(shard, "ping").remote(), timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - still down
                self.down[shard] = f"{type(err).__name__}: {str(err).strip()[:200]}" if not isinstance(
                    err, asyncio.TimeoutError) else f"no answer to a probe within {timeout_s:g}s"
            else:
                logger.info("%s answers again", self.describe(shard))
                self.down.pop(shard, None)
            finally:
                self._probing.discard(shard)

        await asyncio.gather(*(probe(s) for s in list(self.down) if s not in self._probing))

    # ---------------------------------------------------------------- search
    async def search(self, version: int, vectors: np.ndarray, k: int, split: SplitExcludes,
                     score_excluded: bool, assigned: Assignment | None = None,
                     ) -> tuple[list[list[str]], np.ndarray, list | None]:
        """Every shard's top-k on ``version``, merged: ``(ids, scores, excluded scores or None)``.
        ``assigned``: the queries' IVF cells, found once for every shard.

        Raises:
            IndexServiceError: a shard is unavailable, or answered another version than asked.
        """
        calls = {s: self.call(s, "search_arrays", version, vectors, k, split.per_shard[s],
                              score_excluded and split.per_shard[s] is not None, assigned)
                 for s in range(self.num_shards)}
        answers = await self.gather(calls)
        for shard, answer in answers.items():
            if answer["version"] != version:  # never merge two versions
                raise IndexServiceError(ErrorCode.VERSION_UNAVAILABLE,
                                        f"{self.describe(shard)} answered v{answer['version']} to a search "
                                        f"pinned to v{version}")
        ordered = [answers[s] for s in range(self.num_shards)]
        ids, scores = merge_topk([(a["ids"], a["scores"]) for a in ordered], k)
        extra = None
        if score_excluded:
            extra = join_excluded_scores(split, [a["excluded_scores"] for a in ordered])
        return ids, scores, extra

    async def coarse_assigner(self, version: int) -> CoarseAssigner | None:
        """The IVF quantizer every shard of ``version`` holds, fetched from shard 0 once every shard
        named the same fingerprint (shards trained together); None when they do not share one."""
        found = await asyncio.gather(*(self.call(s, "coarse_quantizer", version, mark_down=False)
                                       for s in range(self.num_shards)))
        if any(f is None for f in found) or len({(f["fingerprint"], f["nprobe"]) for f in found}) != 1:
            logger.info("v%d: the shards do not share one coarse quantizer; each assigns its own queries", version)
            return None
        wire = await self.call(0, "coarse_quantizer", version, True, mark_down=False)
        assigner = await asyncio.to_thread(CoarseAssigner.from_wire, wire)
        logger.info("v%d: queries are assigned to cells at the ingress (%d cells, nprobe %d) for all %d shards",
                    version, assigner.nlist, assigner.nprobe, self.num_shards)
        return assigner

    async def fetch_assigner(self, served: ServedVersion) -> None:
        """Set ``served.assigner`` (:meth:`coarse_assigner`); on failure ask again in 30 s."""
        try:
            served.assigner = await self.coarse_assigner(served.version)
        except Exception as err:  # noqa: BLE001 - the shards assign their own queries meanwhile
            logger.warning("v%d: no coarse quantizer from the shards (%s: %s); they assign their own queries; "
                           "asking again in 30 s", served.version, type(err).__name__, err)
            served.assigner_due = time.monotonic() + 30.0

    # ---------------------------------------------------------------- swap, phase 1
    async def lagging(self, version: int, timeout_s: float = 5.0) -> dict[int, str]:
        """``{shard: why}`` for every shard some live replica of which does not hold ``version``
        (or that did not list its replicas)."""
        listed = await asyncio.gather(*(self.call(s, "replicas", timeout_s=timeout_s, mark_down=False)
                                        for s in range(self.num_shards)), return_exceptions=True)
        lagging: dict[int, str] = {}
        for shard, replicas in enumerate(listed):
            if isinstance(replicas, BaseException):
                lagging[shard] = str(getattr(replicas, "detail", replicas))
                continue
            behind = [r["replica_id"] for r in replicas if version not in r.get("versions", [])]
            if behind:
                lagging[shard] = f"replicas {behind} do not hold v{version} yet"
        return lagging

    async def holds(self, version: int) -> bool:
        """Whether every live replica of every shard holds ``version``."""
        return not await self.lagging(version, timeout_s=2.0)

    async def stage(self, version: int, timeout_s: float, poll_s: float) -> None:
        """Return once every live replica of every shard holds ``version``.

        One replica per shard loads it at once (``stage``); the others follow STAGED in storage
        within a poll interval; their reports in each shard's registry say when they have it.

        Raises:
            IndexServiceError: the version is broken (the shard's code), or shards did not load it
                within ``timeout_s`` (``shard_unavailable`` naming the lagging shards and replicas).
        """
        deadline = time.monotonic() + timeout_s
        await self.gather({s: self.call(s, "stage", version, timeout_s=timeout_s, mark_down=False)
                           for s in range(self.num_shards)})
        while True:
            lagging = await self.lagging(version)
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise self.unavailable(lagging, f"did not load v{version} within {timeout_s:g}s")
            await asyncio.sleep(min(0.2, poll_s / 2))

    # ---------------------------------------------------------------- stats
    async def info(self, shard: int, count: int | None) -> ShardInfo:
        """``/stats`` of one shard: its replicas and what each holds (a down shard says why)."""
        name = shard_deployment_name(self.router, shard, self.slot)
        if shard in self.down:
            return ShardInfo(shard=shard, deployment=name, count=count, available=False, error=self.down[shard])
        try:
            replicas = await self.call(shard, "replicas", timeout_s=2.0, mark_down=False)
        except IndexServiceError as err:
            return ShardInfo(shard=shard, deployment=name, count=count, available=False, error=str(err.detail))
        rows = [ReplicaInfo(**{k: v for k, v in r.items() if k in _REPLICA_FIELDS}) for r in replicas]
        return ShardInfo(shard=shard, deployment=name, count=count, available=True,
                         replicas=sorted(rows, key=lambda r: r.replica_id))

    async def summary(self, counts: Sequence[int | None]) -> tuple[list[ShardInfo], dict]:
        """``/stats`` of every shard (``counts``: each shard's documents, when known) and the FAISS
        figures of their replicas: calls, requests per call, the slowest replica's median."""
        shards = list(await asyncio.gather(*(self.info(s, counts[s]) for s in range(self.num_shards))))
        replicas = [r for shard in shards for r in shard.replicas]
        calls = sum(r.faiss_calls_total or 0 for r in replicas)
        medians = [r.faiss_ms_p50 for r in replicas if r.faiss_ms_p50 is not None]
        return shards, {"faiss_calls_total": calls,
                        "requests_per_faiss_call": sum(r.requests_total or 0 for r in replicas) / calls if calls else None,
                        "faiss_ms_p50": max(medians, default=None)}
