"""The index service: a live, versioned, sharded FAISS index on Ray Serve for training workers and
HTTP users.

Routes (under the route prefix, ``/index`` by default, so an ``/embed`` app can sit beside it):
``POST /search``, ``POST /upsert``, ``POST /delete``, ``POST /swap``, ``GET /stats``,
``GET /healthz`` and the usual ``/docs`` + ``/openapi.json``. Training workers call the same
methods through a Serve handle (see ``whetstone.index.client``).

Metrics. Every replica records Prometheus metrics through Ray Serve's metrics API; Ray's metrics
agent exports them on each node's metrics port (KubeRay: 8080 on every Ray pod) as
``ray_whetstone_index_*`` with ``application``/``deployment``/``replica`` labels
(``services.index.metrics``). ``GET /metrics`` answers 410 naming those addresses.

Shape. The application is one ingress deployment, ``IndexService`` (``services.index.router``:
routes, fan-out, merge; it holds no vectors) and ``num_shards`` shard deployments,
``IndexService-shard-{s}`` (``services.index.shard``), ``replicas_per_shard`` replicas each, every
replica holding its shard of the served version (and of a version being swapped in; with
``swap_mode=blue_green`` a second set of shard deployments, ``IndexService-shard-{s}-b``, loads it
instead, so no replica holds two versions). Documents are
assigned to shards by ``whetstone.index.snapshot.shard_of`` (crc32 of the id); the snapshot's
``num_shards`` must equal the deployment's. With one shard (the default) the ingress forwards to
one shard deployment and the answers are those of one unsharded index.

Versions and swaps: a search is pinned to one version on every shard; a swap is two-phase (every
shard replica loads v beside the served one, then the ingress flips and writes LATEST); replicas
follow LATEST and STAGED in storage, and a restarted replica loads them on start. See the router's
module docs. A shard that does not answer gives ``503 shard_unavailable`` naming it.

Per-replica versions for ``/stats``: every replica reports to a registry actor of its deployment
(``services.index.registry``); ``/stats`` lists the ingress replicas and, per shard, its replicas
with the versions each holds and its pid.

Auth. Mutations (``/upsert``, ``/delete``, ``/swap``) need ``Authorization: Bearer <token>``
(``auth_token`` or env ``WHETSTONE_INDEX_TOKEN``; with neither set, HTTP mutations are refused);
reads need it too when ``protect_reads``. Missing token: 401; wrong token: 403. Handle callers
are inside the Ray cluster, the trust boundary, and are not asked for a token.

Errors. The wire format, error codes included, lives in ``whetstone.index.wire``. Every error
answer carries a ``code`` beside its ``detail`` (HTTP JSON), or is an ``IndexServiceError``
carrying it (handle callers). The HTTP layer is ``services.index.http``.

Run::

    serve run services.index.app:build_app index_uri=.whetstone/store/index --route-prefix /index
    serve run services.index.app:build_app index_uri=s3://bucket/index num_shards=4 replicas_per_shard=2 --route-prefix /index
    serve deploy services/index/serve_config.yaml
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation as a class to
# validate the `key=value` args into IndexServiceArgs.
import logging
import time

from ray import serve
from ray.serve import Application
from ray.serve.config import DeploymentActorConfig
from ray.serve.schema import LoggingConfig
from whetstone.config.base import StorageConfig
from whetstone.index.snapshot import latest_version, read_manifest
from whetstone.index.wire import APP_NAME, DEPLOYMENT_NAME, ROUTE_PREFIX

from services.index.args import LIVE_FIELDS, IndexServiceArgs, num_slots, resolve_token, shard_deployment_name
from services.index.registry import REGISTRY_ACTOR, ReplicaRegistry
from services.index.router import IndexService
from services.index.shard import IndexShard

__all__ = ["LIVE_FIELDS", "IndexService", "IndexServiceArgs", "IndexShard", "build_app", "deploy",
           "resolve_token", "shutdown", "start_serve"]

logger = logging.getLogger(__name__)


def _registry() -> list[DeploymentActorConfig]:
    return [DeploymentActorConfig(name=REGISTRY_ACTOR, actor_class=ReplicaRegistry, actor_options={"num_cpus": 0})]


def published_num_shards(index_uri: str, storage: StorageConfig) -> int:
    """The shard count of the version ``LATEST`` names (1 when nothing is published yet)."""
    version = latest_version(index_uri, storage)
    return 1 if version is None else read_manifest(index_uri, version, storage).num_shards


def build_app(args: IndexServiceArgs) -> Application:
    """The Serve application (``serve run services.index.app:build_app index_uri=...``)."""
    if isinstance(args, dict):
        args = IndexServiceArgs.model_validate(args)
    # Fill S3 settings from this (the deploying) process's environment: replicas started
    # elsewhere may not share it. Secrets travel in the deployments' init args, never in logs.
    args = args.model_copy(update={"storage": args.storage.resolved()})
    if args.num_shards is None:
        args = args.model_copy(update={"num_shards": published_num_shards(args.index_uri, args.storage)})
    logging_config = LoggingConfig(enable_access_log=args.access_log)
    shard_resources: dict = {"num_cpus": args.num_cpus}
    if args.use_gpu:
        shard_resources["num_gpus"] = args.gpus_per_replica
    if args.shard_custom_resources:
        shard_resources["resources"] = dict(args.shard_custom_resources)
    sets = [[
        IndexShard.options(
            name=shard_deployment_name(DEPLOYMENT_NAME, shard, slot),
            num_replicas=args.replicas_per_shard,
            ray_actor_options=shard_resources,
            max_ongoing_requests=max(args.max_ongoing_requests, args.batch_max_size),
            health_check_period_s=args.health_check_period_s,
            logging_config=logging_config,
            deployment_actors=_registry(),
        ).bind(args, shard, slot)
        for shard in range(args.num_shards)
    ] for slot in range(num_slots(args))]
    router = IndexService.options(
        num_replicas=args.router_replicas,
        ray_actor_options={"num_cpus": args.router_cpus},
        max_ongoing_requests=args.max_ongoing_requests,
        health_check_period_s=args.health_check_period_s,
        logging_config=logging_config,
        deployment_actors=_registry(),
    )
    return router.bind(args, *sets)


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
    """Delete the application (its registry actors go with it)."""
    serve.delete(app_name)
