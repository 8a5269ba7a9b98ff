"""``sparsify`` itself: capture each pruned layer's input, time its candidate
formats, swap in the fastest, check the whole model."""

from __future__ import annotations

import copy
import statistics
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .. import ops as _ops
from ..formats import parse_kind
from ..formats.q8bsr import Q8BSR
from ..nn import DenseLinear, Int8DenseLinear, SparseConv2d, SparseLinear
from ..nn.surgery import rollback, swap
from .batchnorm import fold_batchnorm
from .plan import MAX_SPARSE_DENSITY, LayerDecision, SparsityPlan, candidate_formats
from .timing import (call_model, call_times, capture_layer_inputs, close, cold_bytes_for,
                     flatten_tensors, in_model_call, max_rel_err, rms_rel_err, streams_its_weight)

__all__ = ["sparsify", "int8_dense", "DEFAULT_TOKENS", "PRECISIONS", "INT8_SPARSE_FORMAT"]

#: Token count used to time Linear layers when no ``example_inputs`` are given.
DEFAULT_TOKENS = 32
#: Up to this many rows per call, "auto" times a Linear with its weight out of the cache when the
#: model's weights exceed the last-level cache (as a decode step finds it)

#: what ``sparsify(precision=...)`` accepts
PRECISIONS = ("fp32", "int8")
#: the int8 sparse format (the one int8 kernel family: 1x4 blocks, see sparsert.formats.q8bsr)
INT8_SPARSE_FORMAT = "q8bsr1x4"
#: how far an int8 layer may be from the float layer it replaces (relative RMS error, see
#: _int8_close) before sparsify refuses it: a guard against a wrong kernel, not a quality bar
#: (quality is measured on the model's outputs, benchmarks/bench_int8.py --quality)
_INT8_MAX_RMS = 0.25


def _prunable(model: nn.Module) -> tuple:
    """(layers to consider, every Linear/Conv2d name): layers whose weight has zeros."""
    skip_prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    layers, all_layers = [], []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, (SparseLinear, SparseConv2d, DenseLinear, Int8DenseLinear)):
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


def _build(module: nn.Module, kind: str) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_dense(module, kind)
    return SparseLinear.from_dense(module, kind)


def _fresh_dense(module: nn.Module, precision: str = "fp32") -> nn.Module:
    """The dense baseline to time, hook-free and sharing ``module``'s parameters: for a
    Linear the best dense path (:class:`~sparsert.nn.DenseLinear`, what a layer left
    dense becomes; :class:`~sparsert.nn.Int8DenseLinear` under ``precision="int8"``),
    for a Conv2d a plain nn.Conv2d."""
    if isinstance(module, nn.Linear):
        return Int8DenseLinear.from_linear(module) if precision == "int8" else DenseLinear.from_linear(module)
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


def _dense_decision(name: str, module: nn.Module, x: Optional[Tensor], reason: str = "") -> LayerDecision:
    """The one place a layer's record starts: shape, density and bytes, left dense until a
    timed candidate wins."""
    w2d = module.weight.detach().reshape(module.weight.shape[0], -1)
    density = float((w2d != 0).sum()) / max(w2d.numel(), 1)
    nbytes = w2d.numel() * w2d.element_size()
    return LayerDecision(name, type(module).__name__.replace("NonDynamicallyQuantizable", ""), tuple(w2d.shape),
                         None if x is None else tuple(x.shape), density, {}, "dense", None, reason, nbytes, nbytes)


