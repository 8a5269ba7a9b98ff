"""sparsert: pruning that actually makes models faster.

Prune a PyTorch model (``sparsert.prune``), pack its pruned layers into sparse
formats (``sparsert.formats``) and run them with native kernels
(``sparsert.ops``). ``import sparsert`` registers the ``torch.ops.sparsert``
ops (so an exported program that calls them loads after it); the native
extension and the other sub-packages load on first use.
"""

from __future__ import annotations

import importlib

from . import ops  # noqa: F401  (registers torch.ops.sparsert.*)

__version__ = "0.1.0"

# Public names and the sub-module each one lives in. Resolved lazily so that
# ``import sparsert`` neither builds nor loads anything it does not need.
_LAZY = {
    "CSR": "sparsert.formats",
    "BSR": "sparsert.formats",
    "NM": "sparsert.formats",
    "Pruner": "sparsert.planner",  # the kernel-free sparsert.prune.Pruner, plus target_speedup=
    "finetune": "sparsert.prune",
    "report": "sparsert.prune",
    "SparseLinear": "sparsert.nn",
    "SparseConv2d": "sparsert.nn",
    "sparsify": "sparsert.convert",
    "streamline": "sparsert.convert",
    "benchmark": "sparsert.bench",
    "save": "sparsert.io",
    "load": "sparsert.io",
    "export": "sparsert.io",
}

# ``sparsert.prune`` is both the pruning package and, being a callable module,
# the one-call shorthand ``sparsert.prune(model, ...)``.
_SUBMODULES = {"formats", "ops", "prune", "nn", "convert", "bench", "io", "models", "planner"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"sparsert.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'sparsert' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))


__all__ = sorted(_LAZY) + ["__version__"]
