"""``sparsify``: swap a pruned model's layers for sparse ones, choosing each layer's format by timing.

```python
sparse = sparsert.sparsify(model, example_inputs=(x,))   # format="auto"
print(sparse.sparsity_plan)                               # per-layer table
```

For every ``nn.Linear`` / ``nn.Conv2d`` whose weight holds zeros, ``"auto"``
times the candidate formats (dense, CSR, every BSR block shape the zero
pattern actually has, N:M when it fits) on the layer's real input, captured
from ``example_inputs`` with forward hooks, and keeps the fastest; a layer
stays dense unless a sparse format beats dense by ``min_speedup``. Each
candidate's output is checked against the dense layer before it can be
chosen, and the whole converted model is checked against the original on
``example_inputs``. The original model is never left half-converted: by
default a copy is converted; with ``inplace=True`` every swap is rolled back
on error.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops as _ops
from .formats import parse_kind
from .nn import SparseConv2d, SparseLinear
from .nn.modules import _has_conv_op

__all__ = ["sparsify", "SparsityPlan", "LayerDecision", "fold_batchnorm", "call_model",
           "candidate_formats"]

#: Token count used to time Linear layers when no ``example_inputs`` are given.
DEFAULT_TOKENS = 32
_NM_CANDIDATES = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))


# --------------------------------------------------------------------------- the plan
@dataclasses.dataclass
class LayerDecision:
    """What ``sparsify`` decided for one layer (times in seconds, medians)."""

    name: str
    type: str                      # "Linear" | "Conv2d"
    shape: tuple                   # the 2-D weight shape (out, in[*kh*kw])
    input_shape: Optional[tuple]   # input the candidates were timed on (None: not timed)
    density: float                 # nonzeros / size of the weight
    candidates: dict               # kind -> median seconds (None when not timed)
    chosen: str                    # kind now in the model ("dense" = the original module kept)
    speedup: Optional[float]       # dense time / chosen time
    reason: str = ""
    dense_bytes: int = 0
    sparse_bytes: int = 0          # bytes of the chosen packed weight (== dense_bytes if dense)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class SparsityPlan(list):
    """The per-layer decisions of :func:`sparsify` (a list of :class:`LayerDecision`).

    ``print(plan)`` / ``plan.table()`` shows them as a table;
    ``plan.as_dicts()`` gives plain data (e.g. for JSON).
    """

    def __init__(self, decisions: Iterable[LayerDecision] = (), *, format: str = "auto",
                 min_speedup: float = 1.0, threads: int = 1, folded: Sequence[tuple] = ()):
        super().__init__(decisions)
        self.format = format
        self.min_speedup = min_speedup
        self.threads = threads
        self.folded = list(folded)   # (conv name, batchnorm name) pairs folded before packing

    def __getitem__(self, key):
        if isinstance(key, str):
            for d in self:
                if d.name == key:
                    return d
            raise KeyError(key)
        return super().__getitem__(key)

    @property
    def converted(self) -> list:
        return [d for d in self if d.chosen != "dense"]

    def as_dicts(self) -> list:
        return [d.as_dict() for d in self]

    def table(self) -> str:
        kinds: list = []
        for d in self:
            for k in d.candidates:
                if k not in kinds:
                    kinds.append(k)
        kinds.sort(key=lambda k: (k != "dense", k))
        head = ["layer", "type", "shape", "density", *[f"{k} ms" for k in kinds], "chosen", "speedup", "note"]
        rows = []
        for d in self:
            times = [("-" if d.candidates.get(k) is None else f"{d.candidates[k] * 1e3:.3f}")
                     if k in d.candidates else "" for k in kinds]
            rows.append([d.name, d.type, "x".join(map(str, d.shape)), f"{d.density:.3f}", *times, d.chosen,
                         "-" if d.speedup is None else f"{d.speedup:.2f}x", d.reason])
        dense_b = sum(d.dense_bytes for d in self)
        sparse_b = sum(d.sparse_bytes for d in self)
        lines = _format_table(head, rows)
        lines.append(f"{len(self.converted)}/{len(self)} layers sparse; their weights {dense_b / 1e6:.2f} MB -> "
                     f"{sparse_b / 1e6:.2f} MB; format={self.format}, min_speedup={self.min_speedup}, "
                     f"threads={self.threads}")
        if self.folded:
            lines.append("folded BatchNorm: " + ", ".join(f"{b} -> {c}" for c, b in self.folded))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    __repr__ = list.__repr__


def _format_table(head: list, rows: list) -> list:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 or i == len(r) - 1 else str(x).rjust(w)
                              for i, (x, w) in enumerate(zip(r, widths)))
    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out.extend(fmt(r) for r in rows)
    return [line.rstrip() for line in out]


# --------------------------------------------------------------------------- helpers
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


def _flatten_tensors(out) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten_tensors(v)]
    return []


def _close(a: Tensor, b: Tensor, rtol: float = 1e-3) -> bool:
    """fp32 agreement relative to the output's scale (reordered sums differ in the last bits)."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(((a - b).abs() <= rtol * scale + 1e-6).all())


