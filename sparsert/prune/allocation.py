"""Non-uniform layer sparsity: how much of each layer to remove for one mean target.

Layers differ in how much they can lose. Two ways to decide, both honouring
the mean sparsity over the allocated layers exactly (weighted by parameter
count, up to whole weights):

* **OWL** (Yin et al. 2024, outlier-weighted layerwise sparsity): a layer's
  outlier ratio is the share of its wanda scores ``|w|·‖x‖`` above ``m`` times
  their mean. Layers with more outliers keep more: sparsities are spread
  linearly over ``[target - lam, target + lam]``, inversely to the ratio, then
  shifted so the mean is the target. As in the paper, the ratio is taken per
  transformer block by default (all layers of block ``i`` share one ratio).
* **sensitivity**: a :class:`SensitivityTable` holds, for every layer, its
  relative output error ``sqrt(tr(dW H dW^T) / tr(W H W^T))`` on the
  calibration inputs after pruning it alone at each sparsity of a grid. The
  allocation spends the pruned weights where they cost the least summed
  squared error. The table is plain data (``to_dict``/``save``/``load``) so a
  planner can reuse it without recomputing.

```python
Pruner(model, importance="sparsegpt", sparsity=0.7, allocation="owl").calibrate(b).step()
table = sensitivity_table(model, layers, batches)      # reusable
Pruner(model, importance="wanda", sparsity=0.7, allocation=table).calibrate(b).step()
```
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .criteria import Wanda
from .patterns import parse_pattern, weight_2d_shape
from .sequential import input_grams

__all__ = [
    "ALLOCATIONS",
    "SensitivityTable",
    "allocate_from_table",
    "block_of",
    "fit_mean",
    "owl_sparsities",
    "sensitivity_grid",
    "sensitivity_table",
    "sensitivity_tables",
]

ALLOCATIONS = ("uniform", "owl", "sensitivity")
_INDEX = re.compile(r"^(.*?\.\d+)(\.|$)")
#: the sparsities a sensitivity table measures unless told otherwise
DEFAULT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: how far a layer may go from the mean target (sensitivity allocation), and no layer above MAX_SPARSITY
DEFAULT_MAX_SHIFT = 0.2
MAX_SPARSITY = 0.99


def block_of(name: str) -> str:
    """The repeated block a layer belongs to: the name up to its first numeric part
    (``"model.layers.5.mlp.up_proj"`` -> ``"model.layers.5"``), else the layer itself."""
    m = _INDEX.match(name)
    return m.group(1) if m else name


def fit_mean(raw: Mapping[str, float], sizes: Mapping[str, int], target: float,
             lo: float = 0.0, hi: float = MAX_SPARSITY) -> dict[str, float]:
    """Shifts ``raw`` sparsities by one constant (clipped to ``[lo, hi]``) so that the
    size-weighted mean is ``target``, then rounds to whole weights with the total
    exactly ``round(target * sum(sizes))``. Returns ``{name: pruned / size}``."""
    names = list(raw)
    if not names:
        return {}
    if not lo <= target <= hi:
        raise ValueError(f"target sparsity {target} is outside the per-layer bounds [{lo}, {hi}]")
    n = torch.tensor([float(sizes[k]) for k in names], dtype=torch.float64)
    r = torch.tensor([float(raw[k]) for k in names], dtype=torch.float64)
    total = float(n.sum())

    def mean(c):
        return float((n * (r + c).clamp(lo, hi)).sum()) / total

    a, b = lo - float(r.max()) - 1.0, hi - float(r.min()) + 1.0
    for _ in range(200):  # bisection: mean() is monotone in the shift
        c = 0.5 * (a + b)
        if mean(c) < target:
            a = c
        else:
            b = c
    s = (r + 0.5 * (a + b)).clamp(lo, hi)
    want = int(round(target * total))
    exact = s * n
    counts = exact.floor()
    cap = (hi * n).floor()
    rest = want - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    i = 0
    while rest != 0 and i < 10 * len(names):
        j = int(order[i % len(names)])
        if rest > 0 and counts[j] < cap[j]:
            counts[j] += 1
            rest -= 1
        elif rest < 0 and counts[j] > math.ceil(lo * float(n[j])):
            counts[j] -= 1
            rest += 1
        i += 1
    return {k: float(counts[i] / n[i]) for i, k in enumerate(names)}


def _sizes(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    out = {}
    for k, m in layers.items():
        rows, cols = weight_2d_shape(m.weight)
        out[k] = rows * cols
    return out


@torch.no_grad()
def owl_sparsities(model: nn.Module, layers: Mapping[str, nn.Module], data: Iterable, target: float, *,
                   lam: float = 0.08, m: float = 5.0, granularity: str = "block", lo: float = 0.0,
                   hi: float = MAX_SPARSITY, progress: bool | None = None) -> dict[str, float]:
    """OWL sparsity per layer (see the module docstring); the weighted mean is ``target``.

    ``granularity``: ``"block"`` (one ratio per repeated block, :func:`block_of`)
    or ``"layer"``.
    """
    if granularity not in ("block", "layer"):
        raise ValueError("granularity must be 'block' or 'layer'")
    if lam < 0 or m <= 0:
        raise ValueError("OWL needs lam >= 0 and m > 0")
    scores = Wanda().scores(model, dict(layers), data, None, progress)
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(block_of(name) if granularity == "block" else name, []).append(name)
    ratio = {}
    for g, members in groups.items():
        s = torch.cat([scores[k].reshape(-1).double() for k in members])
        ratio[g] = float((s > m * s.mean()).double().mean())
    lo_r, hi_r = min(ratio.values()), max(ratio.values())
    spread = hi_r - lo_r
    raw = {}
    for g, members in groups.items():
        t = (ratio[g] - lo_r) / spread if spread > 0 else 0.5
        for k in members:  # most outliers -> least sparsity
            raw[k] = target + lam - 2 * lam * t
    return fit_mean(raw, _sizes(layers), target, lo, hi)


@dataclass
class SensitivityTable:
    """Per-layer relative output error (on calibration inputs) at each sparsity of a grid."""

    sparsities: list[float]
    errors: dict[str, list[float]]
    params: dict[str, int]
    pattern: str = "unstructured"
    method: str = "wanda"
    meta: dict = field(default_factory=dict)

    def error(self, name: str, sparsity: float) -> float:
        """Linear interpolation in the grid (0 error at sparsity 0)."""
        xs = [0.0] + list(self.sparsities)
        ys = [0.0] + list(self.errors[name])
        if sparsity >= xs[-1]:
            return ys[-1]
        for i in range(1, len(xs)):
            if sparsity <= xs[i]:
                t = (sparsity - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        return ys[-1]

    def to_dict(self) -> dict:
        return {"sparsities": self.sparsities, "errors": self.errors, "params": self.params,
                "pattern": self.pattern, "method": self.method, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SensitivityTable":
        return cls([float(s) for s in d["sparsities"]], {k: [float(e) for e in v] for k, v in d["errors"].items()},
                   {k: int(v) for k, v in d["params"].items()}, d.get("pattern", "unstructured"),
                   d.get("method", "wanda"), dict(d.get("meta", {})))

    def save(self, path: "str | Path") -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: "str | Path") -> "SensitivityTable":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _wanda_rows(w: torch.Tensor, h: torch.Tensor, pattern, sparsity: float) -> torch.Tensor:
    """A wanda mask from the Gram diagonal (``‖x_j‖ = sqrt(H_jj)``), per output row."""
    from .select import rowwise_keep

    score = w.abs() * h.diagonal().clamp_min(0).sqrt().reshape(1, -1)
    if pattern.kind == "nm":
        return pattern.nm_mask(score)
    gs, sz = pattern.group_scores(score)
    return pattern.expand(rowwise_keep(gs, sz, sparsity), *w.shape)


@torch.no_grad()
def sensitivity_table(model: nn.Module, layers: Mapping[str, nn.Module], data: Iterable,
                      sparsities: Iterable[float] = DEFAULT_GRID, *,
                      pattern: str = "unstructured", method: str = "wanda", damp: float = 0.01,
                      progress: bool | None = None) -> SensitivityTable:
    """Measures each layer's relative output error when pruned alone, on the unpruned
    model's calibration inputs (one pass over the data for all layers).

    ``method``: ``"wanda"`` (mask only, cheap) or ``"sparsegpt"`` (mask and
    compensating update, as SparseGPT would leave the layer).
    """
    return sensitivity_tables(model, layers, data, sparsities, patterns=(pattern,), method=method, damp=damp,
                              progress=progress)[str(parse_pattern(pattern))]


@torch.no_grad()
def sensitivity_tables(model: nn.Module, layers: Mapping[str, nn.Module], data: Iterable | None,
                       sparsities: Iterable[float] = DEFAULT_GRID, *,
                       patterns: Iterable[str] = ("unstructured",), method: str = "wanda", damp: float = 0.01,
                       progress: bool | None = None, per_token: bool = False) -> dict[str, SensitivityTable]:
    """:func:`sensitivity_table` for several patterns in one pass over the data:
    ``{str(pattern): table}``. A layer a pattern does not fit (``Pattern.check``)
    gets no entry in that pattern's table; an N:M pattern has one sparsity
    (``1 - N/M``), so its row holds that error at every grid point.

    ``data=None``: no calibration data; every layer's Gram matrix is taken as the
    identity, so the error is the relative Frobenius norm of the removed weights
    (magnitude pruning) — a data-free stand-in, cruder than the real inputs.

    ``per_token``: the error is the root mean square over tokens of each token's relative output
    error, instead of the relative error of all outputs together. In a model with massive
    activations (a few tokens whose outputs are orders of magnitude larger, as in SmolLM2's
    ``down_proj``) the total is those tokens' error alone: layers pruned to 95% measured 0.006
    there, and a planner trusting that pruned them all.
    """
    from .sparsegpt import layer_error, sparsegpt_weight

    if method not in ("wanda", "sparsegpt"):
        raise ValueError("method must be 'wanda' or 'sparsegpt'")
    grid = sorted(float(s) for s in sparsities)
    if not grid or grid[0] <= 0 or grid[-1] >= 1:
        raise ValueError("sparsities must be in (0, 1)")
    pats = [parse_pattern(p) for p in patterns]
    if not pats:
        raise ValueError("patterns must name at least one pattern")
    errors: dict[str, dict[str, list[float]]] = {str(p): {} for p in pats}

    def measure(name: str, h: torch.Tensor, h_err: torch.Tensor) -> None:
        """``h``: the Gram the masks (and SparseGPT's updates) come from; ``h_err``: the one the error is measured on."""
        rows, cols = weight_2d_shape(layers[name].weight)
        w = layers[name].weight.detach().reshape(rows, cols).double().cpu()
        if method == "wanda":  # mask only: float32 is plenty for a relative error, and ~2-4x cheaper
            w, h, h_err = w.float(), h.float(), h_err.float()
            den = float(((w @ h_err) * w).sum())
        for pat in pats:
            try:
                pat.check(rows, cols, name)
            except ValueError:
                continue
            errs = []
            for s in grid:
                if pat.kind == "nm" and errs:
                    errs.append(errs[-1])  # N:M sparsity is fixed: the same mask at every grid point
                    continue
                if method == "sparsegpt":
                    new, _ = sparsegpt_weight(w, h, pat, s, damp=damp)
                    errs.append(layer_error(w, new, h_err))
                else:  # tr(dW H dW^T) / tr(W H W^T), dW = the removed weights
                    dw = w * ~_wanda_rows(w, h, pat, s)
                    num = float(((dw @ h_err) * dw).sum())
                    errs.append(math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0)
            errors[str(pat)][name] = errs

    if data is None:
        for name in layers:
            eye = torch.eye(weight_2d_shape(layers[name].weight)[1], dtype=torch.float64)
            measure(name, eye, eye)
    else:
        # no weight changes: one pass serves all
        grams = input_grams(model, dict(layers), data, progress, per_token=per_token)
        grams, err_grams = grams if per_token else (grams, grams)
        for name in layers:
            measure(name, grams[name], err_grams[name])
    sizes = _sizes(layers)
    meta = {} if data is not None else {"data": "none (identity Gram: relative weight error)"}
    if per_token and data is not None:
        meta["error"] = "per token (root mean square of each token's relative error)"
    return {p: SensitivityTable(grid, {k: errs[k] for k in layers if k in errs},
                                {k: sizes[k] for k in layers if k in errs}, p, method, dict(meta))
            for p, errs in errors.items()}


def sensitivity_grid(target: float, max_shift: float = DEFAULT_MAX_SHIFT,
                     hi: float = MAX_SPARSITY) -> tuple[float, ...]:
    """The default grid, extended so that it reaches ``min(hi, target + max_shift)``:
    a table is only trusted where it was measured (see :func:`allocate_from_table`)."""
    top = min(hi, target + max_shift)
    grid = set(DEFAULT_GRID)
    x = DEFAULT_GRID[-1]
    while x + 1e-9 < top:
        x = min(top, round(x + 0.025, 4))
        grid.add(x)
    return tuple(sorted(g for g in grid if 0 < g < 1))


def allocate_from_table(table: SensitivityTable, target: float, names: Iterable[str] | None = None, *,
                        max_shift: float = DEFAULT_MAX_SHIFT, step: float = 0.01, lo: float = 0.0,
                        hi: float = MAX_SPARSITY) -> dict[str, float]:
    """Per-layer sparsities with mean ``target`` that minimise the summed squared
    relative error of the table, each within ``target ± max_shift``.

    Greedy on a grid of ``step``: start every layer at ``target - max_shift``
    and keep removing the ``step`` that costs the least error per weight.
    No layer goes beyond the table's last measured sparsity: past it the
    table knows no error, and an unmeasured step would look free.
    """
    names = list(table.errors if names is None else names)
    missing = [k for k in names if k not in table.errors]
    if missing:
        raise ValueError(f"the sensitivity table has no entry for {missing}")
    hi = min(hi, max(table.sparsities))
    if target > hi + 1e-12:
        raise ValueError(f"target sparsity {target} is beyond the table's measured grid (up to {hi}); "
                         "measure the table at higher sparsities (sensitivity_grid)")
    lo_l, hi_l = max(lo, target - max_shift), min(hi, target + max_shift)
    size = {k: table.params[k] for k in names}
    total = sum(size.values())
    cur = {k: lo_l for k in names}
    need = target * total - lo_l * total

    def cost(k):
        s = cur[k]
        return (table.error(k, min(s + step, hi_l)) ** 2 - table.error(k, s) ** 2) / (size[k] * step)

    heap = [(cost(k), k) for k in names if cur[k] + step <= hi_l + 1e-12]
    heapq.heapify(heap)
    while need > 1e-9 and heap:
        _, k = heapq.heappop(heap)
        inc = min(step, hi_l - cur[k], need / size[k])
        cur[k] += inc
        need -= inc * size[k]
        if cur[k] + 1e-12 < hi_l:
            heapq.heappush(heap, (cost(k), k))
    return fit_mean(cur, size, target, lo, hi)
