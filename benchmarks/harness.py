"""Timing helpers shared by the benchmark scripts.

Methods are timed round-robin (one sample of each per round) so that noise
from other processes on a shared machine hits every method alike; each
sample runs enough calls to last ~`min_sample_s`, and the reported time is
the median over rounds, after warm-up.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from typing import Callable


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_methods(methods: dict[str, Callable[[], object]], *, rounds: int = 30, warmup: int = 3,
                 min_sample_s: float = 2e-3, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin.

    ``clock=time.thread_time`` counts only the CPU time of the calling
    thread: on a machine shared with other jobs, single-threaded methods
    are then compared without the time the scheduler gave to others."""
    calls = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            fn()
        start = clock()
        fn()
        one = max(clock() - start, 1e-7)
        calls[name] = max(1, int(min_sample_s / one))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            n = calls[name]
            start = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}
