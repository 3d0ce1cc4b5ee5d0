"""Progress lines for long work: counts, rates and an ETA, at most one line every ``every_s`` seconds.

Ray Data's own progress bars are off (:func:`whetstone.train.runtime.quiet_ray_data`): on a
non-interactive stdout (``ray job submit``, a pod's log) they log a block per operator every few
seconds, which buries the training loop's step lines. The long stages print these lines instead,
from the process that consumes the work (the driver, or the refresher actor whose stdout Ray
forwards to the driver)::

    [ingest] corpus: 120,000 rows (4,500 rows/s), 3 shards, 0 quarantined
    [embed] corpus v2: 40,000/100,000 docs (850 docs/s), eta 70 s
    [embed] corpus v2: done, 100,000 docs in 118.2 s (846 docs/s)

A periodic line is printed only when the count moves (an update), never from a timer thread, so a
stage that is silent for longer than ``every_s`` is one whose work is not arriving.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds between two periodic lines of one stage; the jobs' ``progress_every_s`` overrides it.
DEFAULT_EVERY_S = 10.0
PROGRESS_EVERY_S_HELP = ("seconds between progress lines (counts, rates, ETA) of the long stages: ingest, corpus "
                         "embedding, index refreshes; 0: a line for every batch")


def plural(count: int, word: str) -> str:
    """``1 shard``, ``3 shards``, ``12,000 rows``."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


class ProgressLine:
    """Counts one stage's work and prints a line with the count, the rate and (with a total) the ETA.

    Args:
        what: the stage, e.g. ``corpus`` or ``corpus v2``.
        unit: what is counted (``rows``, ``docs``).
        total: the count expected at the end (an ETA is shown); None when unknown.
        every_s: at most one periodic line per this many seconds (0: one per update).
        tag: the line's prefix, e.g. ``[ingest]``.
        details: called for each line; its text follows the counts (e.g. ``3 shards, 0 quarantined``).
        out: where lines go (default ``print(..., flush=True)``).
    """

    def __init__(self, what: str, unit: str = "rows", total: int | None = None, every_s: float = DEFAULT_EVERY_S,
                 tag: str = "[progress]", details: Callable[[], str] | None = None,
                 out: Callable[[str], None] | None = None) -> None:
        self.what, self.unit, self.total, self.every_s, self.tag = what, unit, total, max(every_s, 0.0), tag
        self.details = details
        self.out = out or (lambda line: print(line, flush=True))
        self.count = 0
        self.started = self._last_at = time.monotonic()
        self._last_count = 0
        self._first: tuple[float, int] | None = None  # (when, count) of the first update that counted work
        self.lines = 0  # periodic lines printed
        self.finished = False

    def add(self, n: int) -> None:
        self.update(self.count + n)

    def update(self, count: int) -> None:
        """The stage has done ``count`` units so far; prints a line when ``every_s`` has passed."""
        self.count = count
        now = time.monotonic()
        if self._first is None and count:
            self._first = (now, count)
        if now - self._last_at < self.every_s or count == self._last_count:
            return
        rate = (count - self._last_count) / max(now - self._last_at, 1e-9)  # since the last line: the current pace
        done = f"{count:,}/{self.total:,}" if self.total else f"{count:,}"
        line = f"{self.tag} {self.what}: {done} {self.unit} ({_number(rate)} {self.unit}/s)"
        first_at, first_count = self._first or (now, count)
        # the ETA from the mean pace since work first arrived (start-up left out): steadier than the current pace
        pace = (count - first_count) / (now - first_at) if count > first_count and now > first_at else 0.0
        if self.total and pace > 0 and count < self.total:  # (no ETA before a second update measured a pace)
            line += f", eta {(self.total - count) / pace:.0f} s"
        self.out(line + self._details())
        self._last_at, self._last_count = now, count
        self.lines += 1

    def done(self, note: str = "") -> str:
        """Print (once) and return the closing line: the total, the elapsed time and the mean rate."""
        elapsed = time.monotonic() - self.started
        line = (f"{self.tag} {self.what}: done, {self.count:,} {self.unit} in {elapsed:.1f} s "
                f"({_number(self.count / max(elapsed, 1e-9))} {self.unit}/s){self._details()}{note}")
        if not self.finished:
            self.out(line)
            self.finished = True
        return line

    def _details(self) -> str:
        text = self.details() if self.details is not None else ""
        return f", {text}" if text else ""
