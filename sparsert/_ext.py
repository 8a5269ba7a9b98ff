"""Loads the native extension on first use, with an error that says how to fix it."""

from __future__ import annotations

import functools


@functools.cache
def native():
    """The compiled ``sparsert._C`` module."""
    # torch first: its libgomp.so.1 must be the one in the process when _C
    # asks for that soname, so both share one OpenMP runtime and thread team.
    import torch  # noqa: F401

    try:
        from sparsert import _C
    except ImportError as err:
        raise ImportError(
            "sparsert's native kernels (sparsert._C) are not built or failed to load: "
            f"{err}. Build them with `pip install .` from the repository, or for a "
            "development checkout `cmake -S . -B build -G Ninja && cmake --build build` "
            "(needs a C++17 compiler, cmake and pybind11)."
        ) from err
    _settle_threading_backend(_C, _torch_openmp_libraries())
    return _C


def _torch_openmp_libraries():
    """Real paths of the OpenMP runtimes loaded from torch's own folders, or
    None where the process's mappings cannot be read (not Linux)."""
    import os

    import torch

    package = os.path.dirname(os.path.realpath(torch.__file__))
    roots = (package + os.sep, os.path.join(os.path.dirname(package), "torch.libs") + os.sep)
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return None
    found = set()
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) < 6 or not os.path.basename(fields[5]).startswith(("libgomp", "libiomp", "libomp")):
            continue
        path = os.path.realpath(fields[5])
        if path.startswith(roots):
            found.add(path)
    return found


def _settle_threading_backend(module, torch_openmp) -> None:
    """Keeps the "openmp" backend only where it shares torch's OpenMP runtime.

    The extension asks for libgomp.so.1 by soname, which resolves to torch's
    copy when torch ships it under that name (the CPU wheels). Wheels that
    ship a renamed copy (libgomp-<hash>.so.1) leave the extension with a
    second runtime, and two OpenMP teams on a few cores steal each other's
    cores; sparsert's own pool is then the better choice. An explicit
    SPARSERT_THREADING setting is always kept."""
    import os

    if os.environ.get("SPARSERT_THREADING") or not module.openmp_available():
        return
    if module.threading_backend() != "openmp" or not torch_openmp:
        return  # unknown, or torch loaded no OpenMP runtime of its own
    ours = os.path.realpath(module.openmp_library())
    if ours not in torch_openmp:
        module.set_threading_backend("pool")


def available() -> bool:
    try:
        native()
    except ImportError:
        return False
    return True


@functools.cache
def native_or_none():
    """``sparsert._C``, or None where it is not built: asked once, for the µs-sized calls that
    fall back to torch without it (a missing build is not retried on every call)."""
    return native() if available() else None
