"""How many threads the native kernels use (torch's setting unless
overridden) and which threads run them (torch's OpenMP team by default)."""

from __future__ import annotations

import contextlib
import threading

import torch

_override = threading.local()


def get_num_threads() -> int:
    """Threads for sparsert kernels: the override if set, else ``torch.get_num_threads()``."""
    n = getattr(_override, "value", None)
    return n if n is not None else torch.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Overrides the kernel thread count (``None`` goes back to torch's)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _override.value = n


@contextlib.contextmanager
def torch_single_thread():
    """Runs the block with ``torch.set_num_threads(1)`` and restores the old
    count: for short, memory-bound torch work (validation passes, small
    trainings), where a second thread only adds start-up and spin-wait
    contention on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def num_threads(n: int | None):
    """Context manager form of :func:`set_num_threads`."""
    previous = getattr(_override, "value", None)
    set_num_threads(n)
    try:
        yield
    finally:
        _override.value = previous


def threading_backend() -> str:
    """``"openmp"``: kernels run on the OpenMP threads torch's dense ops use
    (the default where the build has OpenMP); ``"pool"``: sparsert's own threads."""
    from .._ext import native

    return native().threading_backend()


def set_threading_backend(name: str) -> None:
    """Picks ``"openmp"`` or ``"pool"`` for every later kernel call in the
    process (the ``SPARSERT_THREADING`` environment variable sets the initial
    one). Two thread pools on a small machine steal each other's cores, so
    keep ``"openmp"`` unless the process runs no OpenMP code of its own."""
    from .._ext import native

    if name not in ("openmp", "pool"):
        raise ValueError(f"threading backend must be 'openmp' or 'pool', got {name!r}")
    native().set_threading_backend(name)
