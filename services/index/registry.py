"""Per-replica versions for ``/stats``: a small actor every replica reports to on each poll tick.

The registry is a Serve *deployment-scoped actor* (``DeploymentActorConfig``), created and deleted
by the Serve controller with the deployment, so no detached actor outlives the app.
"""

import logging
import time

import ray
from ray import serve

logger = logging.getLogger(__name__)

REGISTRY_ACTOR = "replica_registry"


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    """Last report of every replica of the deployment; stale entries (dead replicas) age out."""

    def __init__(self) -> None:
        self._reports: dict[str, dict] = {}

    def report(self, replica_id: str, info: dict) -> None:
        self._reports[replica_id] = {**info, "replica_id": replica_id, "updated_at": time.time()}

    def forget(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    def list(self, max_age_s: float) -> list[dict]:
        now = time.time()
        self._reports = {k: v for k, v in self._reports.items() if now - v["updated_at"] <= max_age_s}
        return sorted(self._reports.values(), key=lambda r: r["replica_id"])


def registry_handle(missing: str):
    """This deployment's registry actor, or None (logged, with what ``missing`` costs) when Serve has none."""
    try:
        return serve.get_deployment_actor(REGISTRY_ACTOR)
    except Exception as err:  # noqa: BLE001 - the caller degrades to what this replica knows
        logger.warning("no replica registry (%s); %s", err, missing)
        return None
