"""One way to resolve a URI to a filesystem: a local path (the embedded default) or ``s3://``.

Everything that touches object storage (ingest, Ray Data reads, checkpoints, index snapshots)
goes through :func:`resolve`, so the same code runs on a laptop folder and on S3. S3 uses
pyarrow's native S3 filesystem (which Ray Data reads without an fsspec shim) with the endpoint,
region and credentials from :class:`~whetstone.config.StorageConfig`; transient errors are
retried with exponential backoff, permanent ones raise ``StorageError`` naming the URI.

One retry layer: pyarrow's own S3 retries are off (they nested inside ours: 5 x 5 attempts, yet
only about 18 s of a stall covered), and every operation retries until
``StorageConfig.retry_budget_s`` is spent, so a stall shorter than the budget is ridden out and a
longer one fails with a message naming the object and the budget. Streamed reads
(:func:`read_chunks`) resume at the byte they stopped at.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

from whetstone.config.base import StorageConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed permanently; the message names the URI."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path inside it (no scheme)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (works for local paths and ``s3://``)."""
    out = uri.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def absolute_local(uri: str | None, must_exist: bool = False) -> str | None:
    """A local path made absolute (workers run in other directories); URIs and None pass through.

    With ``must_exist`` a path that does not exist is returned unchanged (e.g. a model alias).
    """
    if uri is None or "://" in uri:
        return uri
    path = Path(uri).expanduser()
    return str(path.resolve()) if (path.exists() or not must_exist) else uri


def _s3_filesystem(config: StorageConfig) -> pafs.S3FileSystem:
    cfg = config.resolved()
    kwargs: dict = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),  # with_retries is the one layer
    }
    if cfg.anonymous:
        kwargs["anonymous"] = True
    if cfg.access_key_id is not None:
        kwargs["access_key"] = cfg.access_key_id.get_secret_value()
    if cfg.secret_access_key is not None:
        kwargs["secret_key"] = cfg.secret_access_key.get_secret_value()
    if cfg.session_token is not None:
        kwargs["session_token"] = cfg.session_token.get_secret_value()
    if cfg.region:
        kwargs["region"] = cfg.region
    if cfg.endpoint_url:
        endpoint = cfg.endpoint_url
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
            endpoint = endpoint[len("http://") :]
        elif endpoint.startswith("https://"):
            endpoint = endpoint[len("https://") :]
        kwargs["endpoint_override"] = endpoint
        # Path-style addressing: loopback and most S3-compatible servers have no per-bucket DNS.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Resolve ``uri`` (local path, ``file://`` or ``s3://``) to a filesystem and path."""
    storage = storage or StorageConfig()
    if is_s3(uri):
        return Location(uri, _s3_filesystem(storage), uri[len("s3://") :].rstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise StorageError(f"unsupported storage scheme in {uri!r} (use a local path or s3://)")
    return Location(uri, pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve()))


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(err).lower()
    permanent = ("access denied", "nosuchbucket", "invalidaccesskeyid", "signaturedoesnotmatch",
                 "forbidden", "not found", "does not exist")
    return not any(word in text for word in permanent)


class _Backoff:
    """Attempts of one operation: exponential backoff (capped at ``MAX_BACKOFF_S``) while the error
    is transient, the attempts last and the time budget holds."""

    MAX_BACKOFF_S = 5.0

    def __init__(self, uri: str, storage: StorageConfig | None, what: str) -> None:
        self.config = storage or StorageConfig()
        self.uri, self.what = uri, what or "storage operation"
        self.started = time.monotonic()
        self.delay = self.config.retry_backoff_s
        self.attempt = 0

    def failed(self, err: OSError, where: str = "") -> None:
        """Sleep before the next attempt, or raise ``StorageError`` (permanent error, spent budget)."""
        self.attempt += 1
        elapsed = time.monotonic() - self.started
        if not _is_transient(err):
            raise StorageError(f"{self.what} failed for {self.uri}{where}: {err}") from err
        if self.attempt > self.config.retries or elapsed + self.delay > self.config.retry_budget_s:
            raise StorageError(
                f"{self.what} failed for {self.uri}{where} after {self.attempt} attempts over {elapsed:.1f} s "
                f"(storage.retries={self.config.retries}, storage.retry_budget_s={self.config.retry_budget_s}): "
                f"{err}") from err
        logger.warning("transient storage error on %s%s (attempt %d, %.1f s of %.0f s): %s", self.uri, where,
                       self.attempt, elapsed, self.config.retry_budget_s, err)
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.MAX_BACKOFF_S)


def is_network_error(err: BaseException) -> bool:
    """A failed or stalled connection (as opposed to bad data or a refusal)."""
    text = str(err)
    return any(mark in text for mark in ("NETWORK_CONNECTION", "curlCode", "Connection reset", "Connection refused",
                                         "timed out", "Timeout was reached"))


def with_retries(uri: str, op: Callable[[], T], storage: StorageConfig | None = None, what: str = "",
                 only: Callable[[BaseException], bool] | None = None) -> T:
    """Run ``op`` retrying transient errors with exponential backoff; raise ``StorageError``.
    ``only``: retry just the errors it accepts and re-raise any other unchanged (a reader that
    tells damaged data from a failed connection)."""
    backoff = _Backoff(uri, storage, what)
    while True:
        try:
            return op()
        except FileNotFoundError:
            raise
        except OSError as err:
            if only is not None and not only(err):
                raise
            backoff.failed(err)


def read_chunks(uri: str, storage: StorageConfig | None = None, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The object's raw bytes in chunks. A transient error mid-read (a stalled or dropped
    connection) reopens the object at the byte it stopped at, within the same retry budget.

    Raises:
        FileNotFoundError: the object does not exist.
        StorageError: a permanent error, or the budget was spent (the message names the offset).
    """
    loc = resolve(uri, storage)
    backoff = _Backoff(uri, storage, "read")
    offset, stream = 0, None
    while True:
        try:
            if stream is None:  # random access: a retry resumes where the last attempt stopped
                stream = loc.filesystem.open_input_file(loc.path)
                if offset:
                    stream.seek(offset)
            chunk = stream.read(chunk_bytes)
        except FileNotFoundError:
            raise
        except OSError as err:
            if stream is not None:
                stream.close()
            stream = None
            backoff.failed(err, f" at byte {offset}")
            continue
        if not chunk:
            stream.close()
            return
        offset += len(chunk)
        yield chunk


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    loc = resolve(uri, storage)

    def op() -> bytes:
        # compression=None: bytes in, bytes out. pyarrow otherwise (de)compresses by extension,
        # which double-gzipped ``.gz`` objects written to S3 (a local write goes via a temp name).
        with loc.filesystem.open_input_stream(loc.path, compression=None) as stream:
            return stream.read()

    return with_retries(uri, op, storage, "read")


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` to ``uri``; local writes go through a temp file and an atomic rename."""
    loc = resolve(uri, storage)
    parent = loc.path.rsplit("/", 1)[0]

    def op() -> None:
        loc.filesystem.create_dir(parent, recursive=True)
        if loc.is_local:
            tmp = f"{loc.path}.tmp-{time.monotonic_ns()}"
            with loc.filesystem.open_output_stream(tmp, compression=None) as stream:
                stream.write(data)
            loc.filesystem.move(tmp, loc.path)
        else:  # an S3 PUT is atomic: readers see the old object or the new one
            with loc.filesystem.open_output_stream(loc.path, compression=None) as stream:
                stream.write(data)

    with_retries(uri, op, storage, "write")


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    loc = resolve(uri, storage)
    info = with_retries(uri, lambda: loc.filesystem.get_file_info(loc.path), storage, "stat")
    return info.type != pafs.FileType.NotFound


def list_dir(uri: str, storage: StorageConfig | None = None, recursive: bool = False) -> list[str]:
    """URIs of the entries under ``uri`` (sorted); empty when it does not exist."""
    loc = resolve(uri, storage)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=recursive)
    infos = with_retries(uri, lambda: loc.filesystem.get_file_info(selector), storage, "list")
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in infos)


def delete_file(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove one file (nothing to do when it is already gone)."""
    loc = resolve(uri, storage)

    def delete() -> None:
        try:
            loc.filesystem.delete_file(loc.path)
        except FileNotFoundError:
            pass

    with_retries(uri, delete, storage, "delete")


def delete_path(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove whatever is at ``uri``: a folder with everything under it, or one file."""
    delete_dir(uri, storage)
    delete_file(uri, storage)


def delete_dir(uri: str, storage: StorageConfig | None = None) -> None:
    loc = resolve(uri, storage)
    info = loc.filesystem.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        with_retries(uri, lambda: loc.filesystem.delete_dir(loc.path), storage, "delete")


def upload_dir(local_dir: str | Path, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local directory tree to ``uri`` (a checkpoint or a model folder)."""
    local_dir = Path(local_dir)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            write_bytes(join(uri, str(path.relative_to(local_dir))), path.read_bytes(), storage)


def download_dir(uri: str, local_dir: str | Path, storage: StorageConfig | None = None) -> Path:
    """Copy the tree under ``uri`` into ``local_dir`` and return it."""
    local_dir = Path(local_dir)
    loc = resolve(uri, storage)
    selector = pafs.FileSelector(loc.path, allow_not_found=False, recursive=True)
    try:
        infos = with_retries(uri, lambda: loc.filesystem.get_file_info(selector), storage, "list")
    except FileNotFoundError:
        raise StorageError(f"nothing to download at {uri}") from None
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(loc.path) :].lstrip("/")
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(uri, rel), storage))
    return local_dir


def file_sizes(uri: str, storage: StorageConfig | None = None) -> dict[str, int]:
    """Relative path -> size in bytes of every file under ``uri`` (empty when nothing is there)."""
    loc = resolve(uri, storage)
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=True)
    infos = with_retries(uri, lambda: loc.filesystem.get_file_info(selector), storage, "list")
    return {info.path[len(loc.path):].lstrip("/"): info.size for info in infos if info.type == pafs.FileType.File}
