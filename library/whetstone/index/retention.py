"""Which index versions stay on storage, and removing the rest.

Every refresh and every mutation publishes a version; without a policy they pile up (85 versions,
267 MB for 2,101 documents after a 60 s mutation test). :func:`retain_versions` keeps

* the newest ``keep`` versions,
* every version a pointer names (``LATEST``, ``STAGED``, a blue/green ``SLOT-n``),
* every version pinned under ``PINS/`` (:func:`pin_version`: a job reading an older version),

and removes the others, each in an order that never leaves a kept version broken: first the
version's ``manifest.json`` (from then on it is not a version: ``list_versions`` and the
replicas no longer see it), then its shard folders, except those a kept version's manifest still
names (a mutation's manifest reuses the shard folders it did not touch).

Vector chunks (``vectors/v{n}``, what a refresh embedded) follow the same rule, plus two: the
newest vector folder with a manifest is kept (the next partial refresh layers on it), and so is
any folder newer than every published version (a refresh writing it now). A folder whose chunks a
kept manifest reuses (a partial refresh's layered manifest) stays.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from whetstone import storage as store
from whetstone.config.base import StorageConfig
from whetstone.index.snapshot import (
    LATEST_FILE,
    MANIFEST_FILE,
    SLOT_FILE_PREFIX,
    STAGED_FILE,
    SnapshotError,
    list_versions,
    read_manifest,
    read_optional,
    snapshot_path,
)

PINS_DIR = "PINS"
VECTORS_DIR = "vectors"


@dataclass
class RetentionReport:
    kept: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    removed_vectors: list[int] = field(default_factory=list)
    freed_bytes: int = 0

    def line(self) -> str:
        return (f"kept versions {self.kept}; removed {len(self.removed)} snapshot(s) {self.removed} and "
                f"{len(self.removed_vectors)} vector folder(s), {self.freed_bytes / 2**20:.1f} MiB")


def pin_version(index_root_uri: str, holder: str, version: int, storage: StorageConfig | None = None) -> None:
    """Keep ``version`` on storage while ``holder`` (a name, e.g. a job's run name) reads it."""
    store.write_bytes(store.join(index_root_uri, PINS_DIR, f"{holder}.json"),
                      json.dumps({"version": int(version), "since": time.time()}).encode(), storage)


def unpin_version(index_root_uri: str, holder: str, storage: StorageConfig | None = None) -> None:
    store.delete_file(store.join(index_root_uri, PINS_DIR, f"{holder}.json"), storage)


def pinned_versions(index_root_uri: str, storage: StorageConfig | None = None) -> dict[str, int]:
    """Holder -> pinned version, for every pin under ``PINS/``."""
    pins = {}
    for uri in store.list_dir(store.join(index_root_uri, PINS_DIR), storage):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json"):
            data = read_optional(uri, storage)
            if data is not None:
                pins[name.removesuffix(".json")] = int(json.loads(data)["version"])
    return pins


def _pointed(index_root_uri: str, storage: StorageConfig | None) -> set[int]:
    names = [LATEST_FILE, STAGED_FILE] + [
        uri.rstrip("/").rsplit("/", 1)[-1] for uri in store.list_dir(index_root_uri, storage)
        if uri.rstrip("/").rsplit("/", 1)[-1].startswith(SLOT_FILE_PREFIX)]
    out = set()
    for name in names:
        data = read_optional(store.join(index_root_uri, name), storage)
        if data is not None and data.strip().isdigit():
            out.add(int(data))
    return out


def retain_versions(index_root_uri: str, keep: int, storage: StorageConfig | None = None) -> RetentionReport:
    """Remove the versions the policy does not keep (see the module docstring).

    Raises:
        ValueError: ``keep`` < 1.
        SnapshotError: a kept version's manifest cannot be read (nothing is removed then).
    """
    if keep < 1:
        raise ValueError(f"keep_versions: {keep}; at least the newest version must stay")
    versions = list_versions(index_root_uri, storage)
    report = RetentionReport()
    if not versions:
        return report
    kept = set(versions[-keep:]) | _pointed(index_root_uri, storage) | set(pinned_versions(index_root_uri, storage).values())
    report.kept = sorted(kept & set(versions))
    used = {entry.prefix for version in report.kept for entry in read_manifest(index_root_uri, version, storage).shards}
    for version in versions:
        if version not in kept:
            report.freed_bytes += _remove_snapshot(index_root_uri, version, used, storage)
            report.removed.append(version)
    _remove_vectors(index_root_uri, kept, max(versions), report, storage)
    return report


def _remove_snapshot(root: str, version: int, used: set[str], storage: StorageConfig | None) -> int:
    """Manifest first, then every shard folder no kept manifest names. Returns the bytes removed."""
    folder = snapshot_path(root, version)
    sizes = store.file_sizes(folder, storage)
    store.delete_file(store.join(folder, MANIFEST_FILE), storage)
    freed = sizes.get(MANIFEST_FILE, 0)
    for uri in store.list_dir(folder, storage):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if f"v{version}/{name}" in used:
            continue
        freed += sum(size for path, size in sizes.items() if path == name or path.startswith(f"{name}/"))
        store.delete_path(uri, storage)  # a shard folder, or a plain file beside them
    if not store.list_dir(folder, storage):
        store.delete_dir(folder, storage)
    return freed


def _remove_vectors(root: str, kept: set[int], newest_published: int, report: RetentionReport,
                    storage: StorageConfig | None) -> None:
    from whetstone.index.vector_chunks import read_vector_chunks

    vectors_root = store.join(root, VECTORS_DIR)
    folders = {}
    for uri in store.list_dir(vectors_root, storage):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("v") and name[1:].isdigit():
            folders[int(name[1:])] = uri
    manifests = {}
    for version, uri in folders.items():
        try:
            manifests[version] = read_vector_chunks(uri, storage)
        except SnapshotError:  # being written (or a failed refresh's leftovers)
            continue
    keep = {v for v in folders if v in kept or v > newest_published}
    if manifests:
        keep.add(max(manifests))  # the next partial refresh layers on the newest vectors
    used = {chunk.folder or f"v{version}" for version in keep if version in manifests
            for chunk in manifests[version].chunks}
    for version in sorted(set(folders) - keep):
        if f"v{version}" in used:
            continue
        report.freed_bytes += sum(store.file_sizes(folders[version], storage).values())
        store.delete_dir(folders[version], storage)
        report.removed_vectors.append(version)
