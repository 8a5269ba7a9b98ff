"""What ``sparsify`` tries and what it chose: candidate formats per layer and the
per-layer decisions (:class:`SparsityPlan`)."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .. import ops as _ops
from ..formats import kind_name, parse_kind
from ..formats.rowgroup import KBLOCK

__all__ = ["LayerDecision", "SparsityPlan", "candidate_formats", "NM_CANDIDATES", "MAX_SPARSE_DENSITY"]

#: N:M patterns ``candidate_formats`` checks a weight against
NM_CANDIDATES = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))


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
    dense_path: Optional[str] = None  # the dense Linear's faster path where both were timed: "onednn" | "torch"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class SparsityPlan(list):
    """The per-layer decisions of :func:`sparsify` (a list of :class:`LayerDecision`).

    ``print(plan)`` / ``plan.table()`` shows them as a table;
    ``plan.as_dicts()`` gives plain data (e.g. for JSON).
    """

    def __init__(self, decisions: Iterable[LayerDecision] = (), *, format: str = "auto",
                 min_speedup: float = 1.0, threads: int = 1, folded: Sequence[tuple] = (), cold: bool = False):
        super().__init__(decisions)
        self.format = format
        #: few-token layers were timed with their weights out of the cache (the model's weights exceed it)
        self.cold = cold
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
        if self.cold:
            lines.append("few-token layers timed with their weights out of the cache: the model's weights exceed the "
                         "last-level cache, so in a call each layer reads its weights from memory")
        if self.folded:
            lines.append("folded BatchNorm: " + ", ".join(f"{b} -> {c}" for c, b in self.folded))
        return "\n".join(lines)

    def kept_dense_note(self) -> str:
        """One line on the layers ``sparsify`` left dense and why ("" when every layer is sparse):
        how many were timed and not ``min_speedup`` faster (with the best ratio found), and
        how many could not be timed."""
        slow = [d for d in self if d.chosen == "dense" and d.candidates.get("dense") is not None
                and any(k != "dense" and t is not None for k, t in d.candidates.items())]
        untimed = [d for d in self if d.chosen == "dense" and d not in slow]
        parts = []
        if slow:
            best = [d.candidates["dense"] / min(t for k, t in d.candidates.items() if k != "dense" and t is not None)
                    for d in slow]
            parts.append(f"{len(slow)} of {len(self)} pruned layers kept dense: no sparse format was "
                         f"{self.min_speedup:g}x faster at their density "
                         f"({min(d.density for d in slow):.2f}-{max(d.density for d in slow):.2f}; best sparse "
                         f"{min(best):.2f}x-{max(best):.2f}x of dense)")
        if untimed:
            parts.append(f"{len(untimed)} kept dense untimed ({untimed[0].reason or 'no input'})")
        return "; ".join(parts)

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


def _kernel_blocks() -> list:
    """Block shapes the native kernels have a fast (non-reference) kernel for."""
    try:
        kernels = _ops.cpu_kernels()
    except ImportError:
        return [(4, 1)]
    return sorted({tuple(k["block"]) for k in kernels
                   if k["supported"] and k["kind"] != "reference" and tuple(k["block"]) not in ((0, 0), (1, 1))})


#: densities at which ``candidate_formats`` times the bitmask format (it reads
#: density * 4 + 1/8 bytes per weight: below ~20% CSR reads less)
BITMASK_DENSITIES = (0.2, 0.8)
#: above this density ``sparsify(format="auto")`` keeps a layer dense without timing sparse
#: formats: they would do >= 90% of dense's FMAs while reading more bytes (value + index per
#: nonzero), so any measured win is timing noise (it converted nearly dense layers on noise)
MAX_SPARSE_DENSITY = 0.9


def candidate_formats(w2d: Tensor, *, max_fill: float = 1.1, linear: bool = True) -> list:
    """Formats worth timing for a pruned 2-D weight: dense, CSR, each BSR block
    shape the zero pattern actually has (stored / nonzero <= ``max_fill``),
    N:M patterns the weight satisfies (when they store at most half the weight and
    at most 1.25x its nonzeros) and, for a Linear layer at moderate density
    (:data:`BITMASK_DENSITIES`), the bitmask16 and rowgroup4 formats (and rowgroup4 in
    column blocks of :data:`~sparsert.formats.rowgroup.KBLOCK` when there are more columns)."""
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
            kinds.append(kind_name("bsr", r, c))
    for n, m in NM_CANDIDATES:
        groups = -(-cols // m)
        padded = torch.nn.functional.pad(nz, (0, groups * m - cols)).reshape(rows, groups, m)
        if rows and int(padded.sum(-1).max()) <= n and n * 2 <= m and n / m <= 1.25 * nnz / w.numel():
            # the smallest n that fits for this m is enough
            if not any(parse_kind(k)[0] == "nm" and parse_kind(k)[2] == m for k in kinds):
                kinds.append(kind_name("nm", n, m))
    low, high = BITMASK_DENSITIES
    if linear and low <= nnz / w.numel() <= high and _ops.cpu_available():
        kinds += ["bitmask16", "rowgroup4"]
        if cols > KBLOCK:  # column blocks (x in L1 at many tokens); one block otherwise, = rowgroup4
            kinds.append(kind_name("rowgroup", KBLOCK))
    return kinds
