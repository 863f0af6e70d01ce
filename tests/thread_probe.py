"""Which threads of this process did work: CPU time per thread from /proc/self/task.

A thread-independence test that compares the default thread count with 1 proves nothing when
the default is 1, or when the kernel never splits the work. ``busy_threads`` runs a function
until the calling thread has used ``min_cpu_s`` of CPU time and counts the threads whose own
CPU time grew by at least ``min_share`` of the caller's meanwhile: at::parallel_for's workers
only accrue CPU time when a parallel region runs (their spin after a region is short), so two
or more busy threads mean the work really was split.
"""

import os
import time

import pytest

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)
    return ticks


def busy_threads(fn, min_cpu_s=0.3, max_wall_s=60.0, min_share=0.1):
    """Call ``fn()`` repeatedly until this thread has used ``min_cpu_s`` seconds of CPU (or
    ``max_wall_s`` passed); returns the number of threads that did at least ``min_share`` of
    the calling thread's CPU work meanwhile (the caller included)."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's /proc/self/task")
    me = str(__import__("threading").get_native_id())
    before = _cpu_ticks()
    start = time.monotonic()
    while True:
        fn()
        now = _cpu_ticks()
        mine = now.get(me, 0) - before.get(me, 0)
        if mine >= min_cpu_s * CLK_TCK or time.monotonic() - start > max_wall_s:
            break
    need = max(1, min_share * mine)
    return sum(1 for tid, t in now.items() if t - before.get(tid, 0) >= need)