def _decide(name: str, module: nn.Module, x: Optional[Tensor], kinds: list, strict: bool,
            min_time: float, rounds: int, input_note: str, precision: str = "fp32", cold_bytes: int = 0) -> tuple:
    """Times ``kinds`` for one layer; returns (decision, new module or None). ``cold_bytes`` > 0:
    each candidate cycles through copies of itself holding that many bytes (its weights come from
    memory, as in a model whose weights exceed the cache)."""
    built: dict = {}
    for kind in kinds:
        if kind == "dense":
            built[kind] = _fresh_dense(module, precision)
            continue
        try:
            built[kind] = _build(module, kind)
        except (ValueError, TypeError) as err:
            if strict:  # a named format: the user asked for exactly this one
                raise ValueError(f"layer {name!r}: cannot pack its weight as {kind!r}: {err}") from err
    decision = _dense_decision(name, module, x)
    decision.candidates = {k: None for k in built}
    if x is None:
        return decision, built
    _tune_dense(built.get("dense"), x, decision, min_time, rounds)
    with torch.no_grad():
        # int8 candidates are checked against the float layer (the int8 dense one has its own error)
        ref = F.linear(x, module.weight, module.bias) if precision == "int8" else built["dense"](x)
        for kind, mod in list(built.items()):
            if kind == "dense" and precision != "int8":
                continue
            out = mod(x)
            if not (_int8_close(out, ref) if precision == "int8" else close(out, ref, rtol=1e-3)):
                if kind == "dense" and precision == "int8":
                    per_token = _int8_dense_per_token(module, x, ref, out)
                    if per_token is not None:
                        built["dense"], note = per_token
                        decision.reason = f"{decision.reason}; {note}" if decision.reason else note
                        continue
                error = f"relative RMS error {rms_rel_err(out, ref):.2e}" if precision == "int8" else \
                    f"max relative error {max_rel_err(out, ref):.2e}"
                raise RuntimeError(f"layer {name!r}: the {kind} kernel's output differs from the dense layer "
                                   f"({error}); not converting")
        samples: dict = {k: [] for k in built}
        calls = {}
        for kind, mod in built.items():  # called as in a model: weights, input, output out of the core's caches
            calls[kind] = in_model_call(mod, x, cold_bytes, torch.get_num_threads())
        for _ in range(rounds):  # interleaved so drifting machine load hits every candidate alike
            for kind, call in calls.items():
                samples[kind].extend(call_times(call, min_time / rounds, 3))
        del calls
    decision.candidates = {k: statistics.median(v) for k, v in samples.items()}
    decision.reason = "; ".join(r for r in (input_note, decision.reason) if r)
    return decision, built


def _int8_close(out: Tensor, ref: Tensor) -> bool:
    """An int8 layer against its float layer: relative RMS error at most ``_INT8_MAX_RMS``, a guard
    against wrong kernels (indices, scales, offsets: errors of the order of 100%), not a quality
    bar (the model check is). Rounding costs 1-6% RMS on most layers, but one scale per token
    cannot resolve the small channels of tokens with outlier channels: SmolLM2's value projections
    measured 9-13% with sparsert's per-token scales and 13-22% with torch's one scale per call,
    while the whole model in int8 lost 2.6% perplexity (dense) and 8% (50% pruned)."""
    return out.shape == ref.shape and rms_rel_err(out, ref) <= _INT8_MAX_RMS


def _int8_dense_per_token(module: nn.Linear, x: Tensor, ref: Tensor, torch_out: Tensor) -> Optional[tuple]:
    """Where torch's dynamic int8 Linear is too far off (its one activation scale per call, 7-bit,
    drowns the small tokens of a call with outlier tokens or channels: measured on SmolLM2's
    value projections), the int8 dense baseline is sparsert's own int8 kernel over every block of
    the weight (activation scales per token): ``(module, note)``, or None when that is off too."""
    dense = SparseLinear(Q8BSR.from_dense(module.weight.detach()), module.bias)
    if not _int8_close(dense(x), ref):
        return None
    return dense, (f"int8 dense on sparsert's per-token kernel (torch's dynamic int8 was "
                   f"{rms_rel_err(torch_out, ref):.2e} off, RMS)")


