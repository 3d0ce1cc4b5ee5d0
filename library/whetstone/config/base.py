"""Configuration primitives: strict pydantic models, YAML loading and ``key=value`` overrides.

Every job has one top-level model built from the shared parts below. Configs cross process
boundaries (driver -> Ray Train workers -> Serve replicas) as JSON-safe dicts, so each model must
round-trip through ``model_dump(mode="json")`` and ``model_validate``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)
# Console level of Ray Train's own logs (ray.train.LoggingConfig). At INFO every worker prints each
# step's whole metrics dict ("Reporting training result ..."), twice what the job's own step lines
# say; Ray's log files on disk keep every level either way.
RayTrainLogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
# Worker-group restarts a training run makes by itself (ray.train.FailureConfig.max_failures):
# a killed or crashed worker restarts the group from the newest registered checkpoint.
MAX_FAILURES = 3
KEEP_VERSIONS_HELP = ("index versions kept on storage after each publish: the newest N, plus any that LATEST, "
                      "STAGED, a blue/green slot or a pin (whetstone.index.retention) names; older ones are "
                      "removed (None: keep every version)")
MAX_FAILURES_HELP = ("times the training workers are restarted after a worker dies or raises, each time "
                     "from the newest complete checkpoint (-1: no limit, 0: the first failure ends the run)")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field at fault."""


class StrictModel(BaseModel):
    """Base for every config model: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(StrictModel):
    """How to reach object storage.

    A local path (the embedded default) needs none of this. For ``s3://`` URIs the endpoint,
    region and credentials come from here or, when left empty, from the usual AWS environment
    variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...). Secrets are
    ``SecretStr`` so they never appear in logs or ``repr``.
    """

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:5000")
    region: str | None = Field(
        None, description="S3 region, e.g. us-east-1; None: AWS_REGION or AWS_DEFAULT_REGION")
    access_key_id: SecretStr | None = Field(None, description="S3 access key id; None: AWS_ACCESS_KEY_ID")
    secret_access_key: SecretStr | None = Field(
        None, description="S3 secret access key; None: AWS_SECRET_ACCESS_KEY")
    session_token: SecretStr | None = Field(
        None, description="temporary credentials' session token; None: AWS_SESSION_TOKEN")
    anonymous: bool = Field(
        False, description="unsigned S3 requests (public buckets); refused with access keys, given here or "
        "in the environment")
    retries: int = Field(20, ge=0, le=100, description="retries of one operation after transient errors")
    retry_backoff_s: float = Field(0.2, gt=0, description="first backoff; doubles each retry, up to 5 s")
    retry_budget_s: float = Field(120.0, gt=0, description="how long one operation keeps retrying transient "
                                                           "errors (e.g. a stalled server) before it fails")

    def resolved(self) -> StorageConfig:
        """Fill empty fields from the environment (so workers on other nodes see the same values)."""
        env = os.environ
        updates: dict[str, Any] = {}
        if self.endpoint_url is None and env.get("AWS_ENDPOINT_URL"):
            updates["endpoint_url"] = env["AWS_ENDPOINT_URL"]
        if self.region is None and (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
            updates["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        for field, var in (
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
        ):
            if getattr(self, field) is None and env.get(var):
                updates[field] = SecretStr(env[var])
        return self.model_copy(update=updates)

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe dict including secret values, for handing to Ray workers (never log it)."""
        data = self.model_dump(mode="python")
        return {k: (v.get_secret_value() if isinstance(v, SecretStr) else v) for k, v in data.items()}


class TrackingConfig(StrictModel):
    """Where a training run's per-step metrics go besides the console and the history JSON."""

    tensorboard: bool = Field(
        True, description="write per-step metrics (and the eval figures) as TensorBoard event files under "
        "<run>/tensorboard/ (tensorboard --logdir <run>/tensorboard); an s3:// run writes them locally and "
        "uploads them with each checkpoint and at the end")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, file:///path/mlruns, databricks): the run's "
        "params (the flattened config), per-step metrics and report figures are logged there; None: the "
        "MLFLOW_TRACKING_URI environment variable when set; empty string: off. Needs the `tracking` extra "
        "(pip install \"whetstone[tracking]\")")
    mlflow_experiment: str = Field("whetstone", min_length=1, description="MLflow experiment the run goes into")
    flush_every_s: float = Field(
        10.0, gt=0, description="how often rank 0 flushes the event files and sends buffered metrics to MLflow")


