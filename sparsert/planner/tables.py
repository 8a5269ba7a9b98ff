"""Measured time tables: each prunable layer x pattern x sparsity, on this machine.

For every layer the planner may prune, :func:`time_tables` times, on the
layer's real input shape (captured with forward hooks from
``example_inputs``):

* the layer dense on the best dense path (:class:`~sparsert.nn.DenseLinear`,
  what ``sparsify`` leaves where a Linear stays dense) and in torch eager;
* for each pattern and each sparsity of a grid, a random weight with a random
  mask of that pattern at that sparsity, packed in every format
  :func:`sparsert.convert.candidate_formats` would try for it (the modules
  ``sparsify`` would build); every format's time is kept, the fastest one's
  as the point's option (a fused group may run in another, :mod:`.plan`).

Each candidate is called as a model calls it (:func:`sparsert.convert.timing.in_model_call`):
cycling through copies of its weights, of its input and of its output buffers that do not
fit the cores' own caches. Called back to back on one input, every operand stays in L2, and
MiniLM's sparse layers at 128 tokens ran there at 0.5-0.85x the time they took in the model;
scaling every layer by the dense layers' ratio did not fix that (the dense layers, compute
bound, moved less): a 2x plan predicted from such times measured 1.49-1.85x.

All candidates of one layer shape are timed interleaved (rounds), medians. The cache keeps those
medians; the planner reads them smoothed (:func:`smooth_formats`): no format gets slower as it gets
sparser, and on a layer that streams its weight CSR and bitmask16 cost the same at one sparsity
whatever the pattern.
Layers of the same shape, bias and input shape share one entry (MiniLM's 36
Linears are 3 shapes). The whole model is timed on the baseline path too: what
it spends outside the prunable layers (attention, norms, embeddings) is the
*remainder*, which no pruning changes. The remainder is timed directly (the
model with the prunable layers stubbed out, interleaved with the whole model),
not taken as the model's time minus the isolated layer times: that difference
of two noisy numbers moved from 12.9 to 17.6 ms of MiniLM's 40 ms between two
idle runs. The isolated layer times are then scaled so that the layers and
the remainder add up to the measured model (layers in a model run a little
faster or slower than alone, with other data in the caches), except where
the layers stream their weights from memory (a few rows, cold: a decode
step): those keep their isolated times beside the measured remainder, since
in a pruned model the sparse layers and the layers left dense ran as fast as
alone while only an all-dense model ran its layers faster.

Layers the served model runs as one call when they share a format (Q/K/V,
gate/up: ``fused=``, :func:`sparsert.convert.streamline.fusion_groups`) are
timed that way too, as one Linear of their stacked rows (:attr:`TimeTables.fused`),
and the whole model is timed as served (``served=``, those groups fused): the
plan then counts a group in one format as one call (a uniform 4x1 plan for
SmolLM2's decode predicted 1.52x from separate calls and measured 1.80x fused).

A model whose prunable weights exceed the last-level cache runs each layer
with its weights evicted by the layers before it; its layers are timed that
way too, each candidate cycling through copies of itself that hold twice the
cache (hot, a 1-token GEMV reads its weights from L3 at several times the
memory's speed, and the planner saw no gain in pruning it).

Entries are cached on disk as JSON under ``$SPARSERT_CACHE_DIR`` (else
``$XDG_CACHE_HOME/sparsert``, else ``~/.cache/sparsert``), in a file per
machine key: CPU model, kernel ISA, thread count, sparsert and torch versions.
Change any of them and the old entries are not used.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops as _ops
from ..bench import best_dense_model, thread_settings
from ..convert.plan import candidate_formats
from ..convert.timing import (call_model, call_times, capture_layer_inputs, cold_bytes_for,  # noqa: F401
                              cold_copies, in_model_call, last_level_cache_bytes, streams_its_weight)
from ..nn import DenseLinear, SparseConv2d, SparseLinear
from ..nn.surgery import swap
from ..prune.patterns import Pattern, parse_pattern, weight_2d_shape

__all__ = ["DEFAULT_PATTERNS", "DEFAULT_SPARSITIES", "BASELINES", "LayerTimes", "TimeTables", "time_tables",
           "cache_dir", "machine_key", "random_pattern_weight", "cold_copies", "last_level_cache_bytes",
           "PATTERN_FREE_FORMATS", "smooth_formats", "fastest_formats"]

DEFAULT_PATTERNS = ("unstructured", "4x1", "2:4")
#: sparsities timed per pattern (N:M patterns have their one sparsity); 0.75 and 0.85 because
#: between 0.7 and 0.9 one step moves MiniLM's predicted speedup by ~0.2-0.3x, so the least
#: uniform sparsity reaching 1.5x or 2x overshot the target by up to 12%
DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
BASELINES = ("best_dense", "torch")
_CACHE_VERSION = 6  # 2: the whole-model entry holds the measured remainder too; 3: the baseline model tuned per layer;
# 4: layers of models whose weights exceed the last-level cache timed with their weights out of the cache;
# 5: every layer timed as a model calls it (weights, input and output out of the core's caches);
# 6: every format's time kept per point, not only the fastest's


def cache_dir() -> Path:
    """Where the time tables are cached."""
    root = os.environ.get("SPARSERT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "sparsert")
    return Path(root) / "planner"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa() -> str:
    return _ops.cpu_isa() if _ops.cpu_available() else "none"


def _sparsert_version() -> str:
    from .. import __version__

    return __version__


@functools.lru_cache(maxsize=None)
def _native_build() -> str:
    """A digest of the native kernels' file: a rebuilt extension (new or faster kernels under
    the same version number) makes the cached times stale."""
    try:
        from .._ext import native

        with open(native().__file__, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:16]
    except (ImportError, OSError, AttributeError):
        return "none"


def machine_key(threads: int) -> dict:
    """What a time measured here depends on besides the layer: a change in any part is a cache miss."""
    return {"cpu": _cpu_model(), "isa": _isa(), "threads": int(threads), "sparsert": _sparsert_version(),
            "build": _native_build(), "torch": torch.__version__, "cache_version": _CACHE_VERSION}


@dataclasses.dataclass
class LayerTimes:
    """Median seconds per call of one layer on its real input shape."""

    name: str
    type: str                    # "Linear" | "Conv2d"
    shape: tuple                 # the 2-D weight shape (out, in[*kh*kw])
    input_shape: tuple
    dense: float                 # the faster of oneDNN prepacked and eager (where a layer left dense runs)
    torch: float                 # torch eager
    #: {pattern: {sparsity: (seconds, format kind)}} for the fastest format at that point
    options: dict = dataclasses.field(default_factory=dict)
    #: {pattern: {sparsity: {format kind: seconds}}}: every format timed there (a fused group can run in
    #: one format that is not the fastest at each of its layers' points)
    formats: dict = dataclasses.field(default_factory=dict)

    def baseline(self, baseline: str) -> float:
        return self.dense if baseline == "best_dense" else self.torch


@dataclasses.dataclass
class TimeTables:
    """The per-layer tables plus the whole model on the baseline path."""

    layers: dict                 # name -> LayerTimes
    baseline: str                # "best_dense" | "torch"
    model_seconds: float         # the whole model on the baseline path
    threads: int
    machine: dict
    build_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    #: the layers' isolated times were multiplied by this to add up, with the measured
    #: remainder, to the measured model (1.0: not scaled)
    layer_scale: float = 1.0
    #: the remainder as measured, where the layers keep their isolated times (layers that stream their
    #: weights from memory: a few rows each, cold); None: the model minus the scaled layers
    rest_seconds: Optional[float] = None
    #: {(layer, ...): LayerTimes}: groups of layers the served model runs as one call when they share a
    #: format (Q/K/V, gate/up), timed as that one Linear; layers left dense are always of one kind
    fused: dict = dataclasses.field(default_factory=dict)

    @property
    def layer_seconds(self) -> float:
        """The prunable layers' summed baseline time (a fused group's as its one call)."""
        grouped = {n for g in self.fused for n in g}
        return (sum(t.baseline(self.baseline) for n, t in self.layers.items() if n not in grouped)
                + sum(t.baseline(self.baseline) for t in self.fused.values()))

    @property
    def remainder(self) -> float:
        """Time outside the prunable layers (never below 0: isolated layer times can overshoot)."""
        if self.rest_seconds is not None:
            return self.rest_seconds
        return max(self.model_seconds - self.layer_seconds, 0.0)


def random_pattern_weight(rows: int, cols: int, pattern: "str | Pattern", sparsity: float,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """A random ``rows x cols`` weight whose zeros follow ``pattern`` at ``sparsity``
    (exactly for blocks, up to edge blocks; N:M ignores ``sparsity``)."""
    pat = parse_pattern(pattern)
    g = generator or torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) / max(cols, 1) ** 0.5
    score = torch.rand(rows, cols, generator=g)
    if pat.kind == "nm":
        return w * pat.nm_mask(score)
    gs, _ = pat.group_scores(score)
    keep_groups = max(1, round(gs.numel() * (1.0 - sparsity)))
    keep = torch.zeros(gs.numel(), dtype=torch.bool)
    keep[torch.randperm(gs.numel(), generator=g)[:keep_groups]] = True
    return w * pat.expand(keep.reshape(gs.shape), rows, cols)


def _signature(name: str, module: nn.Module, x: Tensor) -> dict:
    """What a layer's times depend on (with the machine key): type, shape, bias, input shape."""
    rows, cols = weight_2d_shape(module.weight)
    sig: dict[str, Any] = {"type": type(module).__name__, "shape": [rows, cols], "bias": module.bias is not None,
                           "input": list(x.shape), "dtype": str(x.dtype)}
    if isinstance(module, nn.Conv2d):
        sig["conv"] = [list(module.kernel_size), list(module.stride), list(module.padding), list(module.dilation),
                       module.groups, module.padding_mode]
    return sig


