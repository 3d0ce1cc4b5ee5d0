"""What every job's driver does the same way: parse the command line, join or start Ray, name the
run's storage, time the stages.

Nothing here knows a job's config beyond the fields every job config has (``run_uri``,
``if_exists``, ``storage``); nothing here imports the services or the jobs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import ray

from whetstone import storage as store
from whetstone.config.base import ConfigError, StorageConfig, load_config

ConfigT = TypeVar("ConfigT")


def job_parser(cls: type, doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser every job uses: ``--config``, ``key=value`` overrides, ``--version``, and a
    ``--help`` that lists every field of the job's config (dotted, with type, default and meaning)."""
    from whetstone import version
    from whetstone.config.base import describe_fields

    fields = "\n".join(describe_fields(cls))
    epilog = (f"{(doc or '').strip()}\n\nconfig fields (in the --config YAML, or as key=value overrides; dotted keys "
              f"reach into sections, e.g. optim.lr=1e-5):\n\n{fields}")
    parser = argparse.ArgumentParser(prog=prog or _main_module_prog(), description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--version", action="version", version=f"whetstone {version()}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 (fields below)")
    return parser


def _main_module_prog() -> str | None:
    """``python -m jobs.<job>`` when a job runs as ``-m`` (argparse would say ``<job>.py``); else None
    (argparse's default: the command's name, e.g. ``whetstone train-contrastive``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return f"python -m {name}" if name.startswith("jobs.") else None


def parse_job_args(cls: type[ConfigT], argv: Sequence[str] | None, doc: str | None) -> ConfigT:
    """``--config file.yaml key=value ...`` -> validated config; exits 2 naming the bad field
    (``--help`` and ``--version`` print and exit 0)."""
    args = job_parser(cls, doc).parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None




def quiet_ray_data() -> None:
    """Our own progress lines replace Ray Data's (which log every 10 s on a non-interactive stdout)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False




def init_ray(num_cpus: int, object_store_mb: int) -> None:
    """Join the cluster ``ray job submit`` runs us in, or start a local one sized for small hosts."""
    quiet_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` the job's runtime env applies; adding ours would conflict with it.
        ray.init(log_to_driver=True)
    else:
        # More logical CPUs than cores: Train workers, a Serve replica and Ray Data tasks each ask
        # for CPUs and would otherwise wait on each other.
        env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                            "TOKENIZERS_PARALLELISM": "false"},
               "worker_process_setup_hook": quiet_state_api_warnings}
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mb * 1024**2,
                 include_dashboard=False, runtime_env=env, log_to_driver=True)




def dashboard_url() -> str | None:
    """The Ray dashboard's URL (``http://host:8265``), or None without Ray or without a dashboard
    (the jobs' own local Ray starts none). ``ray.init`` on a connected driver returns the running
    session's context (Ray's supported way to read ``webui_url``) and starts nothing."""
    if not ray.is_initialized():
        return None
    worker_log = logging.getLogger("ray._private.worker")
    level = worker_log.level
    worker_log.setLevel(logging.WARNING)  # "Calling ray.init() again after it has already been called."
    try:
        context = ray.init(ignore_reinit_error=True)
    finally:
        worker_log.setLevel(level)
    url = os.environ.get("RAY_OVERRIDE_DASHBOARD_URL") or context.address_info.get("webui_url") or ""
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the local Ray, which runs without the dashboard (2 cores).

    Ray Train's placement-group cleaner asks the state API, served by the dashboard, every few
    seconds whether the train controller is alive, and without one logs "Failed to query Ray Train
    Controller actor state" each time (about 80 lines in one ``make demo``). Its only job is to
    remove placement groups after a controller crash, and a local Ray goes away with the job.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)




def train_run_config(name: str, storage_uri: str, storage: StorageConfig | None, log_level: str,
                     max_failures: int = 0) -> Any:
    """``RunConfig`` for both training jobs: checkpoints under ``storage_uri``, up to
    ``max_failures`` worker-group restarts (each from the newest checkpoint Ray Train registered,
    which it registers only once fully uploaded), Ray Train's console logging at ``log_level``,
    and workers' ``print`` left alone. Ray Train otherwise patches ``print`` into its logger, and
    every progress line reaches the console twice (once printed, once logged)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig

    root = store.resolve(storage_uri, storage)
    return RunConfig(name=name, storage_path=root.path, storage_filesystem=root.filesystem,
                     failure_config=FailureConfig(max_failures=max_failures),
                     logging_config=LoggingConfig(log_level=log_level),
                     # MLFLOW_*: rank 0 logs to the same MLflow server (credentials, file-store opt-in)
                     worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                      **{k: v for k, v in os.environ.items()
                                                         if k.startswith("MLFLOW_")}}})




class Timer:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str, since: float) -> float:
        self.marks[name] = round(time.monotonic() - since, 2)
        return self.marks[name]




def prepare_run_dir(config: Any) -> None:
    """Apply ``if_exists`` to the run folder: refuse (error), wipe (overwrite) or keep (resume).

    Raises:
        ConfigError: the run folder exists and ``if_exists=error``.
    """
    if store.exists(config.run_uri, config.storage):
        if config.if_exists == "error":
            raise ConfigError(f"run_name: {config.run_uri} exists; set if_exists=overwrite or resume")
        if config.if_exists == "overwrite":
            print(f"[run] removing previous outputs at {config.run_uri}", flush=True)
            store.delete_dir(config.run_uri, config.storage)


def worker_job_config(config: Any, cls: type) -> dict[str, Any]:
    """The job config as JSON-safe data for the workers: only ``cls``'s own fields (wrappers such
    as the quickstart add sections of their own), with the storage secrets filled in."""
    job = {k: v for k, v in config.model_dump(mode="json").items() if k in cls.model_fields}
    job["storage"] = config.storage.resolved().to_wire()  # workers need the real secrets
    return job


def ordered_data_config() -> Any:
    """Ray Train's ``DataConfig`` with ``preserve_order`` on for every training dataset.

    Ray Train copies the driver's global ``DataContext`` execution options onto each dataset it
    splits (``preserve_order`` off by default), overriding the dataset's own setting. Off, each
    worker's batches come out of Ray Data's format thread pool in whatever order the threads
    finish: two runs then see the same rows but neighbouring batches swapped, and a resumed run
    that skips the batches already trained on skips the wrong ones. On, a seeded run sees the
    same batches in the same order every time.
    """
    import copy

    from ray.data import DataContext
    from ray.train import DataConfig

    # A copy of the driver's options (what Ray Train would use) with the order kept; copied rather
    # than rebuilt, since passing the deprecated `exclude_resources` to ExecutionOptions warns.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)
