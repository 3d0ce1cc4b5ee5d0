"""MemorySampler on a real child process (its tree only, so the test session's Ray does not
count): exact PSS, the counter estimate between exact readings, and when it re-reads a process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from whetstone.train.memory import MemorySampler

MIB = 2**20

# A child that holds private memory and, on each command read from stdin, changes it:
# "grow N" touches N more MiB of private memory, "shm N" maps and touches N MiB of shared memory,
# "free" drops everything it allocated. It answers "ok" once the pages are resident.
CHILD = r"""
import mmap, sys
held = []
print("ok", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "grow":
        block = bytearray(int(arg[0]) * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        held.append(block)
    elif cmd == "shm":
        block = mmap.mmap(-1, int(arg[0]) * 2**20, flags=mmap.MAP_SHARED)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        held.append(block)
    elif cmd == "free":
        held.clear()
        block = None
    print("ok", flush=True)
"""


@pytest.fixture()
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ok"

    def send(command: str) -> None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"

    send.pid = proc.pid
    yield send
    proc.kill()
    proc.wait()


def test_estimate_matches_exact_and_follows_private_memory_without_rereading(child):
    sampler = MemorySampler(exact_every_s=3600, root_pid=child.pid)
    first = sampler.sample()  # the first sample is exact
    assert sampler.exact_samples == 1
    reads = sampler.exact_reads
    estimate = sampler.sample()
    assert sampler.estimated_samples == 1 and sampler.exact_reads == reads  # nobody re-read
    assert abs(estimate - first) < 4 * MIB

    child("grow 200")
    grown = sampler.sample()
    assert sampler.exact_reads == reads  # private growth comes from the counters alone
    assert 190 * MIB < grown - estimate < 230 * MIB
    exact = sampler.sample(exact=True)
    assert abs(grown - exact) < 4 * MIB

    child("free")
    assert sampler.sample() < grown - 150 * MIB


def test_shared_memory_change_rereads_that_process(child):
    sampler = MemorySampler(exact_every_s=3600, reread_shared_bytes=32 * MIB, root_pid=child.pid)
    before = sampler.sample()
    reads = sampler.exact_reads
    child("shm 100")  # mapped by the child alone: all of it is the child's PSS
    after = sampler.sample()
    assert sampler.exact_reads == reads + 1  # the child, whose shared memory grew by 100 MiB
    assert 90 * MIB < after - before < 120 * MIB
    assert abs(after - sampler.sample(exact=True)) < 4 * MIB


def test_background_thread_keeps_the_peak(child):
    sampler = MemorySampler(interval_s=0.05, exact_every_s=3600, root_pid=child.pid).start()
    time.sleep(0.3)
    child("grow 300")
    time.sleep(0.5)
    child("free")
    time.sleep(0.3)
    peak = sampler.stop()
    now = sampler.sample()
    assert peak - now > 250 * MIB
    assert sampler.peak_breakdown and sampler.peak_breakdown[0][1] >= 0.25  # the child, in GiB
    assert sampler.estimated_samples > sampler.exact_samples >= 1
