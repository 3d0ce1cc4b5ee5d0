"""Where a training run's metrics go besides the console and the history JSON: TensorBoard event
files (on by default) and an MLflow run (when a tracking URI is configured).

Layout: ``<run>/tensorboard/train/`` holds rank 0's per-step metrics (one scalar per metric and
step: ``loss``, ``lr``, ``pairs_per_s``, ...), ``<run>/tensorboard/eval/`` the driver's evaluation
figures (the contrastive job's nDCG@10 before training, at each refresh and at the end; the
preference job's held-out accuracy and margin). Two folders are two TensorBoard runs, so a restarted
worker group's purge of the steps it trains again (``purge_step``) never hides an evaluation point.
``tensorboard --logdir <run>/tensorboard`` shows both. A run on ``s3://`` writes the event files to a
local folder and uploads them with each checkpoint and at the end.

MLflow: the driver creates the run (params: the flattened config), rank 0 sends its per-step
metrics in batches (every ``tracking.flush_every_s``, at checkpoints and at the end), the driver
adds the evaluation and report figures and ends the run (FAILED when the job raised). ``mlflow``
is imported only when a URI is configured: the ``tracking`` extra (``pip install
"whetstone[tracking]"``). A resumed run (``if_exists=resume``) continues its MLflow run
(``<run>/tracking.json`` names it).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig, TrackingConfig

TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"
MLFLOW_EXTRA = 'pip install "whetstone[tracking]"'
# Not metrics: the step itself and the wall-clock time a step ended (TensorBoard's walltime).
_NOT_SCALARS = {"step", "t"}
_MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MLFLOW_PARAMS = 100  # ... and on params per call


def mlflow_uri(tracking: TrackingConfig) -> str | None:
    """The MLflow tracking URI in force: ``tracking.mlflow_uri``, else ``MLFLOW_TRACKING_URI``
    (an empty ``tracking.mlflow_uri`` turns MLflow off even when the variable is set)."""
    if tracking.mlflow_uri is not None:
        return tracking.mlflow_uri or None
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def require_mlflow(uri: str) -> Any:
    """``mlflow``, or a :class:`ConfigError` naming the extra that provides it."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"tracking.mlflow_uri / MLFLOW_TRACKING_URI is {uri!r}, but MLflow is not installed: "
                          f"{MLFLOW_EXTRA} (or set tracking.mlflow_uri= (empty) to log to TensorBoard only)") from None
    return mlflow


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``. MLflow 3 refuses a file store (``file:///...`` or a path)
    unless ``MLFLOW_ALLOW_FILE_STORE`` is set; a configured one is taken as that opt-in."""
    require_mlflow(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("", "file") and not uri.startswith("databricks"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts (``ndcg@10`` -> ``ndcg_at_10``; letters, digits, ``_-./ :``)."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


def flat_params(config: Any) -> dict[str, str]:
    """A job config as MLflow params: dotted keys, values as text (lists as JSON; secrets masked)."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else name)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[key] = text[:6000]  # MLflow's longest param value

    walk(config.model_dump(mode="json"), "")
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics dict (not the step, the wall time or running totals)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _NOT_SCALARS
            and not key.startswith("total_") and math.isfinite(value)}


