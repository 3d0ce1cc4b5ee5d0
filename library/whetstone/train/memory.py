"""Peak memory of a job across all its processes (driver, Ray daemons, workers, replicas).

A background thread sums the proportional set size (PSS) of this process and all its
descendants: PSS splits shared pages (the object store, shared libraries) between the processes
that map them, so the sum does not count them twice as RSS would. When the job joined an
existing cluster (``ray job submit``), Ray's processes are not our descendants; the sampler then
also counts every process whose command line mentions ray.

Exact PSS is expensive: the kernel walks every page table of a process to produce it, about 70 ms
for the 40 processes of a 2-core training job, and the walk competes with the training worker
for its memory map. Read every second, it cost the contrastive job 12% of its steps/s. So
the sampler reads every process's exact PSS only every ``exact_every_s``, and in between reads
two counters the kernel keeps without walking anything (``/proc/<pid>/statm``): private resident
memory, counted in full, and shared resident memory, counted at the share of it that the last
exact reading found to be that process's. A process whose shared memory grew or shrank by more
than ``reread_shared_bytes`` since then (the object store maps blocks into workers as shared
memory) is read exactly on the spot. Activations, gradients and optimiser state are private, so
a training step's peak is seen at the ``interval_s`` resolution.
"""

from __future__ import annotations

import threading
import time

import psutil


class MemorySampler:
    def __init__(self, interval_s: float = 1.0, include_ray: bool = False, exact_every_s: float = 60.0,
                 reread_shared_bytes: int = 32 * 2**20, root_pid: int | None = None):
        self.root_pid = root_pid  # whose process tree to measure; None: this process's
        self.interval_s = interval_s
        self.exact_every_s = exact_every_s
        self.reread_shared_bytes = reread_shared_bytes
        self.include_ray = include_ray
        self.peak_bytes = 0
        self.peak_breakdown: list[tuple[str, float]] = []  # (process, GiB) at the peak, largest first
        self.exact_samples = 0  # samples that read every process exactly
        self.estimated_samples = 0  # samples from the counters (some processes may still be read exactly)
        self.exact_reads = 0  # single processes read exactly, all samples together
        # (pid, start time) -> (shared resident bytes, the share of them its PSS carried) at the
        # process's last exact reading
        self._shared_at_exact: dict[tuple[int, float], tuple[int, float]] = {}
        self._last_exact = float("-inf")
        self._last_breakdown: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def _processes(self) -> dict[int, psutil.Process]:
        me = psutil.Process(self.root_pid)
        procs = {me.pid: me}
        for child in me.children(recursive=True):
            procs[child.pid] = child
        if self.include_ray:
            for proc in psutil.process_iter(["cmdline"]):
                if "ray" in " ".join(proc.info.get("cmdline") or []):
                    procs.setdefault(proc.pid, proc)
        return procs

    def sample(self, exact: bool | None = None) -> int:
        """Bytes in use by the job now: exact PSS, or the estimate described above. ``exact=None``
        reads exactly when ``exact_every_s`` has passed since the last exact reading."""
        now = time.monotonic()
        if exact is None:
            exact = now - self._last_exact >= self.exact_every_s
        if exact:
            self._last_exact = now
            self.exact_samples += 1
        else:
            self.estimated_samples += 1
        total = 0
        sizes: list[tuple[str, float]] = []
        seen: dict[tuple[int, float], tuple[int, float]] = {}
        for pid, proc in self._processes().items():
            try:
                with proc.oneshot():  # one read of /proc/<pid>/stat for start time and name
                    key = (pid, proc.create_time())  # a reused pid does not inherit a share
                    size, seen[key] = self._read(proc, self._shared_at_exact.get(key), exact)
                    name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += size
            sizes.append((name, size / 1024**3))
        self._shared_at_exact = seen  # processes that ended are forgotten
        self._last_breakdown = sorted(sizes, key=lambda item: -item[1])
        return total

    def _read(self, proc: psutil.Process, before: tuple[int, float] | None,
              exact: bool) -> tuple[int, tuple[int, float]]:
        """(bytes, (shared bytes, PSS share of them)) of one process; exact PSS when asked, when the
        process is new, or when its shared memory moved by more than ``reread_shared_bytes``."""
        counters = proc.memory_info()  # statm: rss and shared resident pages, no page walk
        private = max(counters.rss - counters.shared, 0)
        if not exact and before is not None and abs(counters.shared - before[0]) <= self.reread_shared_bytes:
            return private + int(counters.shared * before[1]), before
        self.exact_reads += 1
        size = getattr(proc.memory_full_info(), "pss", counters.rss)
        share = (size - private) / counters.shared if counters.shared else 1.0
        return size, (counters.shared, min(max(share, 0.0), 1.0))

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