def _max_rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / max(scale, 1e-30) if b.numel() else 0.0


def _median_time(fn: Callable[[], Any], min_time: float, min_calls: int) -> list:
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


def _kernel_blocks() -> list:
    """Block shapes the native kernels have a fast (non-reference) kernel for."""
    try:
        from ._ext import native
        kernels = native().kernels()
    except ImportError:
        return [(4, 1)]
    return sorted({tuple(k["block"]) for k in kernels
                   if k["supported"] and k["kind"] != "reference" and tuple(k["block"]) not in ((0, 0), (1, 1))})


def candidate_formats(w2d: Tensor, *, max_fill: float = 1.1) -> list:
    """Formats worth timing for a pruned 2-D weight: dense, CSR, each BSR block
    shape the zero pattern actually has (stored / nonzero <= ``max_fill``) and
    N:M patterns the weight satisfies (when they store at most half the weight and
    at most 1.25x its nonzeros)."""
    w = w2d.detach()
    nnz = int((w != 0).sum())
    kinds = ["dense", "csr"]
    if nnz == 0:
        return kinds
    rows, cols = w.shape
    nz = w != 0
    for r, c in _kernel_blocks():
        nbr, nbc = -(-rows // r), -(-cols // c)
        padded = torch.nn.functional.pad(nz, (0, nbc * c - cols, 0, nbr * r - rows))
        blocks = int(padded.reshape(nbr, r, nbc, c).any(3).any(1).sum())
        if blocks * r * c <= max_fill * nnz:
            kinds.append(f"bsr{r}x{c}")
    for n, m in _NM_CANDIDATES:
        groups = -(-cols // m)
        padded = torch.nn.functional.pad(nz, (0, groups * m - cols)).reshape(rows, groups, m)
        if rows and int(padded.sum(-1).max()) <= n and n * 2 <= m and n / m <= 1.25 * nnz / w.numel():
            # the smallest n that fits for this m is enough
            if not any(k.startswith("nm") and k.endswith(f":{m}") for k in kinds):
                kinds.append(f"nm{n}:{m}")
    return kinds


def _parent_and_attr(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _swap(model: nn.Module, name: str, new: nn.Module, undo: list) -> None:
    parent, attr = _parent_and_attr(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    undo.append((parent, attr, old))


def _rollback(undo: list) -> None:
    for parent, attr, old in reversed(undo):
        setattr(parent, attr, old)
    undo.clear()


# --------------------------------------------------------------------------- BatchNorm folding
def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` in eval mode (zeros of the weight stay zeros)."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        w = conv.weight.to(torch.float64) * scale.reshape(-1, 1, 1, 1)
        b = shift if conv.bias is None else conv.bias.to(torch.float64) * scale + shift
        fused.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        fused.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
            and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _bn_pairs_from_hooks(model: nn.Module, run: Callable[[], Any]) -> list:
    """(conv name, bn name) where the BatchNorm's input is exactly the conv's output tensor,
    that conv output is used by nothing else, and each module runs once."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict = {}
    calls: dict = {}
    pairs = []
    handles = []

    def conv_hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        produced[id(out)] = (mod, out)

    def bn_hook(mod, args):
        calls[mod] = calls.get(mod, 0) + 1
        src = produced.get(id(args[0])) if args else None
        if src is not None and src[1] is args[0]:
            pairs.append((src[0], mod))

    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(conv_hook))
        elif type(m) is nn.BatchNorm2d:
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    seen = set()
    result = []
    for conv, bn in pairs:
        if calls.get(conv) == 1 and calls.get(bn) == 1 and conv not in seen and _foldable(conv, bn):
            seen.add(conv)
            result.append((names[conv], names[bn]))
    return result


def _bn_pairs_from_structure(model: nn.Module) -> list:
    """(conv name, bn name) for a Conv2d directly followed by a BatchNorm2d inside an nn.Sequential."""
    result = []
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            items = list(parent._modules.items())
            for (a, conv), (b, bn) in zip(items, items[1:]):
                if _foldable(conv, bn):
                    prefix = f"{pname}." if pname else ""
                    result.append((prefix + a, prefix + b))
    return result


def fold_batchnorm(model: nn.Module, example_inputs=None, *, _undo: Optional[list] = None) -> list:
    """Folds every eval-mode BatchNorm2d that directly follows a Conv2d into it
    (the conv is replaced by a fused copy and the BatchNorm by ``nn.Identity``).

    With ``example_inputs`` the pairs are found by running the model (the
    BatchNorm's input must be the conv's output tensor); without, only
    Conv2d -> BatchNorm2d neighbours inside an ``nn.Sequential`` are folded.
    Returns the folded ``(conv name, bn name)`` pairs.
    """
    undo = [] if _undo is None else _undo
    if example_inputs is not None:
        with torch.no_grad():
            pairs = _bn_pairs_from_hooks(model, lambda: call_model(model, example_inputs))
    else:
        pairs = _bn_pairs_from_structure(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _swap(model, conv_name, _fold_conv_bn(conv, bn), undo)
        _swap(model, bn_name, nn.Identity(), undo)
    return pairs


# --------------------------------------------------------------------------- sparsify
def _prunable(model: nn.Module, conv_op: bool) -> tuple:
    """(layers to consider, every Linear/Conv2d name): layers whose weight has zeros."""
    skip_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    layers, all_layers = [], []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, (SparseLinear, SparseConv2d)):
            continue
        all_layers.append(name)
        if any(name.startswith(p) for p in skip_prefixes):
            continue  # MultiheadAttention reads out_proj.weight directly
        w = getattr(m, "weight", None)
        if not isinstance(w, Tensor) or not w.dtype.is_floating_point or w.is_meta:
            continue
        if not bool((w == 0).any()):
            continue
        layers.append(name)
    return layers, all_layers


def _capture_inputs(model: nn.Module, names: list, example_inputs) -> tuple:
    """Runs the model once; returns ({name: first input tensor}, model output)."""
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


def _build(module: nn.Module, kind: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_dense(module, kind)
    return SparseLinear.from_dense(module, kind)


def _fresh_dense(module: nn.Module) -> nn.Module:
    """A hook-free nn.Linear/nn.Conv2d sharing ``module``'s parameters (the dense baseline to time)."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        clean = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, module.bias is not None,
                          module.padding_mode, device="meta", dtype=w.dtype)
    else:
        clean = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta",
                          dtype=w.dtype)
    clean.weight = w
    if module.bias is not None:
        clean.bias = module.bias
    return clean


def _default_input(module: nn.Module) -> Optional[Tensor]:
    if isinstance(module, nn.Linear):
        return torch.randn(DEFAULT_TOKENS, module.in_features, device=module.weight.device)
    return None  # a conv's spatial size cannot be guessed


def _decide(name: str, module: nn.Module, x: Optional[Tensor], kinds: list, strict: bool,
            min_time: float, rounds: int, input_note: str) -> tuple:
    """Times ``kinds`` for one layer; returns (decision, new module or None)."""
    w = module.weight.detach()
    w2d = w.reshape(w.shape[0], -1)
    density = float((w2d != 0).sum()) / max(w2d.numel(), 1)
    dense_bytes = w2d.numel() * w2d.element_size()
    built: dict = {}
    for kind in kinds:
        if kind == "dense":
            built[kind] = _fresh_dense(module)
            continue
        try:
            built[kind] = _build(module, kind)
        except (ValueError, TypeError) as err:
            if strict:  # a named format: the user asked for exactly this one
                raise ValueError(f"layer {name!r}: cannot pack its weight as {kind!r}: {err}") from err
    decision = LayerDecision(name, type(module).__name__.replace("NonDynamicallyQuantizable", ""),
                             tuple(w2d.shape), None if x is None else tuple(x.shape), density,
                             {k: None for k in built}, "dense", None, "", dense_bytes, dense_bytes)
    if x is None:
        return decision, built
    with torch.no_grad():
        ref = built["dense"](x)
        for kind, mod in built.items():
            if kind == "dense":
                continue
            out = mod(x)
            if not _close(out, ref):
                raise RuntimeError(f"layer {name!r}: the {kind} kernel's output differs from the dense layer "
                                   f"(max relative error {_max_rel_err(out, ref):.2e}); not converting")
        samples: dict = {k: [] for k in built}
        for mod in built.values():  # warm-up (first calls allocate, page in the weights)
            mod(x)
            mod(x)
        for _ in range(rounds):  # interleaved so drifting machine load hits every candidate alike
            for kind, mod in built.items():
                samples[kind].extend(_median_time(lambda: mod(x), min_time / rounds, 3))
    decision.candidates = {k: statistics.median(v) for k, v in samples.items()}
    decision.reason = input_note
    return decision, built


def _choose(decision: LayerDecision, built: dict, min_speedup: float, forced: Optional[str]) -> Optional[nn.Module]:
    times = decision.candidates
    if forced is not None:
        decision.chosen = forced
    else:
        sparse = {k: t for k, t in times.items() if k != "dense" and t is not None}
        if times.get("dense") is None or not sparse:
            decision.reason = decision.reason or "not timed"
            return None
        best = min(sparse, key=sparse.get)
        if times["dense"] / sparse[best] >= min_speedup:
            decision.chosen = best
        else:
            decision.reason = (f"best sparse ({best}) only {times['dense'] / sparse[best]:.2f}x"
                               + (f"; {decision.reason}" if decision.reason else ""))
    if decision.chosen == "dense":
        if times.get("dense") is not None:
            decision.speedup = 1.0
        return None
    mod = built[decision.chosen]
    decision.sparse_bytes = mod.packed_nbytes
    if times.get("dense") is not None and times.get(decision.chosen):
        decision.speedup = times["dense"] / times[decision.chosen]
    return mod


def sparsify(model: nn.Module, format: str = "auto", example_inputs=None, min_speedup: float = 1.05,
             inplace: bool = False, *, fold_bn: Optional[bool] = None, threads: Optional[int] = None,
             min_time: float = 0.05, rounds: int = 5, check: bool = True, exclude: Sequence[str] = (),
             verbose: bool = False) -> nn.Module:
    """Replaces every pruned ``nn.Linear`` / ``nn.Conv2d`` by a ``SparseLinear`` / ``SparseConv2d``.

    Args:
        model: any ``nn.Module`` (plain, ``nn.Sequential``, Hugging Face models, CNNs).
        format: ``"auto"`` (time the candidates per layer, keep the fastest) or a
            kind for every pruned layer: ``"csr"``, ``"bsrRxC"``, ``"nmN:M"``.
        example_inputs: what the model is called with (Tensor, tuple of args or dict
            of kwargs). Each layer is timed on its real input captured from it,
            and the converted model is checked against the original on it. Without
            it, Linear layers are timed on ``DEFAULT_TOKENS`` random rows and
            Conv2d layers stay dense under ``"auto"``.
        min_speedup: ``"auto"`` keeps a layer dense unless the best sparse format is
            at least this much faster.
        inplace: convert ``model`` itself (rolled back on error) instead of a deep copy.
        fold_bn: fold BatchNorm2d into the Conv2d before it (default: when ``model`` is in eval mode).
        threads: threads for the timing (default: the current setting).
        min_time, rounds: timing budget per candidate (seconds) and interleaved rounds.
        check: compare the converted model with the original on ``example_inputs``.
        exclude: layer names (or name prefixes ending in ".") to leave dense.

    Returns the sparse model with ``.sparsity_plan`` (a :class:`SparsityPlan`; ``print`` it).
    Conv2d layers stay dense while this build has no ``sparsert.ops.conv2d``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    forced = None
    if format != "auto":
        forced = format.lower() if isinstance(format, str) else format
        if parse_kind(forced)[0] == "dense":
            raise ValueError("format='dense' converts nothing; use 'auto' or a sparse kind such as 'csr'")
    if not (isinstance(min_speedup, (int, float)) and min_speedup > 0):
        raise ValueError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if fold_bn is None:
        fold_bn = not model.training
    n_threads = threads if threads is not None else _ops.get_num_threads()
    conv_op = _has_conv_op()

    target = model if inplace else copy.deepcopy(model)
    undo: list = []
    saved_threads = torch.get_num_threads()
    try:
        with _ops.num_threads(threads):
            if threads is not None:
                torch.set_num_threads(threads)
            result = _sparsify(target, forced, example_inputs, min_speedup, fold_bn, conv_op, min_time, rounds,
                               check, exclude, verbose, n_threads, undo)
    except BaseException:
        if inplace:
            _rollback(undo)
        raise
    finally:
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)
    return result


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == e or (e.endswith(".") and name.startswith(e)) for e in exclude)


def _sparsify(model, forced, example_inputs, min_speedup, fold_bn, conv_op, min_time, rounds, check, exclude,
              verbose, n_threads, undo) -> nn.Module:
    layers, all_layers = _prunable(model, conv_op)
    layers = [n for n in layers if not _excluded(n, exclude)]
    if not layers:
        what = (f"none of its {len(all_layers)} Linear/Conv2d layers has zero weights" if all_layers
                else "it has no nn.Linear or nn.Conv2d layer")
        raise ValueError(f"nothing to sparsify in {type(model).__name__}: {what}. Prune it first "
                         "(sparsert.prune) so the pruned weights are exact zeros.")

    reference = None
    if example_inputs is not None:
        try:
            with torch.no_grad():
                reference = call_model(model, example_inputs)
        except Exception as err:
            raise ValueError(f"example_inputs do not run the model ({type(model).__name__}): "
                             f"{type(err).__name__}: {err}") from err

    folded = []
    if fold_bn:
        folded = fold_batchnorm(model, example_inputs, _undo=undo)
        layers, _ = _prunable(model, conv_op)
        layers = [n for n in layers if not _excluded(n, exclude)]

    captured: dict = {}
    if example_inputs is not None:
        captured, _ = _capture_inputs(model, layers, example_inputs)

    plan = SparsityPlan(format="auto" if forced is None else forced, min_speedup=min_speedup,
                        threads=n_threads, folded=folded)
    for name in layers:
        module = model.get_submodule(name)
        is_conv = isinstance(module, nn.Conv2d)
        x = captured.get(name)
        note = ""
        if x is None and example_inputs is not None:
            note = "not run by example_inputs"
        elif x is None:
            x = _default_input(module)
            note = f"timed on {DEFAULT_TOKENS} random rows" if x is not None else "no input shape"
        if is_conv and not conv_op:
            w = module.weight.detach()
            w2d = w.reshape(w.shape[0], -1)
            dens = float((w2d != 0).sum()) / max(w2d.numel(), 1)
            nbytes = w2d.numel() * w2d.element_size()
            plan.append(LayerDecision(name, "Conv2d", tuple(w2d.shape), None if x is None else tuple(x.shape),
                                      dens, {}, "dense", None, "no sparse conv op in this build", nbytes, nbytes))
            continue
        if forced is not None:
            kinds = ["dense", forced]
        else:
            w = module.weight.detach()
            kinds = candidate_formats(w.reshape(w.shape[0], -1))
        if forced is None and x is None:
            w = module.weight.detach()
            w2d = w.reshape(w.shape[0], -1)
            dens = float((w2d != 0).sum()) / max(w2d.numel(), 1)
            nbytes = w2d.numel() * w2d.element_size()
            plan.append(LayerDecision(name, type(module).__name__, tuple(w2d.shape), None, dens, {}, "dense",
                                      None, note, nbytes, nbytes))
            continue
        decision, built = _decide(name, module, x if (forced is None or example_inputs is not None) else None,
                                  kinds, forced is not None, min_time, rounds, note)
        new = _choose(decision, built, min_speedup, forced)
        if new is not None:
            _swap(model, name, new, undo)
        plan.append(decision)
        if verbose:
            print(f"[sparsify] {name}: {decision.chosen}"
                  + (f" ({decision.speedup:.2f}x)" if decision.speedup else ""), flush=True)

    if check and reference is not None and not model.training:
        try:
            with torch.no_grad():
                out = call_model(model, example_inputs)
        except Exception as err:
            swapped = ", ".join(d.name for d in plan.converted) or "none"
            raise RuntimeError(f"the converted model no longer runs on example_inputs ({type(err).__name__}: "
                               f"{err}); converted layers: {swapped}. Exclude the layer whose weight "
                               "the model reads directly (exclude=[...]).") from err
        ref_t, out_t = _flatten_tensors(reference), _flatten_tensors(out)
        if len(ref_t) != len(out_t) or not all(_close(a, b, rtol=1e-2) for a, b in zip(out_t, ref_t)):
            worst = max((_max_rel_err(a, b) for a, b in zip(out_t, ref_t) if a.shape == b.shape), default=float("inf"))
            raise RuntimeError(f"the converted model's outputs differ from the original's on example_inputs "
                               f"(max relative error {worst:.2e})")

    model.sparsity_plan = plan
    return model
