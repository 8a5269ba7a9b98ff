"""``sparsert.benchmark``: how much faster and smaller the sparse model is, end to end and per layer.

```python
sparse = sparsert.sparsify(model, example_inputs=inputs)
result = sparsert.benchmark(model, sparse, inputs, threads=2)   # prints the tables
result.speedup, result.sparse.median, result.layers
```

Both models run in this process, on the same inputs, with the same thread
count (torch's and sparsert's), after a warm-up; dense and sparse are timed in
alternating rounds so that a change of machine load hits both alike. Beside
the dense model as given (torch eager), the same model with every Linear on
the best dense path (:class:`~sparsert.nn.DenseLinear`: oneDNN with a
prepacked weight) is timed in the same rounds: ``speedup`` is against eager,
``speedup_vs_best_dense`` against that. The
per-layer table times every Linear/Conv2d (sparse or not) inside the running
model with forward hooks, in a separate pass from the end-to-end timing.

``sweep`` prunes a model at several sparsities, sparsifies and benchmarks
each, and ``SweepResult.plot(path)`` writes a speedup-vs-sparsity PNG
(needs matplotlib, an optional dependency).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import ops as _ops
from .convert import call_model, sparsify
from .convert.timing import capture_layer_inputs
from .convert.plan import _format_table
from .nn import DenseLinear, SparseConv2d, SparseLinear
from .nn.surgery import swap

__all__ = ["benchmark", "best_dense_model", "BenchmarkResult", "LatencyStats", "LayerTiming", "sweep", "SweepResult",
           "model_bytes", "machine_info", "thread_settings"]


@dataclasses.dataclass
class LatencyStats:
    """Per-call latency of one model (seconds) and its throughput."""

    median: float
    p90: float
    mean: float
    min: float
    calls: int
    batch: int

    @classmethod
    def of(cls, samples: Sequence[float], batch: int) -> "LatencyStats":
        s = sorted(samples)
        p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
        return cls(statistics.median(s), p90, statistics.fmean(s), s[0], len(s), batch)

    @property
    def throughput(self) -> float:
        """Items (batch rows) per second at the median latency."""
        return self.batch / self.median if self.median > 0 else float("inf")


@dataclasses.dataclass
class LayerTiming:
    name: str
    type: str
    format: str
    density: float
    dense_time: Optional[float]    # median seconds per call inside the dense model
    sparse_time: Optional[float]   # ... inside the sparse model

    @property
    def speedup(self) -> Optional[float]:
        if not self.dense_time or not self.sparse_time:
            return None
        return self.dense_time / self.sparse_time


@dataclasses.dataclass
class BenchmarkResult:
    dense: LatencyStats
    sparse: LatencyStats
    dense_bytes: int
    sparse_bytes: int
    threads: int
    layers: list
    machine: dict
    best_dense: Optional[LatencyStats] = None  # the dense model on the best dense path (None: not timed)

    @property
    def speedup(self) -> float:
        """Dense (torch eager) median latency / sparse median latency."""
        return self.dense.median / self.sparse.median

    @property
    def speedup_vs_best_dense(self) -> Optional[float]:
        """Best-dense median latency / sparse median latency (None when not timed)."""
        return None if self.best_dense is None else self.best_dense.median / self.sparse.median

    @property
    def size_ratio(self) -> float:
        return self.dense_bytes / self.sparse_bytes if self.sparse_bytes else float("inf")

    def table(self) -> str:
        head = ["model", "median ms", "p90 ms", "items/s", "MB"]
        rows = [["dense", f"{self.dense.median * 1e3:.3f}", f"{self.dense.p90 * 1e3:.3f}",
                 f"{self.dense.throughput:.1f}", f"{self.dense_bytes / 1e6:.2f}"],
                ["sparse", f"{self.sparse.median * 1e3:.3f}", f"{self.sparse.p90 * 1e3:.3f}",
                 f"{self.sparse.throughput:.1f}", f"{self.sparse_bytes / 1e6:.2f}"]]
        if self.best_dense is not None:
            rows.insert(1, ["best dense (oneDNN)", f"{self.best_dense.median * 1e3:.3f}",
                            f"{self.best_dense.p90 * 1e3:.3f}", f"{self.best_dense.throughput:.1f}",
                            f"{self.dense_bytes / 1e6:.2f}"])
        lines = _format_table(head, rows)
        backend = f" ({self.machine['threading']})" if "threading" in self.machine else ""
        vs_best = "" if self.best_dense is None else f" ({self.speedup_vs_best_dense:.2f}x vs best dense)"
        lines.append(f"speedup {self.speedup:.2f}x vs torch eager{vs_best}, size {self.size_ratio:.2f}x smaller; threads={self.threads}{backend}, "
                     f"batch={self.dense.batch}, {self.dense.calls} calls each; {self.machine.get('cpu', '?')}, "
                     f"load {self.machine.get('loadavg', '?')}")
        return "\n".join(lines)

    def layer_table(self) -> str:
        if not self.layers:
            return "(no per-layer timings)"
        head = ["layer", "type", "format", "density", "dense ms", "sparse ms", "speedup"]
        rows = []
        for t in self.layers:
            rows.append([t.name, t.type, t.format, f"{t.density:.3f}",
                         "-" if t.dense_time is None else f"{t.dense_time * 1e3:.3f}",
                         "-" if t.sparse_time is None else f"{t.sparse_time * 1e3:.3f}",
                         "-" if t.speedup is None else f"{t.speedup:.2f}x"])
        lines = _format_table(head, rows)
        sparse = [t for t in self.layers if t.format != "dense" and t.speedup is not None]
        if sparse:
            d = sum(t.dense_time for t in sparse)
            s = sum(t.sparse_time for t in sparse)
            slower = [t.name for t in sparse if t.speedup < 1.0]
            lines.append(f"sparse layers: {d * 1e3:.3f} ms -> {s * 1e3:.3f} ms ({d / s:.2f}x); "
                         + (f"slower than dense: {', '.join(slower)}" if slower else "every sparse layer is faster"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.layer_table()

    def as_dict(self) -> dict:
        return {"dense": dataclasses.asdict(self.dense), "sparse": dataclasses.asdict(self.sparse),
                "best_dense": None if self.best_dense is None else dataclasses.asdict(self.best_dense),
                "speedup": self.speedup, "speedup_vs_best_dense": self.speedup_vs_best_dense, "dense_bytes": self.dense_bytes, "sparse_bytes": self.sparse_bytes,
                "threads": self.threads, "machine": self.machine,
                "layers": [dict(dataclasses.asdict(t), speedup=t.speedup) for t in self.layers]}


def random_pruned_weight(out_features: int, in_features: int, sparsity: float, block=None,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """A random weight with ``sparsity`` of its entries (or of its ``block = (R, C)``
    blocks) zeroed at random: the synthetic layer of the kernel benchmarks."""
    r, c = block or (1, 1)
    nbr, nbc = -(-out_features // r), -(-in_features // c)
    keep = torch.rand(nbr, nbc, generator=generator) >= sparsity
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out_features, :in_features]
    return torch.randn(out_features, in_features, generator=generator) * mask


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and persistent buffers; shared tensors once)."""
    seen = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if not isinstance(t, Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "loadavg": load}
    from . import ops
    if ops.cpu_available():  # which kernels and which threads ran them: both change the numbers
        info["isa"] = ops.cpu_isa()
        info["threading"] = ops.threading_backend()
    return info


