"""Sparsity patterns: which groups of weights are removed together.

Every prunable weight is viewed as a 2-D matrix ``(rows, cols)``: a Linear
weight is ``(out_features, in_features)``; a Conv weight is flattened to
``(out_channels, in_channels/groups * kh * kw)``. This is the view the sparse
formats (``sparsert.formats``) pack.

Pattern strings:

* ``"unstructured"`` — single weights (same as ``"1x1"``);
* ``"RxC"`` — blocks of R consecutive output rows × C consecutive input
  columns (``"4x1"``, ``"8x1"``, ``"16x1"``, ``"4x4"``, ``"1x4"``). A partial
  block at the right/bottom edge is allowed and scored on its members;
* ``"N:M"`` — in every group of M consecutive input columns of one output row
  at most N weights are kept (``"2:4"``); cols must be divisible by M;
* ``"channel"`` — whole output rows (Linear neurons / Conv2d filters).

Block and channel groups are scored by the *mean* of their members' scores,
so partial edge blocks compete fairly with full ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = ["Pattern", "parse_pattern", "weight_2d_shape"]

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def weight_2d_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix view of a Linear/Conv weight."""
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    return weight.shape[0], int(math.prod(weight.shape[1:]))


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern. ``kind`` is ``"block"``, ``"nm"`` or ``"channel"``.

    For ``"block"`` ``a, b`` are R, C; for ``"nm"`` they are N, M.
    ``"unstructured"`` is the 1x1 block.
    """

    kind: str
    a: int = 1
    b: int = 1

    # ------------------------------------------------------------------ info
    def __str__(self) -> str:
        if self.kind == "channel":
            return "channel"
        if self.kind == "nm":
            return f"{self.a}:{self.b}"
        if (self.a, self.b) == (1, 1):
            return "unstructured"
        return f"{self.a}x{self.b}"

    @property
    def fixed_sparsity(self) -> float | None:
        """Sparsity implied by the pattern itself (N:M), else ``None``."""
        return 1.0 - self.a / self.b if self.kind == "nm" else None

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """(R, C) of a group for a ``rows x cols`` matrix (block/channel only)."""
        if self.kind == "channel":
            return 1, cols
        if self.kind == "block":
            return self.a, self.b
        raise ValueError("N:M patterns have no block shape")

    # ------------------------------------------------------------ validation
    def check(self, rows: int, cols: int, name: str = "layer") -> None:
        """Raise ``ValueError`` if the pattern cannot be applied to the matrix."""
        if self.kind == "block":
            r, c = self.a, self.b
            if r > rows or c > cols:
                raise ValueError(
                    f"pattern {self} does not fit {name}: its weight matrix is "
                    f"{rows}x{cols} (out x in) but a block is {r}x{c}"
                )
        elif self.kind == "nm":
            if cols % self.b != 0:
                raise ValueError(
                    f"pattern {self} does not fit {name}: input dimension {cols} "
                    f"is not a multiple of M={self.b}"
                )

    # ------------------------------------------------------------- grouping
    def group_scores(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate a ``(rows, cols)`` score matrix into block scores.

        Returns ``(group_score, group_size)``, both ``(ceil(rows/R), ceil(cols/C))``.
        """
        rows, cols = scores.shape
        r, c = self.block_shape(rows, cols)
        if (r, c) == (1, 1):
            return scores, torch.ones_like(scores)
        rb, cb = -(-rows // r), -(-cols // c)
        pad = (0, cb * c - cols, 0, rb * r - rows)
        valid = torch.ones_like(scores)
        s = torch.nn.functional.pad(scores.masked_fill(torch.isneginf(scores), 0.0), pad)
        neg = torch.nn.functional.pad(torch.isneginf(scores).to(scores.dtype), pad)
        valid = torch.nn.functional.pad(valid, pad)
        size = valid.reshape(rb, r, cb, c).sum(dim=(1, 3))
        total = s.reshape(rb, r, cb, c).sum(dim=(1, 3))
        any_neg = neg.reshape(rb, r, cb, c).amax(dim=(1, 3)) > 0
        mean = (total / size).masked_fill(any_neg, float("-inf"))
        return mean, size

    def expand(self, keep: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Expand a group-level boolean ``keep`` to a ``(rows, cols)`` mask."""
        r, c = self.block_shape(rows, cols)
        if (r, c) == (1, 1):
            return keep.clone()
        return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols].contiguous()

    def nm_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the N highest-scoring weights of every M consecutive inputs."""
        rows, cols = scores.shape
        n, m = self.a, self.b
        g = scores.reshape(rows, cols // m, m)
        idx = torch.topk(g, n, dim=-1, sorted=False).indices
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(rows, cols)

    # -------------------------------------------------------- verification
    def conforms(self, mask: torch.Tensor) -> bool:
        """True if a ``(rows, cols)`` keep-mask (or a weight's nonzeros) has this structure."""
        mask = mask.reshape(mask.shape[0], -1).bool()
        rows, cols = mask.shape
        if self.kind == "nm":
            if cols % self.b:
                return False
            return bool((mask.reshape(rows, cols // self.b, self.b).sum(-1) <= self.a).all())
        r, c = self.block_shape(rows, cols)
        rb, cb = -(-rows // r), -(-cols // c)
        pad = (0, cb * c - cols, 0, rb * r - rows)
        m = torch.nn.functional.pad(mask.float(), pad)
        v = torch.nn.functional.pad(torch.ones_like(mask, dtype=torch.float32), pad)
        cnt = m.reshape(rb, r, cb, c).sum(dim=(1, 3))
        size = v.reshape(rb, r, cb, c).sum(dim=(1, 3))
        return bool(((cnt == 0) | (cnt == size)).all())


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """Parse a pattern string (see module docstring); raise ``ValueError`` if malformed."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string or Pattern, got {type(pattern).__name__}")
    p = pattern.strip().lower()
    if p in ("unstructured", "element", "1x1"):
        return Pattern("block", 1, 1)
    if p in ("channel", "channels", "neuron", "filter", "row"):
        return Pattern("channel")
    mb = _BLOCK_RE.match(p)
    if mb:
        r, c = int(mb.group(1)), int(mb.group(2))
        if r < 1 or c < 1:
            raise ValueError(f"block pattern {pattern!r} needs positive sizes")
        return Pattern("block", r, c)
    mn = _NM_RE.match(p)
    if mn:
        n, m = int(mn.group(1)), int(mn.group(2))
        if not 1 <= n < m:
            raise ValueError(f"N:M pattern {pattern!r} needs 1 <= N < M")
        return Pattern("nm", n, m)
    raise ValueError(
        f"unknown pattern {pattern!r}: expected 'unstructured', 'RxC' (e.g. '4x1'), "
        "'N:M' (e.g. '2:4') or 'channel'"
    )
