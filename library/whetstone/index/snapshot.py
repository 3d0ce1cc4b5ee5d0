"""Versioned, sharded index snapshots in object storage (format 2): manifest, chunks, pointers.

Layout under an index root (a local folder or ``s3://``)::

    index_root/v{n}/shard-{s:04d}/index.faiss.{c:05d}   FAISS bytes of shard s, chunk c
    index_root/v{n}/shard-{s:04d}/ids.{c:05d}           the shard's IdMap bytes, chunked the same way
    index_root/v{n}/manifest.json                        written after every shard file
    index_root/LATEST                                    the version searches are served at (last)
    index_root/STAGED                                    phase 1 of a two-phase swap (see set_staged_version)
    index_root/SLOT-0, SLOT-1                            blue/green services: each replica set's version

Every file is cut into chunks of at most ``chunk_bytes`` (64 MiB by default), each its own
object with its own sha256 in the manifest, so a writer uploads and a reader downloads and
verifies one chunk at a time and never holds a whole serialised shard. A shard entry's
``prefix`` is relative to the root: a new version may point at an older version's shard files
(a mutation that touches 1 of 4 shards writes only that shard).

A manifest implies complete files and ``LATEST`` names only complete snapshots, so a reader that
follows ``LATEST`` never sees a half-written version. Documents go to shard
``crc32(utf-8 id) % S`` (:func:`shard_of`). This module moves bytes; FAISS lives in
``whetstone.index.shard_files``. Format 1 (one ``index.faiss`` + ``ids.json``) is not read.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from whetstone import storage as store
from whetstone.config.base import StorageConfig

MANIFEST_FILE = "manifest.json"
LATEST_FILE = "LATEST"
STAGED_FILE = "STAGED"
SLOT_FILE_PREFIX = "SLOT-"  # SLOT-0, SLOT-1: what each replica set of a blue/green service holds
SNAPSHOT_FORMAT = 2
INDEX_FILE = "index.faiss"
IDS_FILE = "ids"
DEFAULT_CHUNK_BYTES = 64 * 2**20


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt or already exists; the message names the URI."""


class SnapshotNotFound(SnapshotError):
    """Nothing is published (no LATEST), or the version asked for has no manifest."""


class SnapshotConflict(SnapshotError):
    """The version already exists: another writer published it first (snapshots are immutable)."""


