"""Peak RSS of every process of a local Ray cluster, by role (benchmark instrument).

:class:`RolePeakSampler` reuses :class:`whetstone.train.memory.MemorySampler`'s thread and its
process discovery (the driver and all its descendants: a local ``ray.init`` starts the GCS, the
raylet and every worker as descendants of the driver) and replaces what one sample reads: per
process, the kernel's own peak RSS (``VmHWM`` in ``/proc/<pid>/status``, exact however short the
peak) and the current RSS, plus the process title Ray sets (``ray::ServeReplica:app:deployment``,
``ray::<task name>``, ``ray::IDLE``) to name its role. A pooled Ray worker changes title from
task to task; a rise of its high-water mark between two samples is credited to its current role
and, when the title changed in between, to the earlier one too (a task that just ended, an actor
that just started). Sampling costs a read of two small ``/proc`` files per process (no page walk).

Peaks are RSS, shared pages (libraries, object-store pages a process touched) counted in full in
every process that maps them: the stricter measure for a per-process bound.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import psutil
from whetstone.train.memory import MemorySampler

GIB = 1024**3


def reset_peak(pid: int) -> bool:
    """Reset a process's ``VmHWM`` to its current RSS (``clear_refs`` 5, Linux >= 4.0); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def role_of(title: str, pid: int, driver_pid: int, router: str) -> str:
    """The role of a process from its title: ``driver``, ``router``, ``shard_replica:<s>``,
    ``shard_builder``, ``index_trainer``, ``serve_proxy``, ``serve_controller``, ``serve_registry``, ``caller`` (the
    benchmark's load), ``ray_idle_worker``,
    ``ray_system`` (GCS, raylet, dashboard, agents) or ``other:<title>``."""
    if pid == driver_pid:
        return "driver"
    if "ServeReplica:" in title:
        # [ray::SERVE_REPLICA::<actor name>:]ServeReplica:<app>:<deployment>[.<method running now>]
        deployment = title[title.rindex("ServeReplica:"):].split()[0].rsplit(":", 1)[-1].split(".")[0]
        if deployment == router:
            return "router"
        if deployment.startswith(f"{router}-shard-"):  # IndexService-shard-3, or its second set -3-b
            return f"shard_replica:{deployment[len(router) + 7:].split('-')[0]}"
        return f"serve_replica:{deployment}"
    for marker, role in (("ProxyActor", "serve_proxy"), ("ServeController", "serve_controller"),
                         ("ReplicaRegistry", "serve_registry"), ("DashboardAgent", "ray_system")):
        if marker in title:
            return role
    if title.startswith("ray::"):
        name = title[5:].split()[0].split(".")[0] if len(title) > 5 else ""  # ray::<task or Class.method>
        if name == "IDLE":
            return "ray_idle_worker"
        if "build" in name.lower() and "shard" in name.lower():
            return "shard_builder"
        if name == "_train_task":  # the one IVF training of a build, shared by its shards
            return "index_trainer"
        if name.startswith("Caller"):
            return "caller"
        return f"ray_task:{name}"
    if any(part in title for part in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env",
                                      "monitor.py", "ray/_private", "ray_client_server")):
        return "ray_system"
    return f"other:{os.path.basename(title.split()[0]) if title else '?'}"


@dataclass
class _Seen:
    role: str
    hwm: int


@dataclass
class ProcessPeak:
    pid: int
    role: str
    title: str
    peak_bytes: int = 0
    titles: set[str] = field(default_factory=set)


class RolePeakSampler(MemorySampler):
    """Per-process, per-role peak RSS of the driver's process tree; start/stop as MemorySampler."""

    def __init__(self, router: str, interval_s: float = 0.2) -> None:
        super().__init__(interval_s=interval_s)
        self.router = router
        self.driver_pid = os.getpid()
        self.peaks: dict[tuple[int, str], ProcessPeak] = {}  # (pid, role) -> peak
        self._seen: dict[tuple[int, float], _Seen] = {}
        self.driver_reset = reset_peak(self.driver_pid)

    def _credit(self, pid: int, role: str, title: str, size: int) -> None:
        peak = self.peaks.setdefault((pid, role), ProcessPeak(pid, role, title))
        peak.peak_bytes = max(peak.peak_bytes, size)
        peak.titles.add(title.strip()[:160])

    def sample(self, exact: bool | None = None) -> int:
        """Read every process once; returns the sum of their current RSS."""
        self.estimated_samples += 1
        total = 0
        sizes = []
        for pid, proc in self._processes().items():
            try:
                key = (pid, proc.create_time())
                title = " ".join(proc.cmdline())
                rss, hwm = read_status(pid)
            except (psutil.Error, OSError):
                continue
            role = role_of(title, pid, self.driver_pid, self.router)
            before = self._seen.get(key)
            if before is None or hwm > before.hwm:
                # the high-water mark rose since the last sample: in the current role, and in the
                # role it had then if the title changed since (a task that just ended, an actor
                # that just started): both get it, the conservative side for either
                if pid != self.driver_pid or self.driver_reset or before is not None:
                    self._credit(pid, role, title, hwm)
                    if before is not None and before.role != role:
                        self._credit(pid, before.role, title, hwm)
            self._credit(pid, role, title, rss)
            self._seen[key] = _Seen(role, hwm)
            total += rss
            sizes.append((f"{role}[{pid}]", rss / GIB))
        self._last_breakdown = sorted(sizes, key=lambda item: -item[1])
        return total

    def report(self) -> dict:
        """``{"roles": {role: {"peak_gib", "processes"}}, "processes": [...], "max_peak_gib"}``."""
        roles: dict[str, dict] = {}
        for peak in self.peaks.values():
            group = peak.role.split(":")[0] if peak.role.startswith(("shard_replica", "other", "ray_task")) \
                else peak.role
            entry = roles.setdefault(group, {"peak_gib": 0.0, "processes": 0})
            entry["peak_gib"] = max(entry["peak_gib"], peak.peak_bytes / GIB)
            entry["processes"] += 1
        processes = sorted(({"pid": p.pid, "role": p.role, "peak_gib": round(p.peak_bytes / GIB, 4),
                             "title": sorted(p.titles)[0]} for p in self.peaks.values()),
                           key=lambda row: -row["peak_gib"])
        return {"roles": roles, "processes": processes, "samples": self.estimated_samples,
                "sum_rss_peak_gib": self.peak_bytes / GIB, "driver_peak_reset": self.driver_reset}

    def __enter__(self) -> RolePeakSampler:
        self.sample()
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        with contextlib.suppress(Exception):
            self.sample()