def _fresh(module: nn.Module, w2d: Tensor) -> nn.Module:
    """A plain, hook-free nn.Linear / nn.Conv2d like ``module`` holding ``w2d`` (and a random bias)."""
    rows, cols = w2d.shape
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        out = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                        module.dilation, module.groups, bias, module.padding_mode)
    else:
        out = nn.Linear(cols, rows, bias)
    out.requires_grad_(False)
    with torch.no_grad():
        out.weight.copy_(w2d.reshape(out.weight.shape))
    return out.eval()


def _build(module: nn.Module, kind: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_dense(module, kind)
    return SparseLinear.from_dense(module, kind)


def _points(pattern: Pattern, sparsities: Sequence[float]) -> list:
    return [round(pattern.fixed_sparsity, 6)] if pattern.kind == "nm" else [float(s) for s in sparsities]


#: formats whose time, on a layer that streams its weight (a few rows: a decode step), depends on how
#: many weights are kept, not on where: CSR and bitmask16 read a value (and an index or a mask bit) per
#: kept weight whatever the pattern (1 token, 1536x576, hot, 2 threads: within 1-3% across unstructured,
#: 4x1 and 2:4). At many rows they do not: consecutive rows sharing columns (4x1) reuse the input rows
#: they gather, and CSR ran 4x1 weights 5-15% faster than unstructured ones at 128 tokens.
PATTERN_FREE_FORMATS = ("csr", "bitmask16")


def _non_increasing(values: Sequence[float]) -> list:
    """The least-squares non-increasing fit of ``values`` (pool adjacent violators): a point that
    measured slower than the sparser point after it is averaged with it."""
    blocks: list = []  # [sum, count] of runs averaged together
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def smooth_formats(formats: dict, pool_patterns: bool = False) -> dict:
    """``{pattern: {sparsity: {format kind: seconds}}}`` with what cannot be true of the kernels taken out
    of the measurements, so the solver does not chase points that measured lucky (one point of a table
    moved by 20-40% between hours on a shared host; SmolLM2's plan went from perplexity x12.4 to x93.8
    on such a table, where 4x1 at 50% had measured 85 us in bitmask16 and unstructured 96):

    * in one pattern and format, time does not grow with sparsity (fewer weights to read and multiply):
      each row is replaced by its non-increasing least-squares fit;
    * ``pool_patterns`` (a layer that streams its weight): a format of :data:`PATTERN_FREE_FORMATS`
      costs the same at one sparsity under every pattern, and its times there are replaced by their
      median first.
    """
    out = {p: {s: dict(kinds) for s, kinds in pts.items()} for p, pts in formats.items()}
    for kind in PATTERN_FREE_FORMATS if pool_patterns else ():
        for s in {s for pts in out.values() for s in pts}:
            holders = [out[p][s] for p in out if kind in out[p].get(s, {})]
            if len(holders) > 1:
                pooled = statistics.median(h[kind] for h in holders)
                for h in holders:
                    h[kind] = pooled
    for pts in out.values():
        for kind in {k for kinds in pts.values() for k in kinds}:
            row = sorted(s for s in pts if kind in pts[s])
            for s, t in zip(row, _non_increasing([pts[s][kind] for s in row])):
                pts[s][kind] = t
    return out


def fastest_formats(formats: dict) -> dict:
    """``{pattern: {sparsity: (seconds, kind)}}``: the fastest format at each point of ``formats``."""
    return {p: {s: min(((t, k) for k, t in kinds.items()), key=lambda tk: tk[0]) for s, kinds in pts.items() if kinds}
            for p, pts in formats.items()}


@torch.no_grad()
def _time_layer(module: nn.Module, x: Tensor, patterns: Sequence[Pattern], sparsities: Sequence[float],
                min_time: float, rounds: int, cold_bytes: int = 0) -> dict:
    """Times one layer shape: baselines and every (pattern, sparsity, format); returns a cache entry.
    Each candidate is called as in a model (:func:`in_model_call`); ``cold_bytes`` > 0: cycling
    through copies of itself that hold that many bytes, so its weights come from memory."""
    rows, cols = weight_2d_shape(module.weight)
    g = torch.Generator().manual_seed(rows * 131 + cols)
    dense_w = torch.randn(rows, cols, generator=g) / max(cols, 1) ** 0.5
    plain = _fresh(module, dense_w)
    built: dict = {("torch",): plain,
                   ("dense",): DenseLinear.from_linear(plain) if isinstance(plain, nn.Linear) else plain}
    for pat in patterns:
        try:
            pat.check(rows, cols)
        except ValueError:
            continue
        for s in _points(pat, sparsities):
            w = random_pattern_weight(rows, cols, pat, s, g)
            masked = _fresh(module, w)
            for kind in candidate_formats(w, linear=isinstance(plain, nn.Linear)):
                if kind == "dense":
                    continue
                try:
                    built[(str(pat), s, kind)] = _build(masked, kind)
                except (ValueError, TypeError):
                    continue  # this format cannot hold this weight
    samples: dict = {k: [] for k in built}
    calls = {}
    for key, mod in built.items():  # each called as in a model: weights, input, output out of the core's caches
        calls[key] = in_model_call(mod, x, cold_bytes, torch.get_num_threads())
    for _ in range(rounds):  # interleaved so drifting load hits every candidate alike
        for key, call in calls.items():
            samples[key].extend(call_times(call, min_time / rounds, 3))
    med = {k: statistics.median(v) for k, v in samples.items()}
    options: dict = {}  # {pattern: {sparsity: [seconds, fastest kind, {kind: seconds}]}}
    for key, t in med.items():
        if len(key) != 3:
            continue
        pat, s, kind = key
        point = options.setdefault(pat, {}).setdefault(str(s), [t, kind, {}])
        point[2][kind] = t
        if t < point[0]:
            point[:2] = [t, kind]
    return {"dense": med[("dense",)], "torch": med[("torch",)], "options": options}


class _Cache:
    def __init__(self, machine: dict, enabled: bool = True):
        digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir() / f"timings-{digest}.json"
        self.machine = machine
        self.enabled = enabled
        self.entries: dict = {}
        if enabled and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if data.get("machine") == machine:  # the file name is a hash: check what it stands for
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError):
                self.entries = {}
        self.dirty = False

    def get(self, key: str):
        return self.entries.get(key) if self.enabled else None

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.dirty = True

    def save(self) -> None:
        if not (self.enabled and self.dirty):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"machine": self.machine, "entries": self.entries}, indent=0,
                                      sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache directory costs time next run, not correctness
        self.dirty = False