def sha256_hex(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunkDigest(_Model):
    """One stored chunk of a file: its object name (beside the others), size and sha256."""

    name: str
    bytes: int = Field(ge=0)
    sha256: str


class FileDigest(_Model):
    """A file stored as chunks, in order; ``bytes`` is their total."""

    bytes: int = Field(ge=0)
    chunks: list[ChunkDigest]


class ShardEntry(_Model):
    """One shard of a snapshot: live documents, where its files are, their chunk digests.

    ``prefix`` is relative to the index root (``v3/shard-0001``): a later version may reuse it.
    """

    shard: int = Field(ge=0)
    count: int = Field(ge=0)
    prefix: str
    files: dict[str, FileDigest]
    build_s: dict[str, float] = Field(default_factory=dict,
                                      description="how long building these files took: train_s, add_s, save_s")

    def digests(self) -> list[str]:
        """Every chunk's sha256, files by name, chunks in order."""
        return [chunk.sha256 for name in sorted(self.files) for chunk in self.files[name].chunks]

    @property
    def fingerprint(self) -> str:
        """sha256 over the chunk digests: equal fingerprints mean byte-identical shard files
        (a replica may keep the shard it holds when the next version reuses it)."""
        return sha256_hex("".join(self.digests()).encode())


class SnapshotManifest(_Model):
    """``v{n}/manifest.json``: what was built, from which checkpoint, and every shard's chunks."""

    format: Literal[2] = SNAPSHOT_FORMAT
    version: int = Field(ge=0)
    checkpoint: str
    dim: int = Field(ge=1)
    kind: str
    count: int = Field(ge=0)
    built_at: str
    saved_at: str
    config: dict[str, Any]
    extra: dict[str, Any] = Field(default_factory=dict)
    num_shards: int = Field(ge=1)
    assignment: Literal["crc32"] = "crc32"
    shards: list[ShardEntry]
    sha256: str

    def __getitem__(self, key: str) -> Any:
        """``manifest["checkpoint"]`` as with the format-1 dict (older callers index it)."""
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def manifest_digest(entries: Sequence[ShardEntry]) -> str:
    """sha256 over every chunk sha256 of every shard, in shard order."""
    return sha256_hex("".join(d for entry in entries for d in entry.digests()).encode())


def shard_of(ids: Sequence[str], num_shards: int) -> np.ndarray:
    """The shard of each id: ``zlib.crc32(utf-8 bytes) % num_shards`` (int64), stable everywhere.

    About 0.3 s per million ids. CRC-32 spreads ids evenly; it is not a secret hash.
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards: must be a positive integer, got {num_shards!r}")
    crc = zlib.crc32
    codes = np.fromiter((crc(doc_id.encode("utf-8")) for doc_id in ids), dtype=np.int64, count=len(ids))
    return codes % num_shards


def snapshot_path(index_root_uri: str, version: int) -> str:
    """``index_root/v{version}``."""
    return store.join(index_root_uri, f"v{version}")


def shard_prefix(version: int, shard: int) -> str:
    """``v{version}/shard-{shard:04d}`` (relative to the index root, as manifests store it)."""
    return f"v{version}/shard-{shard:04d}"


def check_version(version: Any) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version: must be a non-negative integer, got {version!r}")
    return version


def read_optional(uri: str, storage: StorageConfig | None) -> bytes | None:
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


def manifest_exists(index_root_uri: str, version: int, storage: StorageConfig | None = None) -> bool:
    return store.exists(store.join(snapshot_path(index_root_uri, version), MANIFEST_FILE), storage)


def read_manifest(index_root_uri: str, version: int, storage: StorageConfig | None = None) -> SnapshotManifest:
    """The manifest of snapshot ``version``, checked (shards 0..S-1, counts, digest).

    Raises:
        SnapshotNotFound: no manifest (the URI and the available versions are named).
        SnapshotError: not JSON, format 1, or inconsistent (URI and field named).
    """
    uri = store.join(snapshot_path(index_root_uri, version), MANIFEST_FILE)
    data = read_optional(uri, storage)
    if data is None:
        available = list_versions(index_root_uri, storage)
        raise SnapshotNotFound(f"no snapshot v{version} under {index_root_uri} ({uri} is missing; "
                               f"available versions: {available})")
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as err:
        raise SnapshotError(f"{uri} is not valid JSON: {err}") from None
    if raw.get("format") == 1:
        raise SnapshotError(f"{uri}: snapshot format 1 (one index.faiss + ids.json) is no longer read: "
                            f"format 1: rebuild the index")
    if raw.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{uri}: unsupported snapshot format {raw.get('format')!r}")
    try:
        manifest = SnapshotManifest.model_validate(raw)
    except ValueError as err:
        raise SnapshotError(f"{uri}: invalid manifest: {err}") from None
    _check_entries(manifest.shards, manifest.num_shards, uri)
    if manifest.count != sum(entry.count for entry in manifest.shards):
        raise SnapshotError(f"{uri}: count {manifest.count} != the sum of the shard counts")
    if manifest.sha256 != manifest_digest(manifest.shards):
        raise SnapshotError(f"{uri}: sha256 does not match the chunk digests it lists")
    return manifest


def _check_entries(entries: Sequence[ShardEntry], num_shards: int, where: str) -> None:
    numbers = [entry.shard for entry in entries]
    if numbers != list(range(num_shards)):
        raise SnapshotError(f"{where}: shards must be 0..{num_shards - 1} in order, got {numbers}")


def publish_manifest(
    index_root_uri: str,
    version: int,
    entries: list[ShardEntry],
    *,
    checkpoint: str,
    dim: int,
    kind: str,
    config: dict,
    built_at: str | None = None,
    extra: dict | None = None,
    storage: StorageConfig | None = None,
    overwrite: bool = False,
    set_latest: bool = True,
) -> SnapshotManifest:
    """Write ``v{version}/manifest.json`` over shard files already written; then (``set_latest``) LATEST.

    ``entries`` must be shards 0..S-1 in order (S = len(entries)); an entry may point at an
    older version's files (its ``prefix``).

    Raises:
        SnapshotConflict: the version already has a manifest and not ``overwrite``.
        SnapshotError: the entries do not number 0..S-1.
    """
    version = check_version(version)
    uri = store.join(snapshot_path(index_root_uri, version), MANIFEST_FILE)
    entries = sorted(entries, key=lambda entry: entry.shard)
    _check_entries(entries, len(entries), uri)
    if not overwrite and store.exists(uri, storage):
        raise SnapshotConflict(f"snapshot {snapshot_path(index_root_uri, version)} already exists "
                               f"(snapshots are immutable)")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = SnapshotManifest(
        version=version, checkpoint=checkpoint, dim=dim, kind=kind,
        count=sum(entry.count for entry in entries), built_at=built_at or now, saved_at=now,
        config=config, extra=extra or {}, num_shards=len(entries), shards=entries,
        sha256=manifest_digest(entries))
    store.write_bytes(uri, manifest.model_dump_json(indent=2).encode(), storage)
    if set_latest:
        set_latest_version(index_root_uri, version, storage)
    return manifest


def _read_pointer(index_root_uri: str, name: str, storage: StorageConfig | None) -> int | None:
    uri = store.join(index_root_uri, name)
    data = read_optional(uri, storage)
    if data is None:
        return None
    text = data.decode(errors="replace").strip()
    if not text.isdigit():
        raise SnapshotError(f"{uri} holds {text!r}, not a version number")
    return int(text)


def latest_version(index_root_uri: str, storage: StorageConfig | None = None) -> int | None:
    """The version ``index_root/LATEST`` names, or None when nothing is published yet."""
    return _read_pointer(index_root_uri, LATEST_FILE, storage)


def set_latest_version(index_root_uri: str, version: int, storage: StorageConfig | None = None) -> None:
    """Point ``LATEST`` at ``version`` (an atomic rename locally, one PUT on S3)."""
    store.write_bytes(store.join(index_root_uri, LATEST_FILE), f"{check_version(version)}\n".encode(), storage)


def staged_version(index_root_uri: str, storage: StorageConfig | None = None) -> int | None:
    """The version ``index_root/STAGED`` names (shards must load it beside LATEST), or None."""
    return _read_pointer(index_root_uri, STAGED_FILE, storage)


def set_staged_version(index_root_uri: str, version: int | None, storage: StorageConfig | None = None) -> None:
    """Write ``STAGED`` (phase 1 of a swap); ``None`` removes it (the swap finished or gave up)."""
    _write_pointer(index_root_uri, STAGED_FILE, version, storage)


def slot_version(index_root_uri: str, slot: int, storage: StorageConfig | None = None) -> int | None:
    """The version replica set ``slot`` of a blue/green index service holds (``SLOT-{slot}``), or None."""
    return _read_pointer(index_root_uri, f"{SLOT_FILE_PREFIX}{int(slot)}", storage)


def set_slot_version(index_root_uri: str, slot: int, version: int | None,
                     storage: StorageConfig | None = None) -> None:
    """Name the version replica set ``slot`` must hold; ``None``: hold nothing (an idle set)."""
    _write_pointer(index_root_uri, f"{SLOT_FILE_PREFIX}{int(slot)}", version, storage)


def _write_pointer(index_root_uri: str, name: str, version: int | None, storage: StorageConfig | None) -> None:
    uri = store.join(index_root_uri, name)
    if version is not None:
        store.write_bytes(uri, f"{check_version(version)}\n".encode(), storage)
        return
    store.delete_file(uri, storage)


def list_versions(index_root_uri: str, storage: StorageConfig | None = None) -> list[int]:
    """Versions under the root that have a manifest (complete snapshots), ascending."""
    versions = []
    for entry in store.list_dir(index_root_uri, storage):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("v") and name[1:].isdigit() and \
                store.exists(store.join(entry, MANIFEST_FILE), storage):
            versions.append(int(name[1:]))
    return sorted(versions)