class EventFile:
    """One TensorBoard event file, written synchronously with tensorboardX's record writer (its
    ``SummaryWriter`` hands events to a thread, and its ``flush`` does not wait for them: an upload
    right after could miss the last ones). One event per step holds every scalar of the step.

    ``purge_step``: the file starts with a restart marker at that step; TensorBoard then hides the
    earlier events of this run (this folder) at or after it.
    """

    def __init__(self, folder: str, suffix: str, purge_step: int | None = None) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(folder, exist_ok=True)
        self.writer = EventsWriter(os.path.join(folder, "events"), suffix)  # writes the file-version event
        if purge_step is not None:
            self.writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                          session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, values: dict[str, float], step: int, walltime: float) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in values.items()])
        self.writer.write_event(Event(wall_time=walltime, step=step, summary=summary))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricWriter:
    """Scalars of one TensorBoard run (a folder under ``<run>/tensorboard/``) and, optionally, an
    MLflow run. Rank 0 writes the per-step metrics through one; the driver its evaluation figures.

    Args:
        tensorboard_uri: ``<run>/tensorboard`` (None: no event files).
        name: the TensorBoard run (``train``, ``eval``): the folder the events go to.
        mlflow_uri, mlflow_run_id: the MLflow run to send metrics to (None: none).
        mlflow_prefix: put before every MLflow key (``eval_``), so names do not clash across writers.
        flush_every_s: event files flushed and MLflow metrics sent at least this often.
        restartable: the steps can be trained again (rank 0 after a restart or a resume): a writer
            whose first step is past 1 marks that step restarted, and TensorBoard drops this run's
            older events at or after it.
    """

    def __init__(self, tensorboard_uri: str | None, name: str, mlflow_uri: str | None = None,
                 mlflow_run_id: str | None = None, storage: StorageConfig | None = None,
                 flush_every_s: float = 10.0, mlflow_prefix: str = "", restartable: bool = False) -> None:
        self.uri = store.join(tensorboard_uri, name) if tensorboard_uri else None
        self.name, self.storage, self.flush_every_s, self.mlflow_prefix = name, storage, flush_every_s, mlflow_prefix
        self.remote = bool(self.uri and "://" in self.uri)
        self.local_dir = (tempfile.mkdtemp(prefix=f"whetstone-tensorboard-{name}-") if self.remote else self.uri)
        self.mlflow = mlflow_client(mlflow_uri) if mlflow_uri and mlflow_run_id else None
        self.run_id = mlflow_run_id
        self.events: EventFile | None = None  # opened at the first step
        self.pending: list[Any] = []  # MLflow metrics not sent yet
        self.flushed_at = time.monotonic()
        self.mlflow_error: str | None = None
        self.restartable = restartable

    def add(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Write the scalars of ``metrics`` at ``step`` (default ``metrics["step"]``)."""
        step = int(metrics["step"] if step is None else step)
        walltime = float(metrics.get("t") or time.time())
        values = scalars(metrics)
        if self.local_dir is not None:
            if self.events is None:
                # TensorBoard reads a folder's files in name order (a restart marker applies to what
                # came before it): after the second in the name, the nanosecond keeps that order.
                self.events = EventFile(self.local_dir, f".{time.time_ns()}.{self.name}-{os.getpid()}",
                                        purge_step=step if self.restartable and step > 1 else None)
            self.events.scalars(values, step, walltime)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            self.pending += [Metric(mlflow_key(self.mlflow_prefix + key), value, int(walltime * 1000), step)
                             for key, value in values.items()]
        if time.monotonic() - self.flushed_at >= self.flush_every_s or len(self.pending) >= _MLFLOW_BATCH:
            self.flush()

    def flush(self) -> None:
        """Event files to disk; buffered metrics to MLflow (a failing server is reported once, not raised)."""
        self.flushed_at = time.monotonic()
        if self.events is not None:
            self.events.flush()
        pending, self.pending = self.pending, []
        for start in range(0, len(pending), _MLFLOW_BATCH):
            try:
                self.mlflow.log_batch(self.run_id, metrics=pending[start:start + _MLFLOW_BATCH])
            except Exception as err:  # noqa: BLE001 - tracking must not stop training
                if self.mlflow_error is None:
                    print(f"[tracking] MLflow logging failed ({type(err).__name__}: {err}); metrics stay in "
                          "TensorBoard and the history", flush=True)
                self.mlflow_error = str(err)

    def sync(self) -> None:
        """Flush, and upload the event files of an ``s3://`` run (rank 0 calls it with each checkpoint)."""
        self.flush()
        if self.remote and self.events is not None:
            store.upload_dir(self.local_dir, self.uri, self.storage)

    def close(self) -> None:
        self.sync()
        if self.events is not None:
            self.events.close()
            self.events = None


def metric_writer(rank: int, plan: Any, tracking: TrackingConfig, storage: StorageConfig | None) -> MetricWriter | None:
    """Rank 0's writer of per-step metrics (``<run>/tensorboard/train``, the MLflow run), from the
    plan's tracking fields; None on other ranks or when nothing is tracked."""
    if rank != 0 or not (plan.tensorboard_uri or plan.mlflow_run_id):
        return None
    return MetricWriter(plan.tensorboard_uri, "train", plan.mlflow_uri, plan.mlflow_run_id, storage,
                        tracking.flush_every_s, restartable=True)


@dataclass
class RunTracking:
    """The driver's side: where the run's metrics go (the plan carries it to rank 0), its own
    evaluation figures, and the end of the MLflow run. Use it as a context manager around the job's
    stages: the MLflow run ends FAILED when one raises."""

    tensorboard_uri: str | None
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    storage: StorageConfig | None = None
    flush_every_s: float = 10.0
    ended: bool = False
    _eval: MetricWriter | None = field(default=None, repr=False)

    def plan_fields(self) -> dict[str, Any]:
        return {"tensorboard_uri": self.tensorboard_uri, "mlflow_uri": self.mlflow_uri,
                "mlflow_run_id": self.mlflow_run_id}

    def log_eval(self, metrics: dict[str, Any], step: int) -> None:
        """Evaluation figures at ``step`` (TensorBoard run ``eval``; MLflow keys ``eval_<name>``)."""
        values = {key.removeprefix("eval_"): value for key, value in scalars(metrics).items()}
        if not values or not (self.tensorboard_uri or self.mlflow_run_id):
            return
        if self._eval is None:
            self._eval = MetricWriter(self.tensorboard_uri, "eval", self.mlflow_uri, self.mlflow_run_id,
                                      self.storage, self.flush_every_s, mlflow_prefix="eval_")
        self._eval.add(values, step)
        self._eval.flush()

    def log_report(self, figures: dict[str, Any], step: int) -> None:
        """The report's figures (nested dicts flattened with dots) as MLflow metrics at ``step``."""
        if self.mlflow_run_id is None:
            return
        from mlflow.entities import Metric

        flat: dict[str, Any] = {}
        for key, value in figures.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{name}": item for name, item in value.items()})
            else:
                flat[key] = value
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(key), value, now, step) for key, value in scalars(flat).items()]
        client = mlflow_client(self.mlflow_uri)
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            client.log_batch(self.mlflow_run_id, metrics=metrics[start:start + _MLFLOW_BATCH])

    def finish(self, status: str = "FINISHED") -> None:
        """Close the eval writer (uploading its events) and end the MLflow run; once."""
        if self.ended:
            return
        self.ended = True
        if self._eval is not None:
            self._eval.close()
        if self.mlflow_run_id is not None:
            mlflow_client(self.mlflow_uri).set_terminated(self.mlflow_run_id, status)

    def __enter__(self) -> RunTracking:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.finish("FAILED" if kind is not None else "FINISHED")


