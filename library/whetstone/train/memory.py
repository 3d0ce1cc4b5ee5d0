"""Peak memory of a job across all its processes (driver, Ray daemons, workers, replicas).

A background thread sums the proportional set size (PSS) of this process and all its
descendants every ``interval_s``: PSS splits shared pages (the object store, shared libraries)
between the processes that map them, so the sum does not count them twice as RSS would.
When the job joined an existing cluster (``ray job submit``), Ray's processes are not our
descendants; the sampler then also counts every process whose command line mentions ray.
"""

from __future__ import annotations

import threading

import psutil


class MemorySampler:
    def __init__(self, interval_s: float = 1.0, include_ray: bool = False):
        self.interval_s = interval_s
        self.include_ray = include_ray
        self.peak_bytes = 0
        self.peak_breakdown: list[tuple[str, float]] = []  # (process, GiB) at the peak, largest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def sample(self) -> int:
        me = psutil.Process()
        procs = {me.pid: me}
        for child in me.children(recursive=True):
            procs[child.pid] = child
        if self.include_ray:
            for proc in psutil.process_iter(["cmdline"]):
                if "ray" in " ".join(proc.info.get("cmdline") or []):
                    procs.setdefault(proc.pid, proc)
        total = 0
        sizes: list[tuple[str, float]] = []
        for proc in procs.values():
            try:
                info = proc.memory_full_info()
                size = getattr(info, "pss", info.rss)
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += size
            sizes.append((name, size / 1024**3))
        self._last_breakdown = sorted(sizes, key=lambda item: -item[1])
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            total = self.sample()
            if total > self.peak_bytes:
                self.peak_bytes = total
                self.peak_breakdown = [(n, round(g, 2)) for n, g in self._last_breakdown[:10]]
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes
