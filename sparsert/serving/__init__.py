"""Serving sparse models: one engine, thin server adapters.

* :class:`Engine` (``sparsert.serving.engine``): load a sparsert file (or take
  a module), validate requests, batch them, run them under
  ``torch.inference_mode`` with a fixed thread budget; generate text for
  causal LMs (:meth:`Engine.complete`, streamed OpenAI completion chunks).
* LitServe, one machine (``sparsert serve FILE``): :func:`build_server`,
  :func:`serve` (needs ``pip install 'sparsert[serve]'``).
* Ray Serve, many replicas / machines: :func:`ray_app` (``serve run``) and
  ``sparsert serve FILE --ray --replicas N``.

The server adapters load lazily, so ``import sparsert.serving`` needs neither
LitServe nor Ray.
"""

from __future__ import annotations

import importlib

from .engine import (MINILM_TOKENIZER, SMOLLM2_TOKENIZER, Engine, EngineSpec, Frontend, RequestError, TensorSpec,
                     collect_completion, load_tokenizer, save_tokenizer, tokenizer_path_for)
from .threads import RULE as THREAD_RULE
from .threads import ThreadPlan, plan_threads

__all__ = ["Engine", "EngineSpec", "Frontend", "RequestError", "TensorSpec", "MINILM_TOKENIZER", "SMOLLM2_TOKENIZER",
           "collect_completion", "load_tokenizer",
           "save_tokenizer", "tokenizer_path_for", "plan_threads", "ThreadPlan", "THREAD_RULE",
           "build_server", "serve", "ray_app", "add_serve_parser"]

_LAZY = {"build_server": "litserve_app", "serve": "litserve_app", "ray_app": "ray_serve",
         "add_serve_parser": "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
