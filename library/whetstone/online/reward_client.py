"""How online training scores completions: the reward model service through a Serve handle inside
the cluster, or over HTTP from anywhere.

The service (``services/reward``) serves one reward model, versioned, and batches concurrent
requests; every answer names the version that scored it, so a trainer can tell when the reward
model changed under it (a ``POST /reload``). :class:`RewardClient` is picklable: build it on the
driver, ship it to Ray Train workers in the train config; the handle or HTTP connection is made
lazily in the process that uses it. Its methods are synchronous and must not be called from
inside an asyncio event loop (e.g. another Serve deployment).

The app, deployment and route names are defined here, not in the service's schemas (which import
them): the library never imports the services. A driver deploys the service with
``services.reward.app.deploy_reward_service`` (the preference job passes it to
:func:`whetstone.train.online_run.online_services`) and removes it with ``services.reward.app.shutdown``.

Example::

    client = deploy_reward_service("runs/rm/model", app_name="whetstone-reward")  # the driver
    client = RewardClient.from_handle("whetstone-reward")            # inside the Ray cluster
    client = RewardClient.from_url("http://host:8000/reward", token)  # anywhere
    scores, version = client.score(prompts, completions)              # (N,) float32, "rm-1a2b3c4d"
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)
APP_NAME = "whetstone-reward"
DEPLOYMENT_NAME = "RewardService"
ROUTE_PREFIX = "/reward"


class RewardServiceError(RuntimeError):
    """The reward service refused a request, failed, timed out or could not be reached. ``status``
    is the HTTP status (None when there was no answer) and ``code`` the service's error code
    (``whetstone.index.wire.ErrorCode`` values, e.g. ``"bad_input"``; None when absent)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RewardClient:
    """Score (prompt, completion) pairs with the served reward model (see module docs).

    Args:
        mode: ``"handle"`` (Serve deployment handle; inside the Ray cluster) or ``"http"``.
        app_name: the Serve application (handle mode).
        deployment: the deployment's name (handle mode).
        url: the service's root, e.g. ``http://host:8000/reward`` (HTTP mode).
        token: the bearer token (HTTP mode; None sends no ``Authorization`` header).
        timeout_s: per call; scoring a few hundred pairs on CPU takes seconds.
    """

    def __init__(self, mode: Literal["handle", "http"], *, app_name: str = APP_NAME,
                 deployment: str = DEPLOYMENT_NAME, url: str | None = None, token: str | None = None,
                 timeout_s: float = 120.0) -> None:
        if mode not in ("handle", "http"):
            raise ValueError(f"mode: {mode!r} is not 'handle' or 'http'")
        if mode == "http" and not url:
            raise ValueError("url: required for an HTTP client")
        self.mode = mode
        self.app_name = app_name
        self.deployment = deployment
        self.url = (url or "").rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._conn: Any = None  # the deployment handle or the httpx.Client, made on first use
        self._lock = threading.Lock()

    @classmethod
    def from_handle(cls, app_name: str = APP_NAME, deployment: str = DEPLOYMENT_NAME,
                    timeout_s: float = 120.0) -> RewardClient:
        """A client that calls the deployment's ``score_batch`` through a Serve handle (works in
        the driver, Ray Train workers and actors of the cluster Serve runs in; no token)."""
        return cls("handle", app_name=app_name, deployment=deployment, timeout_s=timeout_s)

    @classmethod
    def from_url(cls, url: str, token: str | None = None, timeout_s: float = 120.0) -> RewardClient:
        """A client that posts to ``{url}/score`` with ``Authorization: Bearer <token>``."""
        return cls("http", url=url, token=token, timeout_s=timeout_s)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_conn"], state["_lock"] = None, None  # neither pickles; remade where the client lands
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the token
        where = f"{self.app_name}/{self.deployment}" if self.mode == "handle" else self.url
        return f"RewardClient({self.mode}: {where})"

    # ------------------------------------------------------------------ calls
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, str]:
        """Reward of each (prompt, response) pair.

        Returns:
            (scores (N,) float32 in input order, the version of the reward model that scored them:
            one version for the whole call).

        Raises:
            ValueError: the lists are empty or of different lengths (checked before sending).
            RewardServiceError: the service refused (e.g. 413: more pairs than its ``max_items``),
                failed, timed out or is not there.
        """
        prompts, responses = list(prompts), list(responses)
        if not prompts or len(prompts) != len(responses):
            raise ValueError(f"responses: need one response per prompt and at least one pair, got "
                             f"{len(prompts)} prompts and {len(responses)} responses")
        if self.mode == "handle":
            body = self._call_handle("score_batch", prompts, responses)
        else:
            body = self._request("POST", "/score", {"prompts": prompts, "responses": responses})
        scores = np.asarray(body["scores"], dtype=np.float32)
        if scores.shape != (len(prompts),):
            raise RewardServiceError(f"{self._where()}: {scores.shape[0]} scores for {len(prompts)} pairs")
        return scores, str(body["version"])

    def info(self) -> dict:
        """``{"status", "version", "model_uri"}`` of the served model (``GET /healthz``)."""
        return self._call_handle("info") if self.mode == "handle" else self._request("GET", "/healthz", None)

    def version(self) -> str:
        """The version the service scores with now."""
        return str(self.info()["version"])

    # ------------------------------------------------------------------ transports
    def _where(self) -> str:
        return f"reward service {self.app_name}/{self.deployment}" if self.mode == "handle" else self.url

    def _handle(self):
        with self._lock:
            if self._conn is None:
                from ray import serve

                self._conn = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
            return self._conn

    def _call_handle(self, method: str, *args) -> dict:
        from whetstone.index.wire import IndexServiceError

        try:
            response = getattr(self._handle(), method).remote(*args)
        except Exception as err:  # noqa: BLE001 - no Serve controller, no such app or deployment
            raise RewardServiceError(f"{self._where()} is not reachable: {type(err).__name__}: {err}") from err
        try:
            return response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()
            raise RewardServiceError(f"{self._where()}: {method} timed out after {self.timeout_s}s") from None
        except IndexServiceError as err:  # raised by the replica; Ray re-raises it with its type
            raise RewardServiceError(f"{self._where()}: {err.detail}", err.status, err.code.value) from None
        except Exception as err:  # noqa: BLE001 - a dead replica, back-pressure, Serve shutting down
            raise RewardServiceError(f"{self._where()}: {method} failed: {type(err).__name__}: {err}") from err

    def _http(self):
        with self._lock:
            if self._conn is None:
                import httpx

                headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
                self._conn = httpx.Client(base_url=self.url, headers=headers)
            return self._conn

    def _request(self, verb: str, path: str, body: dict | None) -> dict:
        import httpx

        where = f"{verb} {self.url}{path}"
        try:
            response = self._http().request(verb, path, json=body, timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise RewardServiceError(f"{where} timed out after {self.timeout_s}s") from None
        except httpx.TransportError as err:
            raise RewardServiceError(f"{where} failed: {type(err).__name__}: {err}") from None
        if response.status_code >= 400:
            detail, code = _error_body(response)
            raise RewardServiceError(f"{where} answered HTTP {response.status_code}: {detail}",
                                     response.status_code, code)
        return response.json()


def _error_body(response) -> tuple[object, str | None]:
    """``(detail, code)`` of an error answer; ``(text, None)`` when it is not the service's JSON
    (e.g. Serve's proxy: 404 for a route no application serves)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300], None
    if not isinstance(body, dict):
        return response.text[:300], None
    code = body.get("code")
    return body.get("detail", response.text[:300]), None if code is None else str(code)