def renamed_field(data: Any, old: str, new: str, where: str = "") -> Any:
    """``data`` with the field ``old`` moved to ``new`` (a pydantic ``mode="before"`` validator's
    input): old configs keep working; giving both names with different values is refused."""
    if not isinstance(data, dict) or old not in data:
        return data
    data = dict(data)
    value = data.pop(old)
    if new in data and data[new] != value:
        raise ValueError(f"{where}{old}={value} and {where}{new}={data[new]}: give one ({old} is the old name of "
                         f"{new})")
    data[new] = value
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value.

    >>> parse_override("train.lr=2e-5")
    (['train', 'lr'], 2e-05)
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 2e-5 as a string (YAML 1.1 wants a dot); numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a nested dict (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid {cls.__name__} config from {source}:"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def validate_config(cls: type[ModelT], data: dict[str, Any], source: str = "<dict>") -> ModelT:
    """Validate ``data`` as ``cls``; raise ``ConfigError`` naming each bad field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(cls, err, source)) from None


def load_config(
    cls: type[ModelT], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ModelT:
    """Load ``cls`` from a YAML file (optional) plus ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or not a mapping, or a field is invalid (named).
    """
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        data = loaded
        source = str(path)
    apply_overrides(data, overrides)
    return validate_config(cls, data, source)


def dump_config(config: BaseModel) -> str:
    """The resolved config as indented JSON with secrets masked, for logs and reports."""
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)


def _type_name(annotation: Any) -> str:
    """A field's type as ``--help`` shows it: ``int``, ``float | null``, ``{error,overwrite,resume}``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "{" + ",".join(str(arg) for arg in args) + "}"
    if origin in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (a section, an optional section, or a list of them) and its key suffix."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if get_origin(annotation) is list and len(args) == 1:
        model, _ = _section_model(args[0])
        return model, "[]" if model else ""
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return _section_model(args[0])
    return None, ""


def iter_fields(cls: type[BaseModel], prefix: str = ""):
    """``(dotted key, field info)`` of every leaf field of a config, sections walked as ``--help`` does."""
    for name, info in cls.model_fields.items():
        model, suffix = _section_model(info.annotation)
        if model is None:
            yield f"{prefix}{name}", info
        else:
            yield from iter_fields(model, f"{prefix}{name}{suffix}.")


def _field_lines(key: str, info: Any) -> list[str]:
    import textwrap

    if info.is_required():
        default = "required"
    else:
        value = info.get_default(call_default_factory=True)
        value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        default = "= " + json.dumps(value, default=str)
    lines = [f"  {key}  {_type_name(info.annotation)} {default}"]
    if info.description:
        lines.append(textwrap.fill(info.description, width=104, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return lines


def describe_fields(cls: type[BaseModel], prefix: str = "", title: str = "top level") -> list[str]:
    """Every field of a job config, dotted (``optim.batch_size``), with its type, default and
    description, grouped by section: the config part of ``python -m jobs.<job> --help``."""
    doc = (cls.__doc__ or "").strip().splitlines()
    lines = [f"{title}:" + (f"  ({doc[0]})" if prefix and doc and cls.__module__.startswith("whetstone") else "")]
    sections = []
    for name, info in cls.model_fields.items():
        model, suffix = _section_model(info.annotation)
        if model is None:
            lines += _field_lines(f"{prefix}{name}", info)
        else:
            sections.append((f"{prefix}{name}{suffix}", model, info))
    for key, model, info in sections:
        optional = "" if info.is_required() or info.get_default(call_default_factory=True) is not None else \
            " (optional section, default null)"
        lines += [""] + describe_fields(model, f"{key}.", f"{key}{optional}")
    return lines
