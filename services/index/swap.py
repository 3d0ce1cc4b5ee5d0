"""The storage side of the index service's two-phase swap, apart from the ingress.

Phase 1 loads the new version on every replica of every shard of one replica set: the serving set
(beside the served version: ``swap_mode=beside``, and every mutation), or the idle set of a
``blue_green`` service, so that no process holds two versions. STAGED (and a blue/green set's
``SLOT-n``) name the version while it loads; a replica that restarts meanwhile loads it too.
Phase 2 writes LATEST and flips the ingress; a blue/green swap then releases the old set, whose
replicas drop the old version after their grace (searches pinned to it finish on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from whetstone.index.snapshot import set_latest_version, set_slot_version, set_staged_version

from services.index.args import IndexServiceArgs
from services.index.fleet import ShardFleet
from services.index.replica import run_storage_op


def target_set(num_sets: int, current: int | None, in_place: bool) -> int:
    """The replica set a swap loads into: the serving one (one set, or ``in_place``), else the other."""
    if num_sets == 1 or current is None:
        return 0
    return current if in_place else 1 - current


async def two_phase_swap(args: IndexServiceArgs, fleets: Sequence[ShardFleet], version: int,
                         previous: int | None, current: int | None, in_place: bool,
                         flip: Callable[[int], None]) -> int:
    """Swap the service from ``previous`` (held by set ``current``) to ``version``; ``flip(set)``
    points the ingress at it once LATEST names it. Returns the set that serves ``version``.

    Raises:
        IndexServiceError: a shard could not load the version (the swap is undone: STAGED and the
            set's slot go back, LATEST never moved).
    """
    root, storage = args.index_uri, args.storage
    blue_green = len(fleets) > 1
    target = target_set(len(fleets), current, in_place)
    if blue_green:
        if current is not None and target != current:  # before the first swap set 0 serves by default
            await run_storage_op(set_slot_version, root, current, previous, storage)
        await run_storage_op(set_slot_version, root, target, version, storage)
    await run_storage_op(set_staged_version, root, version, storage)
    try:
        await fleets[target].stage(version, args.swap_timeout_s, args.poll_interval_s)
    except BaseException:
        if blue_green:  # the set goes back to what it held (an idle set: nothing)
            await run_storage_op(set_slot_version, root, target, previous if target == current else None, storage)
        await run_storage_op(set_staged_version, root, None, storage)  # abort: shards drop it
        raise
    await run_storage_op(set_latest_version, root, version, storage)
    flip(target)
    await run_storage_op(set_staged_version, root, None, storage)
    if blue_green and current is not None and current != target:
        await run_storage_op(set_slot_version, root, current, None, storage)
    return target
