"""How many threads the native kernels use: torch's setting unless overridden."""

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
def num_threads(n: int | None):
    """Context manager form of :func:`set_num_threads`."""
    previous = getattr(_override, "value", None)
    set_num_threads(n)
    try:
        yield
    finally:
        _override.value = previous