def _tune_dense(dense: Optional[nn.Module], x: Tensor, decision: LayerDecision, min_time: float,
                rounds: int) -> None:
    """A Linear's dense baseline runs on whichever dense path measures faster on ``x`` (oneDNN
    prepacked or eager ``F.linear``: neither wins on every shape), so a sparse format is
    compared with, and a layer left dense runs on, the faster one."""
    if not isinstance(dense, DenseLinear):
        return
    times = dense.tune(x, min_time=min_time / 2, rounds=rounds)
    decision.dense_path = dense.tuned_paths[x.numel() // x.shape[-1]]
    if decision.dense_path == "torch" and "onednn" in times:
        note = f"dense on eager F.linear ({times['onednn'] / times['torch']:.2f}x faster than prepacked)"
        decision.reason = f"{decision.reason}; {note}" if decision.reason else note


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
        if times.get("dense") is None:
            return None
        decision.speedup = 1.0
        dense = built["dense"]  # a Linear left dense runs through the best dense path it was timed on
        # (an int8 dense baseline may be a fully dense q8bsr1x4 SparseLinear: _int8_dense_per_token)
        return dense if isinstance(dense, (DenseLinear, Int8DenseLinear, SparseLinear)) else None
    mod = built[decision.chosen]
    decision.sparse_bytes = mod.packed_nbytes
    if times.get("dense") is not None and times.get(decision.chosen):
        decision.speedup = times["dense"] / times[decision.chosen]
    return mod


def sparsify(model: nn.Module, format: str = "auto", example_inputs=None, min_speedup: float = 1.05,
             inplace: bool = False, *, fold_bn: Optional[bool] = None, threads: Optional[int] = None,
             min_time: float = 0.05, rounds: int = 5, check: bool = True, exclude: Sequence[str] = (),
             verbose: bool = False, progress: Optional[bool] = None, precision: str = "fp32") -> nn.Module:
    """Replaces every pruned ``nn.Linear`` / ``nn.Conv2d`` by a ``SparseLinear`` / ``SparseConv2d``.

    Args:
        model: any ``nn.Module`` (plain, ``nn.Sequential``, Hugging Face models, CNNs).
        format: ``"auto"`` (time the candidates per layer, keep the fastest) or a
            kind for every pruned layer: ``"csr"``, ``"bsrRxC"``, ``"nmN:M"``, ``"bitmask16"``
            (Linear only). Linear layers ``"auto"`` leaves dense become
            :class:`~sparsert.nn.DenseLinear` (the best dense path they were timed on).
        example_inputs: what the model is called with (Tensor, tuple of args or dict
            of kwargs). Each layer is timed on its real input captured from it,
            and the converted model is checked against the original on it. Without
            it, Linear layers are timed on ``DEFAULT_TOKENS`` random rows and
            Conv2d layers stay dense under ``"auto"``. When the model's weights exceed
            the last-level cache, Linears called on at most ``STREAMING_MAX_ROWS`` rows
            (a decode step) are timed with their weights out of the cache, as they
            run in the model (``sparsity_plan.cold``).
        min_speedup: ``"auto"`` keeps a layer dense unless the best sparse format is
            at least this much faster. Layers more than 90% nonzero
            (:data:`~sparsert.convert.plan.MAX_SPARSE_DENSITY`) stay dense without timing.
        inplace: convert ``model`` itself (rolled back on error) instead of a deep copy.
        fold_bn: fold BatchNorm2d into the Conv2d before it (default: when ``model`` is in eval mode).
        threads: threads for the timing (default: the current setting).
        min_time, rounds: timing budget per candidate (seconds) and interleaved rounds.
        check: compare the converted model with the original on ``example_inputs``.
        exclude: layer names (or name prefixes ending in ".") to leave dense.
        verbose: print one line per layer (its choice).
        progress: a progress bar over the layers on stderr (``None``: only when stderr is a terminal).
        precision: ``"fp32"`` (default) or ``"int8"``: pruned Linear layers choose between
            the int8 sparse format ``"q8bsr1x4"`` (weights symmetric int8 per output channel,
            activations int8 per token, int32 sums; ``format`` must be ``"auto"`` or
            ``"q8bsr1x4"``) and torch's dynamic int8 dense Linear
            (:class:`~sparsert.nn.Int8DenseLinear`), which every other Linear layer becomes
            too (:func:`int8_dense`). Conv2d layers stay fp32. Each int8 layer is checked
            against its float layer (relative RMS error at most 25%; where torch's dense int8
            fails it, the layer's int8 dense baseline becomes sparsert's own per-token int8
            kernel over the whole weight) and the model against
            the original (per-row cosine similarity: mean >= 0.99, 99% of rows >= 0.9, every
            row >= 0.5): guards
            against wrong kernels, not a quality bar.

    Returns the sparse model with ``.sparsity_plan`` (a :class:`SparsityPlan`; ``print`` it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    forced = None
    if precision == "int8" and format not in ("auto", INT8_SPARSE_FORMAT):
        raise ValueError(f"precision='int8' packs pruned Linear layers as {INT8_SPARSE_FORMAT!r}: use format='auto' "
                         f"or {INT8_SPARSE_FORMAT!r}, got {format!r}")
    if format != "auto":
        forced = format.lower() if isinstance(format, str) else format
        if parse_kind(forced)[0] == "dense":
            raise ValueError("format='dense' converts nothing; use 'auto' or a sparse kind such as 'csr'")
    if not (isinstance(min_speedup, (int, float)) and min_speedup > 0):
        raise ValueError(f"min_speedup must be a positive number, got {min_speedup!r}")
    if fold_bn is None:
        fold_bn = not model.training
    n_threads = threads if threads is not None else _ops.get_num_threads()

    target = model if inplace else copy.deepcopy(model)
    undo: list = []
    saved_threads = torch.get_num_threads()
    try:
        with _ops.num_threads(threads):
            if threads is not None:
                torch.set_num_threads(threads)
            result = _sparsify(target, forced, example_inputs, min_speedup, fold_bn, min_time, rounds,
                               check, exclude, verbose, progress, n_threads, undo, precision)
    except BaseException:
        if inplace:
            rollback(undo)
        raise
    finally:
        if torch.get_num_threads() != saved_threads:
            torch.set_num_threads(saved_threads)
    return result


def _int8_agree(out: Tensor, ref: Tensor) -> bool:
    """The whole-model guard for int8: per output row (last dimension) cosine similarity to the
    float model's, mean >= 0.99, 99% of rows >= 0.9 and every row >= 0.5 (a sign-flipped or
    garbage row, what a wrong kernel gives, is near -1 or 0). An element-wise bound does not fit
    int8: rows the model ignores (padding tokens) and outlier features carry large relative
    errors; so can a rare row (SmolLM2 in int8, +2.6% perplexity: one of 512 logit rows at 0.72,
    the attention-sink position; 1% of rows under 0.94)."""
    if out.shape != ref.shape:
        return False
    if not out.is_floating_point() or out.dim() == 0 or out.numel() == 0:
        return close(out, ref)
    a, b = out.detach().double().reshape(-1, out.shape[-1]), ref.detach().double().reshape(-1, ref.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    both_zero = (a.abs().amax(-1) == 0) & (b.abs().amax(-1) == 0)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return bool(cos.mean() >= 0.99 and torch.quantile(cos, 0.01) >= 0.9 and cos.min() >= 0.5)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == e or (e.endswith(".") and name.startswith(e)) for e in exclude)


def _convert_layer(model, name, captured, example_inputs, forced, plan, min_speedup, min_time, rounds, verbose,
                   undo, precision="fp32", cold_bytes=0) -> None:
    """Times one pruned layer's candidates, swaps in the chosen one and records the decision in ``plan``."""
    module = model.get_submodule(name)
    x = captured.get(name)
    note = ""
    if x is None and example_inputs is not None:
        note = "not run by example_inputs"
    elif x is None:
        x = _default_input(module)
        note = f"timed on {DEFAULT_TOKENS} random rows" if x is not None else "no input shape"
    int8 = precision == "int8" and isinstance(module, nn.Linear)
    if forced is None and _nearly_dense(model, name, module, x, plan, precision, undo, min_time, rounds):
        return
    if int8:
        kinds = ["dense", INT8_SPARSE_FORMAT]
    elif forced is not None:
        kinds = ["dense", forced]
    else:
        w = module.weight.detach()
        kinds = candidate_formats(w.reshape(w.shape[0], -1), linear=isinstance(module, nn.Linear))
    if forced is None and x is None:
        plan.append(_dense_decision(name, module, None, note))
        return
    timed_x = x if (forced is None or example_inputs is not None) else None
    streams = isinstance(module, nn.Linear) and timed_x is not None and streams_its_weight(timed_x.shape)
    layer_cold = cold_bytes if streams else 0
    decision, built = _decide(name, module, timed_x, kinds, forced is not None, min_time, rounds, note,
                              "int8" if int8 else "fp32", layer_cold)
    plan.cold = plan.cold or layer_cold > 0
    new = _choose(decision, built, min_speedup, forced)
    if new is not None:
        swap(model, name, new, undo)
    plan.append(decision)
    if verbose:
        print(f"[sparsify] {name}: {decision.chosen}"
              + (f" ({decision.speedup:.2f}x)" if decision.speedup else ""), flush=True)


