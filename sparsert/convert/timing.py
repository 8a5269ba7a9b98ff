"""Running and timing layers and models: calling a model on example inputs, comparing
outputs, per-call times."""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["call_model", "capture_layer_inputs", "flatten_tensors", "close", "max_rel_err", "call_times",
           "last_level_cache_bytes", "weights_exceed_cache", "cold_bytes_for", "streams_its_weight", "cold_copies",
           "private_cache_bytes", "in_model_call", "STREAMING_MAX_ROWS", "IN_MODEL_COPIES"]

#: Up to this many rows per call a Linear's time is mostly reading its weight (a decode step): where the
#: weight comes from (cache or memory) decides which format wins, and it is timed where it comes from
STREAMING_MAX_ROWS = 16


def call_model(model: nn.Module, example_inputs) -> Any:
    """Runs ``model`` on ``example_inputs``: a Tensor, a tuple/list of positional
    args, or a dict of keyword args (e.g. a Hugging Face tokenizer's output)."""
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError("example_inputs must be a Tensor, a tuple/list of positional args or a dict of "
                    f"keyword args, got {type(example_inputs).__name__}")


def capture_layer_inputs(model: nn.Module, names, example_inputs) -> tuple:
    """Runs the model once under no_grad; returns ({layer name: a copy of its first
    input tensor on the first call}, model output)."""
    captured: dict = {}
    handles = []
    for name in names:
        def hook(mod, args, _name=name):
            if _name not in captured and args and isinstance(args[0], Tensor):
                captured[_name] = args[0].detach().clone()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return captured, out


def flatten_tensors(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_tensors(v)]
    return []


def close(a: Tensor, b: Tensor, rtol: float = 1e-3) -> bool:
    """fp32 agreement relative to the output's scale (reordered sums differ in the last bits)."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= rtol * scale + 1e-6).all())


def max_rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if b.numel() else 0.0


def rms_rel_err(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` over all elements (root mean square error relative to ``b``'s)."""
    b64 = b.detach().double()
    return float((a.detach().double() - b64).norm() / b64.norm().clamp_min(1e-30))


def call_times(fn: Callable[[], Any], min_time: float, min_calls: int) -> list:
    """Per-call seconds of ``fn`` over at least ``min_calls`` calls and ``min_time`` seconds."""
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * min_calls and time.perf_counter() - start > min_time / 4:
            break
    return times


@functools.lru_cache(maxsize=None)
def _cache_sizes() -> Mapping[int, int]:
    """``{level: bytes}`` of cpu0's data/unified caches (Linux sysfs; empty where it cannot be read).
    Read once per process (every timed candidate asks), and read-only since every caller shares it."""
    units = {"K": 1 << 10, "M": 1 << 20}
    out: dict = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()  # e.g. "32768K"
            size = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
        except (OSError, ValueError):
            continue
        out[level] = max(out.get(level, 0), size)
    return types.MappingProxyType(out)


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache in bytes (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = _cache_sizes()
    return max(sizes.values(), default=0) or 32 << 20


def private_cache_bytes() -> int:
    """One core's own cache below the last level (L2; 1 MiB where it cannot be read)."""
    sizes = _cache_sizes()
    below = [b for level, b in sizes.items() if 1 < level < max(sizes)] if len(sizes) > 2 else []
    return max(below, default=0) or 1 << 20


def weights_exceed_cache(weights: Iterable[Tensor], cache_bytes: int) -> bool:
    """True when ``weights`` together exceed ``cache_bytes``: then each layer of a model call finds
    its weights evicted by the layers before it, and is timed that way (:func:`cold_copies`)."""
    return _weight_bytes(weights) > cache_bytes


def _weight_bytes(weights: Iterable[Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in weights)


def cold_bytes_for(weights: Iterable[Tensor]) -> int:
    """How many bytes of copies a layer of a model holding ``weights`` cycles through when timed
    (:func:`cold_copies`): when the weights exceed the last-level cache, twice the cache or the
    weights' own bytes, whichever is less (between two calls of a layer the model streams the others'
    weights, no more: on a 480 MiB last level, twice the cache made `auto` cycle 960 MB of copies
    per layer of SmolLM2, whose weights are 540 MB, ~20 minutes for the model); else 0 (timed hot)."""
    llc = last_level_cache_bytes()
    total = _weight_bytes(weights)
    return min(2 * llc, total) if total > llc else 0


def streams_its_weight(input_shape: Iterable[int]) -> bool:
    """A Linear called on inputs of ``input_shape`` (at most :data:`STREAMING_MAX_ROWS` rows) spends its
    time reading its weight: where that comes from (cache or memory) decides which format wins. On
    more rows each weight serves many and the ranking holds either way."""
    shape = list(input_shape)
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows <= STREAMING_MAX_ROWS


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def cold_copies(module: nn.Module, cold_bytes: int, limit: int = 4096) -> list:
    """``module`` and enough deep copies that cycling through them streams ``cold_bytes``
    (at most ``limit`` in all): each call then finds its weights evicted, as in a model whose
    weights do not fit the cache."""
    n = min(limit, max(1, -(-cold_bytes // max(1, _module_bytes(module)))))
    return [module] + [copy.deepcopy(module) for _ in range(n - 1)]


#: at most this many copies of a layer, of its input and of its outputs cycle in :func:`in_model_call`
#: (a small layer's copies then stay in the cores' caches: it costs little either way)
IN_MODEL_COPIES = 64


def in_model_call(module: nn.Module, x: Tensor, cold_bytes: int = 0, threads: int = 1) -> Callable[[], Any]:
    """A call of ``module`` on ``x`` to time, made as a model makes it: no layer of a model finds its
    weights, its input or its output buffer in the cores' own caches, since the layers and ops before
    it passed their own data through them. So the call cycles through copies of the layer (holding
    ``cold_bytes`` when the model's weights exceed the last-level cache, :func:`cold_copies`, else twice
    the ``threads`` cores' private caches) and of its input, and keeps its last outputs alive so each
    one is written to memory the previous calls did not touch; every copy is called once first.

    Measured on MiniLM's sparse layers at 128 tokens (2 threads): called back to back with one input
    they ran at 0.5-0.85x the time they took in the model, right after its other layers; the copies
    of the input and the outputs brought the isolated times most of the way (the weights from memory
    alone, ~10%), and the dense layers, compute-bound, moved less."""
    spread = 2 * private_cache_bytes() * max(1, threads)
    copies = cold_copies(module, cold_bytes) if cold_bytes > 0 else cold_copies(module, spread, IN_MODEL_COPIES)
    x_bytes = max(1, x.numel() * x.element_size())
    inputs = [x] + [x.clone() for _ in range(min(IN_MODEL_COPIES, -(-spread // x_bytes)) - 1)]
    out = copies[0](x)
    out_bytes = max(1, sum(t.numel() * t.element_size() for t in flatten_tensors(out)))
    kept = collections.deque(maxlen=min(IN_MODEL_COPIES, -(-spread // out_bytes)))
    for c in copies:  # warm-up: first calls allocate, pack and page the weights in
        kept.append(c(x))
    layers, xs = itertools.cycle(copies), itertools.cycle(inputs)
    for xi in inputs:
        kept.append(module(xi))

    def call():
        kept.append(next(layers)(next(xs)))

    return call