def _model_key(model: nn.Module, names: Sequence[str], example_inputs, baseline: str, served: bool = False) -> str:
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters()]
    flat = example_inputs.values() if isinstance(example_inputs, dict) else (
        [example_inputs] if isinstance(example_inputs, Tensor) else example_inputs)
    ins = [[list(t.shape), str(t.dtype)] for t in flat if isinstance(t, Tensor)]
    text = json.dumps([type(model).__name__, shapes, sorted(names), ins, baseline] + (["served"] if served else []))
    return "model:" + hashlib.sha256(text.encode()).hexdigest()[:24]


class _ZerosLike(nn.Module):
    """Stands in for a prunable layer while the rest of the model is timed: the layer's
    output shape and dtype, no work (a Linear's leading dimensions follow its input)."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, linear_out: Optional[int]):
        super().__init__()
        self.shape, self.dtype, self.linear_out = tuple(shape), dtype, linear_out

    def forward(self, x, *args, **kwargs):
        shape = (*x.shape[:-1], self.linear_out) if self.linear_out is not None else self.shape
        return torch.zeros(shape, dtype=self.dtype, device=x.device)


@torch.no_grad()
def _time_model_and_rest(model: nn.Module, names: Sequence[str], example_inputs, min_time: float,
                         baseline: str, rounds: int = 5, served: Optional[nn.Module] = None) -> tuple:
    """Median seconds of ``model`` (``served`` where given: the same model as it runs) on the
    ``baseline`` path and of a copy of ``model`` whose layers ``names`` return zeros of their output's
    shape (the remainder, measured directly), interleaved over ``rounds``."""
    outputs: dict = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, _n=n: outputs.setdefault(_n, out)) for n in names]
    try:
        call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    rest = copy.deepcopy(model)
    for n, out in outputs.items():
        if not isinstance(out, Tensor):
            continue  # a layer whose output is not one tensor stays: its time counts as remainder
        layer = model.get_submodule(n)
        swap(rest, n, _ZerosLike(out.shape, out.dtype, layer.out_features if isinstance(layer, nn.Linear) else None))
    # stubbed before the baseline conversion: prepacked oneDNN weights cannot be deep-copied
    on_baseline = ((lambda m: best_dense_model(m, example_inputs)) if baseline == "best_dense"
                   else copy.deepcopy)
    model, rest = on_baseline(model if served is None else served).eval(), on_baseline(rest).eval()
    for _ in range(3):
        call_model(model, example_inputs)
        call_model(rest, example_inputs)
    whole, remainder = [], []
    for _ in range(rounds):
        whole.extend(call_times(lambda: call_model(model, example_inputs), min_time / rounds, 2))
        remainder.extend(call_times(lambda: call_model(rest, example_inputs), min_time / rounds, 2))
    return statistics.median(whole), statistics.median(remainder)


def _scaled(lt: LayerTimes, k: float) -> LayerTimes:
    return dataclasses.replace(lt, dense=lt.dense * k, torch=lt.torch * k,
                               options={p: {s: (t * k, kind) for s, (t, kind) in pts.items()}
                                        for p, pts in lt.options.items()},
                               formats={p: {s: {kind: t * k for kind, t in kinds.items()} for s, kinds in pts.items()}
                                        for p, pts in lt.formats.items()})


#: bounds of the isolated -> in-model layer time scale (outside them a measurement went wrong:
#: the scale is clamped rather than trusted)
_SCALE_BOUNDS = (0.5, 1.5)


def time_tables(model: nn.Module, layers: Iterable[str], example_inputs, *, baseline: str = "best_dense",
                patterns: Sequence[str] = DEFAULT_PATTERNS, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                threads: Optional[int] = None, min_time: float = 0.1, rounds: int = 5,
                model_min_time: float = 1.0, cache: bool = True, progress: bool = False,
                fused: Iterable[Sequence[str]] = (), served: Optional[nn.Module] = None,
                smooth: bool = True) -> TimeTables:
    """Measures (or reads from the cache) the time tables of ``layers`` (module names of
    ``model``, Linear or Conv2d) on their inputs from ``example_inputs``.

    ``min_time``: seconds spent timing each candidate of a layer shape (over ``rounds``
    interleaved rounds); ``model_min_time``: seconds timing the whole model.
    ``fused``: groups of Linears of one input (names in ``layers``) that the served model runs as one
    call when they share a format (:func:`sparsert.convert.streamline.fusion_groups`): each group is
    timed as one Linear of their stacked rows too (:attr:`TimeTables.fused`). ``served``: the model
    as it runs (those groups fused), timed whole in place of ``model``; the remainder is timed on
    ``model`` with its layers stubbed. ``smooth``: each layer's times as :func:`smooth_formats` makes
    them (the default; False: the raw medians, as cached).
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    pats = [parse_pattern(p) for p in patterns]
    grid = sorted({float(s) for s in sparsities})
    if any(not 0.0 < s < 1.0 for s in grid):
        raise ValueError(f"sparsities must be in (0, 1), got {grid}")
    names = list(layers)
    start = time.perf_counter()
    with thread_settings(threads) as n_threads:
        machine = machine_key(n_threads)
        store = _Cache(machine, cache)
        mkey = _model_key(model, names, example_inputs, baseline, served is not None)
        # the layers' input shapes for these inputs, remembered so a cached run needs no forward pass
        shapes = store.get("inputs:" + mkey)
        captured: dict = {}

        def capture() -> dict:
            if not captured:
                captured.update(capture_layer_inputs(model, names, example_inputs)[0])
                missing = [n for n in names if n not in captured]
                if missing:
                    raise ValueError(f"example_inputs do not run these layers, so they cannot be timed: "
                                     f"{missing[:5]}")
                store.put("inputs:" + mkey, {n: [list(captured[n].shape), str(captured[n].dtype)] for n in names})
            return captured

        if shapes is None or any(n not in shapes for n in names):
            capture()
        # A model whose prunable weights exceed the last-level cache runs each layer with its weights
        # evicted by the layers before it: time the layers that way too. Hot isolated timing put
        # SmolLM2's 210 decode Linears at 15.6 ms where the model spent ~60 ms in them (the whole
        # difference was then taken for the remainder, which no pruning shrinks).
        cold_bytes = cold_bytes_for(model.get_submodule(n).weight for n in names)
        hits = misses = 0

        def layer_times(name: str, module: nn.Module, input_of: str) -> LayerTimes:
            """``module``'s entry (from the cache or timed) on the input ``input_of`` receives."""
            nonlocal hits, misses
            if captured:
                x = captured[input_of]
            else:  # a stand-in with the remembered shape and dtype (only its shape is read unless timed)
                shape, dtype = shapes[input_of]
                x = torch.empty(shape, dtype=getattr(torch, dtype.replace("torch.", "")), device="meta")
            sig = _signature(name, module, x)
            sig["cold"] = bool(cold_bytes)
            rows, cols = sig["shape"]
            kinds: dict = {}
            base_key = json.dumps({"layer": sig}, sort_keys=True)
            base = store.get(base_key)
            if base is None:
                misses += 1
                x = capture()[input_of]
                timed = _time_layer(module, x, pats, grid, min_time, rounds, cold_bytes)
                base = {"dense": timed["dense"], "torch": timed["torch"]}
                store.put(base_key, base)
                for p, pts in timed["options"].items():
                    store.put(json.dumps({"layer": sig, "pattern": p}, sort_keys=True), pts)
            else:
                hits += 1
            for pat in pats:
                pkey = json.dumps({"layer": sig, "pattern": str(pat)}, sort_keys=True)
                pts = store.get(pkey)
                want = [str(s) for s in _points(pat, grid)]
                try:
                    pat.check(rows, cols)
                except ValueError:
                    continue
                if pts is None or any(s not in pts for s in want):
                    # the pattern's whole row is timed again with the layer's baselines, interleaved, and
                    # replaces both: points timed minutes apart under another load do not compare (scaling
                    # new points by the dense time's change does not fix that: contention slows oneDNN's
                    # threads far more than the sparse kernels)
                    misses += 1
                    x = capture()[input_of]
                    timed = _time_layer(module, x, [pat], grid, min_time, rounds, cold_bytes)
                    pts = {**(pts or {}), **timed["options"].get(str(pat), {})}
                    store.put(pkey, pts)
                    base = {"dense": timed["dense"], "torch": timed["torch"]}
                    store.put(base_key, base)
                kinds[str(pat)] = {float(s): {str(k): float(t) for k, t in
                                              (pts[s][2] if len(pts[s]) > 2 else {pts[s][1]: pts[s][0]}).items()}
                                   for s in want if s in pts}
            if smooth:  # the cache keeps the raw medians; what the planner reads is smoothed
                kinds = smooth_formats(kinds, pool_patterns=streams_its_weight(x.shape))
            entry = fastest_formats(kinds)
            # a layer left dense runs on the faster of the two dense paths (DenseLinear.tune)
            return LayerTimes(name, sig["type"], (rows, cols), tuple(x.shape),
                              min(float(base["dense"]), float(base["torch"])), float(base["torch"]), entry, kinds)

        out: dict = {}
        for i, name in enumerate(names):
            out[name] = layer_times(name, model.get_submodule(name), name)
            if progress:
                print(f"[planner] timed {i + 1}/{len(names)} {name}", flush=True)
        # a group the served model runs as one call, timed as one Linear of the members' stacked rows
        fused_out: dict = {}
        for group in _fusable(model, names, fused):
            fused_out[group] = layer_times("+".join(group), _stacked(model, group), group[0])
        whole = store.get(mkey)
        if whole is None:
            misses += 1
            model_s, rest_s = _time_model_and_rest(model, names, example_inputs, model_min_time, baseline, served=served)
            whole = {"model": model_s, "rest": rest_s}
            store.put(mkey, whole)
        else:
            hits += 1
        store.save()
    model_s, rest_s = float(whole["model"]), float(whole["rest"])
    tables = TimeTables(out, baseline, model_s, n_threads, machine, fused=fused_out)
    isolated = tables.layer_seconds  # (a group the served model fuses counts as its one call)
    # Layers that stream their weights from memory (a decode step: few rows, cold) keep their isolated
    # times, and the remainder is the measured one: in SmolLM2's dense model the 1-token layers ran at
    # ~0.82x their isolated times (each streaming on from the last), but in a pruned model its sparse
    # layers ran at 0.92-1.22x theirs and the layers it left dense at 1.05-1.41x; scaled to the dense
    # model, plans predicted 1.51-1.52x measured 1.25x. At many rows every layer follows the model's
    # scale (MiniLM at 128 tokens: 8.65 ms in the model for 8.70 predicted, against 10.5 alone).
    streaming = cold_bytes > 0 and all(streams_its_weight(lt.input_shape) for lt in out.values())
    scale = 1.0
    if isolated > 0 and not streaming:
        scale = min(max((model_s - rest_s) / isolated, _SCALE_BOUNDS[0]), _SCALE_BOUNDS[1])
        out = {n: _scaled(lt, scale) for n, lt in out.items()}
        fused_out = {g: _scaled(lt, scale) for g, lt in fused_out.items()}
    return TimeTables(out, baseline, model_s, n_threads, machine, time.perf_counter() - start, hits, misses,
                      layer_scale=scale, rest_seconds=rest_s if streaming else None, fused=fused_out)


def _fusable(model: nn.Module, names: Sequence[str], groups: Iterable[Sequence[str]]) -> list:
    """The groups (as tuples) whose members are all timed Linears of one input width and dtype;
    a layer in two groups is an error."""
    out, seen, known = [], set(), set(names)
    for group in groups:
        group = tuple(group)
        if len(group) < 2:
            continue
        if any(n in seen for n in group):
            raise ValueError(f"a layer is in more than one fused group: {group}")
        mods = [model.get_submodule(n) if n in known else None for n in group]
        if any(not isinstance(m, nn.Linear) for m in mods):
            continue  # not all timed Linears: the group is not planned as one
        if len({(m.in_features, m.weight.dtype) for m in mods}) != 1:
            continue
        seen.update(group)
        out.append(group)
    return out


def _stacked(model: nn.Module, group: Sequence[str]) -> nn.Linear:
    """A stand-in for the group's fused Linear (only its shape and bias are read: timed weights are random)."""
    mods = [model.get_submodule(n) for n in group]
    return nn.Linear(mods[0].in_features, sum(m.out_features for m in mods),
                     bias=any(m.bias is not None for m in mods), device="meta")