def _nearly_dense(model, name, module, x, plan, precision, undo, min_time, rounds) -> bool:
    """Under ``"auto"``, a layer above :data:`MAX_SPARSE_DENSITY` stays dense without timing
    sparse formats (a Linear on the faster dense path for ``x``); returns whether it did."""
    decision = _dense_decision(name, module, None)
    if decision.density <= MAX_SPARSE_DENSITY:
        return False
    decision.reason = (f"nearly dense ({decision.density:.0%} nonzero): a sparse format cannot beat dense above "
                       f"{MAX_SPARSE_DENSITY:.0%}")
    plan.append(decision)
    if isinstance(module, nn.Linear):  # left dense = the best dense path, as for a timed layer
        dense = _fresh_dense(module, "int8" if precision == "int8" else "fp32")
        if x is not None:
            _tune_dense(dense, x, decision, min_time, rounds)
        swap(model, name, dense, undo)
    return True


def _sparsify(model, forced, example_inputs, min_speedup, fold_bn, min_time, rounds, check, exclude,
              verbose, progress, n_threads, undo, precision="fp32") -> nn.Module:
    layers, all_layers = _prunable(model)
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
        layers, _ = _prunable(model)
        layers = [n for n in layers if not _excluded(n, exclude)]

    captured: dict = {}
    if example_inputs is not None:
        captured, _ = capture_layer_inputs(model, layers, example_inputs)

    # A model whose weights exceed the last-level cache runs each layer with its weights evicted by the
    # layers before it: its few-token Linears (a decode step) are timed that way too. Hot, SmolLM2's
    # 1-token layers chose formats that ran 0.92x the dense model in it.
    cold_bytes = cold_bytes_for(m.weight for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    plan = SparsityPlan(format="auto" if forced is None else forced, min_speedup=min_speedup,
                        threads=n_threads, folded=folded)
    bar = tqdm(layers, desc="sparsify", unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        for name in bar:
            bar.set_postfix_str(name, refresh=False)
            _convert_layer(model, name, captured, example_inputs, forced, plan, min_speedup, min_time, rounds,
                           verbose, undo, precision, cold_bytes)
    finally:
        bar.close()
    if precision == "int8":
        int8_dense(model, exclude, _undo=undo)

    if check and reference is not None and not model.training:
        try:
            with torch.no_grad():
                out = call_model(model, example_inputs)
        except Exception as err:
            swapped = ", ".join(d.name for d in plan.converted) or "none"
            raise RuntimeError(f"the converted model no longer runs on example_inputs ({type(err).__name__}: "
                               f"{err}); converted layers: {swapped}. Exclude the layer whose weight "
                               "the model reads directly (exclude=[...]).") from err
        ref_t, out_t = flatten_tensors(reference), flatten_tensors(out)
        agree = _int8_agree if precision == "int8" else (lambda a, b: close(a, b, rtol=1e-2))
        if len(ref_t) != len(out_t) or not all(agree(a, b) for a, b in zip(out_t, ref_t)):
            worst = max((max_rel_err(a, b) for a, b in zip(out_t, ref_t) if a.shape == b.shape), default=float("inf"))
            raise RuntimeError(f"the converted model's outputs differ from the original's on example_inputs "
                               f"(max relative error {worst:.2e})")

    model.sparsity_plan = plan
    return model


def int8_dense(model: nn.Module, exclude: Sequence[str] = (), *, _undo: Optional[list] = None) -> list:
    """Swaps every plain ``nn.Linear`` (and :class:`~sparsert.nn.DenseLinear`) of ``model`` for an
    :class:`~sparsert.nn.Int8DenseLinear` sharing its parameters, in place; returns their names.
    What ``sparsify(precision="int8")`` does to the Linear layers it leaves dense, and what
    restores int8 dense layers after :func:`sparsert.load` (files store them as float weights).
    Layers inside ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly) and
    names in ``exclude`` stay as they are."""
    skip = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    names = [n for n, m in model.named_modules()
             if type(m) in (nn.Linear, DenseLinear) and n and not any(n.startswith(p) for p in skip)
             and not _excluded(n, exclude) and m.weight.dtype == torch.float32 and not m.weight.is_meta]
    for name in names:
        swap(model, name, Int8DenseLinear.from_linear(model.get_submodule(name)), [] if _undo is None else _undo)
    return names
