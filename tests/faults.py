"""Helpers of the fault tests: a job in a thread of the test process (the session's Ray), waiting
for a point in it, and the training worker processes to kill."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


class JobThread:
    """``main(args)`` of a job in a daemon thread; ``report`` or ``error`` once it ended."""

    def __init__(self, main: Callable[[list[str]], dict], args: list[str]) -> None:
        self.result: dict = {}
        self.thread = threading.Thread(target=self._run, args=(main, args), daemon=True)
        self.thread.start()

    def _run(self, main: Callable[[list[str]], dict], args: list[str]) -> None:
        try:
            self.result["report"] = main(args)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self.result["error"] = err

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 600.0) -> None:
        """Until ``condition()`` holds; fails if the job ends first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.thread.is_alive(), f"the job ended before {what}: {self.result}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
            time.sleep(0.02)

    def finished_report(self, timeout_s: float = 900.0, cleanup: Callable[[], object] | None = None) -> dict:
        """The report, once the job ended without an error within ``timeout_s``; ``cleanup()``
        runs first, whatever happened (e.g. deleting the job's Serve application)."""
        self.thread.join(timeout=timeout_s)
        if cleanup is not None:
            cleanup()
        assert not self.thread.is_alive(), f"the job did not finish within {timeout_s} s of the fault"
        assert "error" not in self.result, f"the job failed after the fault: {self.result.get('error')!r}"
        return self.result["report"]


def train_worker_processes() -> list:
    """The Ray Train worker processes of this test session's local Ray (Ray titles them
    ``ray::RayTrainWorker...``; they descend from this process, which started the raylet), not
    those of any other Ray on the machine."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []) and \
                    os.getpid() in {parent.pid for parent in proc.parents()}:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found
