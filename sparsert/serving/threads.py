"""Threads that add up: workers x threads per worker never exceed the usable cores.

RULE (also in ``sparsert serve --help``): with C usable cores (this process's
CPU affinity), ``workers * threads_per_worker <= C``. Given neither, one
worker uses all C cores; given one, the other is C divided by it (at least 1);
given both, a product above C is an error. Each worker pins itself to its own
group of ``threads_per_worker`` consecutive cores (as DeepSparse's server did),
so workers never compete for a core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ThreadPlan", "plan_threads", "usable_cores", "RULE", "DEFAULT_WORKER_NICE"]

DEFAULT_WORKER_NICE = 5  # the model workers' priority below the HTTP process's (an os.nice increment)

RULE = ("workers x threads-per-worker must not exceed the usable cores (C); by default one worker uses all C "
        "cores, and given one of the two the other is C divided by it; each worker is pinned to its own "
        "group of cores")


def usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class ThreadPlan:
    workers: int
    threads_per_worker: int
    cores: tuple[int, ...]  # the usable cores, in order

    def cores_for(self, worker: int) -> set[int]:
        """The cores worker ``worker`` (0-based) is pinned to."""
        t = self.threads_per_worker
        group = self.cores[worker * t:(worker + 1) * t]
        return set(group)


def plan_threads(workers: int | None = None, threads_per_worker: int | None = None,
                 cores: list[int] | None = None) -> ThreadPlan:
    cores = list(cores if cores is not None else usable_cores())
    c = len(cores)
    for value, what in ((workers, "workers"), (threads_per_worker, "threads per worker")):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be at least 1, got {value}")
    if workers is None and threads_per_worker is None:
        workers, threads_per_worker = 1, c
    elif workers is None:
        workers = max(1, c // threads_per_worker)
    elif threads_per_worker is None:
        threads_per_worker = max(1, c // workers)
    if workers * threads_per_worker > c:
        raise ValueError(f"{workers} workers x {threads_per_worker} threads = {workers * threads_per_worker} threads "
                         f"on {c} usable cores would oversubscribe them: {RULE}")
    return ThreadPlan(workers, threads_per_worker, tuple(cores))