def _mlflow_run(tracking: TrackingConfig, uri: str, config: Any, run_uri: str, job: str, resume: bool) -> str:
    """The MLflow run of this training run: the one ``<run>/tracking.json`` names when resuming
    (same URI), else a new one in ``tracking.mlflow_experiment`` with the config as params."""
    client = mlflow_client(uri)
    saved_uri = store.join(run_uri, TRACKING_FILE)
    if resume and store.exists(saved_uri, config.storage):
        saved = json.loads(store.read_bytes(saved_uri, config.storage))
        if saved.get("mlflow_uri") == uri and saved.get("mlflow_run_id"):
            client.update_run(saved["mlflow_run_id"], status="RUNNING")
            return saved["mlflow_run_id"]
    experiment = client.get_experiment_by_name(tracking.mlflow_experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(tracking.mlflow_experiment))
    run = client.create_run(experiment_id, run_name=config.run_name,
                            tags={"whetstone.job": job, "whetstone.run_uri": run_uri})
    from mlflow.entities import Param

    params = [Param(key, value) for key, value in flat_params(config).items()]
    for start in range(0, len(params), _MLFLOW_PARAMS):
        client.log_batch(run.info.run_id, params=params[start:start + _MLFLOW_PARAMS])
    store.write_bytes(saved_uri, json.dumps({"mlflow_uri": uri, "mlflow_run_id": run.info.run_id,
                                             "experiment_id": experiment_id}).encode(), config.storage)
    return run.info.run_id


def mlflow_run_link(uri: str, run_id: str) -> str:
    """Where to look at the run: its page on an MLflow server, or the command that serves a file store."""
    client = mlflow_client(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    if urlparse(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  (then experiment {experiment_id}, run {run_id})"


def start_tracking(config: Any, job: str, resume: bool = False) -> RunTracking:
    """The driver's start: the MLflow run (created, or continued on resume), and one line each for
    where to look: the TensorBoard folder (with its command), the MLflow run, the Ray dashboard.

    ``config``: a job config with ``tracking``, ``run_uri``, ``run_name`` and ``storage``.

    Raises:
        ConfigError: an MLflow URI is configured (or in ``MLFLOW_TRACKING_URI``) and MLflow is not installed.
    """
    from whetstone.train.runtime import dashboard_url

    tracking, run_uri = config.tracking, config.run_uri
    uri = mlflow_uri(tracking)
    run_id = _mlflow_run(tracking, uri, config, run_uri, job, resume) if uri else None
    out = RunTracking(store.join(run_uri, TENSORBOARD_DIR) if tracking.tensorboard else None, uri if run_id else None,
                      run_id, config.storage, tracking.flush_every_s)
    if out.tensorboard_uri:
        synced = " (uploaded with each checkpoint)" if "://" in out.tensorboard_uri else ""
        print(f"[run] TensorBoard: tensorboard --logdir {out.tensorboard_uri}{synced}", flush=True)
    if run_id:
        print(f"[run] MLflow: run {run_id} in experiment {tracking.mlflow_experiment!r} at {uri}: "
              f"{mlflow_run_link(uri, run_id)}", flush=True)
    url = dashboard_url()
    if url:
        print(f"[run] Ray dashboard: {url}", flush=True)
    return out
