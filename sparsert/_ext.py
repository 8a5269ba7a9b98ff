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
    return _C


def available() -> bool:
    try:
        native()
    except ImportError:
        return False
    return True