@contextlib.contextmanager
def thread_settings(n: Optional[int]):
    """Sets torch's and sparsert's thread counts to ``n`` (None: leave them) for the block."""
    if n is None:
        yield torch.get_num_threads()
        return
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with _ops.num_threads(n):
            yield n
    finally:
        torch.set_num_threads(saved)


def _batch_of(example_inputs) -> int:
    if isinstance(example_inputs, Tensor):
        return int(example_inputs.shape[0]) if example_inputs.dim() else 1
    values = example_inputs.values() if isinstance(example_inputs, dict) else example_inputs
    for v in values:
        if isinstance(v, Tensor) and v.dim():
            return int(v.shape[0])
    return 1


def _layer_modules(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d))}


def _time_layers(model: nn.Module, names: Sequence[str], run: Callable[[], Any], calls: int) -> dict:
    """{name: median seconds per call} of each named module inside ``model`` while ``run`` runs."""
    samples: dict = {n: [] for n in names}
    starts: dict = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def pre(m, args, _n=name):
            starts[_n] = time.perf_counter()

        def post(m, args, out, _n=name):
            samples[_n].append(time.perf_counter() - starts[_n])

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        for _ in range(calls):
            run()
    finally:
        for h in handles:
            h.remove()
    return {n: statistics.median(v) if v else None for n, v in samples.items()}


