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
        for proc in procs.values():
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_bytes
