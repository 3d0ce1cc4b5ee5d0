"""Versioned index snapshots in object storage: files, manifest with checksums, LATEST pointer.

Layout under an index root (a local folder or ``s3://``)::

    index_root/v{n}/<files>          e.g. index.faiss and ids.json (written first)
    index_root/v{n}/manifest.json    version, checkpoint, dim, kind, count, built_at, sha256 per file
    index_root/LATEST                the published version number (written last)

A manifest implies complete files, and ``LATEST`` names only complete snapshots, so a reader that
follows ``LATEST`` never sees a half-written version. This module moves bytes; it knows nothing
about FAISS (``whetstone.index.ann`` serialises the index).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from whetstone import storage as store
from whetstone.config.base import StorageConfig

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
SNAPSHOT_FORMAT = 1


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt or already exists; the message names the URI."""


class SnapshotNotFound(SnapshotError):
    """Nothing is published (no LATEST), or the version asked for has no manifest."""


class SnapshotConflict(SnapshotError):
    """The version already exists: another writer published it first (snapshots are immutable)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_snapshot(
    index_root_uri: str,
    version: int,
    files: dict[str, bytes],
    fields: dict[str, Any],
    storage: StorageConfig | None = None,
    *,
    overwrite: bool = False,
    set_latest: bool = True,
) -> str:
    """Write ``files`` and a manifest (``fields`` + checksums) as ``v{version}``; then LATEST.

    Raises:
        SnapshotConflict: the version already has a manifest and ``overwrite`` is False.
    """
    snapshot_uri = snapshot_path(index_root_uri, version)
    manifest_uri = store.join(snapshot_uri, MANIFEST_FILE)
    if not overwrite and store.exists(manifest_uri, storage):
        raise SnapshotConflict(f"snapshot {snapshot_uri} already exists (snapshots are immutable)")
    digests = {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()}
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "version": version,
        **fields,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": digests,
        "sha256": _sha256("".join(digests[name]["sha256"] for name in sorted(digests)).encode()),
    }
    for name, data in files.items():
        store.write_bytes(store.join(snapshot_uri, name), data, storage)
    # The manifest goes after the data (a manifest implies complete files) and LATEST last.
    store.write_bytes(manifest_uri, json.dumps(manifest, indent=2).encode(), storage)
    if set_latest:
        set_latest_version(index_root_uri, version, storage)
    return snapshot_uri


def read_snapshot(
    index_root_uri: str, version: int | None = None, storage: StorageConfig | None = None
) -> tuple[int, dict, dict[str, bytes]]:
    """Read snapshot ``version`` (None = LATEST) and verify every file against its manifest.

    Returns:
        ``(version, manifest, {file name: bytes})``.

    Raises:
        SnapshotNotFound: nothing published, or no snapshot of the version.
        SnapshotError: a missing file or a checksum mismatch.
    """
    if version is None:
        version = latest_version(index_root_uri, storage)
        if version is None:
            raise SnapshotNotFound(f"no published index under {index_root_uri} ({LATEST_FILE} is missing)")
    manifest = read_manifest(index_root_uri, version, storage)
    payloads = {}
    for name, meta in manifest["files"].items():
        uri = store.join(snapshot_path(index_root_uri, version), name)
        data = _read_optional(uri, storage)
        if data is None:
            raise SnapshotError(f"snapshot file {uri} is missing")
        if _sha256(data) != meta["sha256"]:
            raise SnapshotError(f"checksum mismatch for {uri}: the file does not match its manifest")
        payloads[name] = data
    return version, manifest, payloads


def set_latest_version(index_root_uri: str, version: int, storage: StorageConfig | None = None) -> None:
    """Point ``LATEST`` at ``version`` (an atomic rename locally, one PUT on S3)."""
    store.write_bytes(store.join(index_root_uri, LATEST_FILE), f"{version}\n".encode(), storage)


def _read_optional(uri: str, storage: StorageConfig | None) -> bytes | None:
    """The bytes at ``uri``, or None when it does not exist (local or S3 wording)."""
    try:
        return store.read_bytes(uri, storage)
    except FileNotFoundError:
        return None
    except store.StorageError as err:
        text = str(err).lower()
        if "not found" in text or "does not exist" in text or "nosuchkey" in text:
            return None
        raise


def snapshot_path(index_root_uri: str, version: int) -> str:
    """``index_root/v{version}``."""
    return store.join(index_root_uri, f"v{version}")


def read_manifest(index_root_uri: str, version: int, storage: StorageConfig | None = None) -> dict:
    """The manifest of snapshot ``version``; ``SnapshotNotFound`` naming the URI when it is missing."""
    uri = store.join(snapshot_path(index_root_uri, version), MANIFEST_FILE)
    data = _read_optional(uri, storage)
    if data is None:
        available = list_versions(index_root_uri, storage)
        raise SnapshotNotFound(f"no snapshot v{version} under {index_root_uri} ({uri} is missing; "
                               f"available versions: {available})")
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as err:
        raise SnapshotError(f"{uri} is not valid JSON: {err}") from None
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{uri}: unsupported snapshot format {manifest.get('format')!r}")
    return manifest


def latest_version(index_root_uri: str, storage: StorageConfig | None = None) -> int | None:
    """The version ``index_root/LATEST`` names, or None when nothing is published yet."""
    uri = store.join(index_root_uri, LATEST_FILE)
    data = _read_optional(uri, storage)
    if data is None:
        return None
    text = data.decode(errors="replace").strip()
    if not text.isdigit():
        raise SnapshotError(f"{uri} holds {text!r}, not a version number")
    return int(text)


def list_versions(index_root_uri: str, storage: StorageConfig | None = None) -> list[int]:
    """Versions under the root that have a manifest (complete snapshots), ascending."""
    versions = []
    for entry in store.list_dir(index_root_uri, storage):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("v") and name[1:].isdigit() and \
                store.exists(store.join(entry, MANIFEST_FILE), storage):
            versions.append(int(name[1:]))
    return sorted(versions)