def _timed_calls(fn: Callable[[], Any], calls: int) -> list:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def best_dense_model(model: nn.Module, example_inputs=None, *, min_time: float = 0.02,
                     rounds: int = 5, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` with every plain ``nn.Linear`` on the best dense path
    (:class:`~sparsert.nn.DenseLinear`, sharing the weights): the baseline the
    benchmarks report beside torch eager.

    With ``example_inputs`` each of those layers is tuned on the input it gets from them
    (:meth:`~sparsert.nn.DenseLinear.tune`: oneDNN prepacked or eager ``F.linear``,
    whichever measures faster at that token count); without, the default rule.
    ``inplace``: swap the layers of ``model`` itself (a copy the caller made) instead."""
    out = model if inplace else copy.deepcopy(model)  # a copy shares nothing with the caller's modules
    names = [n for n, m in out.named_modules() if type(m) is nn.Linear]
    skip = [n + "." for n, m in out.named_modules() if isinstance(m, nn.MultiheadAttention)]
    swapped = []
    for name in names:
        if not any(name.startswith(p) for p in skip):  # MultiheadAttention reads out_proj.weight directly
            swap(out, name, DenseLinear.from_linear(out.get_submodule(name)))
            swapped.append(name)
    if example_inputs is not None and swapped:
        captured, _ = capture_layer_inputs(out, swapped, example_inputs)
        for name, x in captured.items():
            out.get_submodule(name).tune(x, min_time=min_time, rounds=rounds)
    return out


def benchmark(dense_model: nn.Module, sparse_model: nn.Module, example_inputs, threads: Optional[int] = None,
              *, warmup: int = 5, repeats: int = 50, rounds: int = 5, min_time: float = 0.0,
              per_layer: bool = True, layer_repeats: int = 10, best_dense: bool = True,
              verbose: bool = True) -> BenchmarkResult:
    """Times ``dense_model`` and ``sparse_model`` on ``example_inputs`` and prints the tables.

    Args:
        example_inputs: a Tensor, a tuple of positional args or a dict of keyword args.
        threads: torch and sparsert threads during the benchmark (default: the current setting).
        warmup: untimed calls of each model first.
        repeats: timed calls of each model (more if ``min_time`` seconds are not reached),
            spread over ``rounds`` alternating dense/sparse rounds.
        per_layer: also time every Linear/Conv2d inside both models (``layer_repeats`` calls).
        best_dense: also time ``dense_model`` with its Linears on the best dense path
            (:func:`best_dense_model`), in the same rounds.
        verbose: print the result.

    Returns a :class:`BenchmarkResult` (``print`` it; ``.speedup``, ``.layers``, ``.as_dict()``).
    """
    for what, m in (("dense_model", dense_model), ("sparse_model", sparse_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{what} must be an nn.Module, got {type(m).__name__}")
    if repeats < 1 or rounds < 1 or warmup < 0:
        raise ValueError("repeats and rounds must be >= 1 and warmup >= 0")
    batch = _batch_of(example_inputs)
    run_dense = lambda: call_model(dense_model, example_inputs)
    run_sparse = lambda: call_model(sparse_model, example_inputs)
    best_model = best_dense_model(dense_model, example_inputs) if best_dense else None
    run_best = None if best_model is None else (lambda: call_model(best_model, example_inputs))
    with thread_settings(threads) as n_threads, torch.inference_mode():
        for _ in range(warmup):
            run_dense()
            run_sparse()
            if run_best is not None:
                run_best()
        dense_t: list = []
        sparse_t: list = []
        best_t: list = []
        per_round = max(1, -(-repeats // rounds))
        start = time.perf_counter()
        r = 0
        while r < rounds or (time.perf_counter() - start) < min_time:
            dense_t += _timed_calls(run_dense, per_round)
            sparse_t += _timed_calls(run_sparse, per_round)
            if run_best is not None:
                best_t += _timed_calls(run_best, per_round)
            r += 1
        layers = []
        if per_layer:
            layers = _per_layer(dense_model, sparse_model, run_dense, run_sparse, layer_repeats)
    result = BenchmarkResult(LatencyStats.of(dense_t, batch), LatencyStats.of(sparse_t, batch),
                             model_bytes(dense_model), model_bytes(sparse_model), n_threads, layers,
                             machine_info(), LatencyStats.of(best_t, batch) if best_t else None)
    if verbose:
        print(result, flush=True)
    return result


def _per_layer(dense_model, sparse_model, run_dense, run_sparse, calls) -> list:
    sparse_layers = _layer_modules(sparse_model)
    dense_layers = _layer_modules(dense_model)
    names = [n for n in sparse_layers if n in dense_layers]
    plan = getattr(sparse_model, "sparsity_plan", None)
    d_times = _time_layers(dense_model, names, run_dense, calls)
    s_times = _time_layers(sparse_model, names, run_sparse, calls)
    out = []
    for n in names:
        mod = sparse_layers[n]
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            fmt, density = mod.format, mod.density
        else:
            fmt = "dense"
            density = None
            if plan is not None:
                try:
                    density = plan[n].density
                except KeyError:
                    density = None
            if density is None:
                w = mod.weight.detach()
                density = float((w != 0).sum()) / max(w.numel(), 1)
        kind = "Conv2d" if isinstance(mod, (nn.Conv2d, SparseConv2d)) else "Linear"
        out.append(LayerTiming(n, kind, fmt, density, d_times.get(n), s_times.get(n)))
    return out


# --------------------------------------------------------------------------- sweeps
@dataclasses.dataclass
class SweepPoint:
    sparsity: float
    speedup: float
    dense_ms: float
    sparse_ms: float
    formats: dict        # kind -> number of layers in that format


class SweepResult(list):
    """Points of a speedup-vs-sparsity sweep (a list of :class:`SweepPoint`)."""

    def __init__(self, points=(), *, pattern: str = "", threads: int = 1, label: str = ""):
        super().__init__(points)
        self.pattern, self.threads, self.label = pattern, threads, label

    def table(self) -> str:
        rows = [[f"{p.sparsity:.2f}", f"{p.dense_ms:.3f}", f"{p.sparse_ms:.3f}", f"{p.speedup:.2f}x",
                 ", ".join(f"{k}:{v}" for k, v in sorted(p.formats.items()))] for p in self]
        return "\n".join(_format_table(["sparsity", "dense ms", "sparse ms", "speedup", "formats"], rows))

    __str__ = table

    def plot(self, path, title: Optional[str] = None) -> str:
        """Writes a speedup-vs-sparsity PNG to ``path`` (needs matplotlib); returns the path."""
        try:
            import matplotlib
        except ImportError as err:
            raise ImportError("SweepResult.plot needs matplotlib (an optional dependency): "
                              "pip install matplotlib") from err
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            xs = [100 * p.sparsity for p in self]
            ax.plot(xs, [p.speedup for p in self], marker="o", label=self.label or f"{self.pattern}")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("end-to-end speedup vs torch dense (x)")
            ax.set_title(title or f"sparsert speedup, {self.pattern}, {self.threads} threads")
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(str(path), dpi=120)
        finally:
            plt.close(fig)
        return str(path)


def _default_prune(pattern: str):
    def prune(model: nn.Module, sparsity: float) -> nn.Module:
        from .prune import prune as _prune
        return _prune(model, importance="magnitude", pattern=pattern, sparsity=sparsity)
    return prune


def sweep(model: nn.Module, example_inputs, sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95), *,
          pattern: str = "unstructured", prune: Optional[Callable[[nn.Module, float], Any]] = None,
          format: str = "auto", threads: Optional[int] = None, repeats: int = 20, verbose: bool = False,
          **sparsify_kwargs) -> SweepResult:
    """Speedup of the sparsified model at each sparsity.

    Each point prunes a fresh copy of ``model`` (``prune(copy, sparsity)``; by
    default one-shot magnitude pruning with ``pattern`` via ``sparsert.prune``),
    sparsifies it and benchmarks it against the pruned dense copy.
    """
    prune = prune or _default_prune(pattern)
    points = []
    with thread_settings(threads) as n_threads:
        for s in sparsities:
            pruned = copy.deepcopy(model)
            out = prune(pruned, float(s))
            pruned = out if isinstance(out, nn.Module) else pruned
            sparse = sparsify(pruned, format, example_inputs, **sparsify_kwargs)
            r = benchmark(pruned, sparse, example_inputs, repeats=repeats, per_layer=False, verbose=False)
            formats: dict = {}
            for d in sparse.sparsity_plan:
                formats[d.chosen] = formats.get(d.chosen, 0) + 1
            points.append(SweepPoint(float(s), r.speedup, r.dense.median * 1e3, r.sparse.median * 1e3, formats))
            if verbose:
                print(f"[sweep] sparsity {s:.2f}: {r.speedup:.2f}x", flush=True)
    return SweepResult(points, pattern=pattern, threads=n_threads)
