"""The int8 sparse Linear op ``torch.ops.sparsert.linear_q8bsr``: its schema, fake,
pure-torch default and native CPU kernel, and the public :func:`linear_q8_arrays`.

``y = act(w_scale[n] * x_scale[t] * (xq @ Wq.T)[t, n] + bias[n])`` for an int8 weight
in 1x4 blocks (:class:`sparsert.formats.q8bsr.Q8BSR`) and ``x`` quantised per token
to symmetric int8 (:func:`quantize_tokens`, the kernels' rule, repeated in torch).
Inference only: the op has no autograd formula (an int8 layer is not trained).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .._ext import native
from ..formats._common import decode_indices, index_bits
from ..formats.base import dense_from_blocks
from ..formats.q8bsr import BLOCK_COLS, MAX_COLS, QMAX
from ..formats.rowgroup import GROUP_ROWS, PATTERNS, pattern_counts
from . import epilogue
from .backends.cpu import Validated, _remembered, _version, eager_cpu_call, run_token_rows_kernel
from .schema import _activation, _int, _tensor

__all__ = ["linear_q8bsr", "linear_q8bsr_torch", "linear_q8_arrays", "quantize_tokens", "check_q8_arrays",
           "int8_kernels"]

_OP = "sparsert::linear_q8bsr"


def quantize_tokens(x2: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8, scales float32) of a 2-D float32 ``x``, per row: ``scale = amax / 127``,
    ``q = clamp(round_half_even(x * (127 / amax)), -127, 127)``; amax 0 gives scale 0
    and q 0, a row with NaN/inf scale NaN and q 0. The kernels' rule exactly
    (``quantize_rows_s8`` in csrc/spmm_int8/spmm_int8.h)."""
    x2 = x2.to(torch.float32)
    a = x2.abs()
    finite = torch.isfinite(x2).all(-1) if x2.shape[-1] else torch.ones(x2.shape[0], dtype=torch.bool)
    amax = torch.where(finite, a.amax(-1) if x2.shape[-1] else torch.zeros(x2.shape[0]), torch.zeros(()))
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros(()))
    q = torch.round(torch.where(finite[:, None], x2, torch.zeros(())) * inv[:, None]).clamp(-QMAX, QMAX)
    scales = torch.where(finite, amax / QMAX, torch.full((), float("nan")))
    return q.to(torch.int8), scales


def _check_args(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads):
    _tensor(_OP, "x", x, 1)
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("qblocks", qblocks), ("scales", scales)):
        _tensor(_OP, name, t)
    if bias is not None:
        _tensor(_OP, "bias", bias)
    _int(_OP, "out_features", out_features, 0)
    _activation(_OP, activation)
    _int(_OP, "num_threads", num_threads, 0)


def linear_q8bsr_torch(x: Tensor, row_ptr: Tensor, col_indices: Tensor, qblocks: Tensor, scales: Tensor,
                       out_features: int, bias: Optional[Tensor], activation: int) -> Tensor:
    """Pure torch, the same arithmetic as the kernels: per-token quantisation, an exact
    integer product (float64 holds every int32 sum exactly), then ``acc * (x_scale *
    w_scale) + bias`` rounded once to float32 from float64 (the kernels' fused multiply-add
    rounds once from the exact value: the two agree except when float64 rounding of the
    sum lands on a float32 tie, i.e. to within 1 ulp)."""
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    q, xs = quantize_tokens(x2)
    wq = dense_from_blocks(row_ptr, col_indices, qblocks.to(torch.float64), out_features, cols, 1, BLOCK_COLS)
    acc = q.to(torch.float64) @ wq.T  # exact: |sums| < 2^31
    scale = (xs[:, None] * scales.to(torch.float32)[None, :]).to(torch.float64)
    y = acc.to(torch.float32).to(torch.float64) * scale
    if bias is not None:
        y = y + bias.to(torch.float32).to(torch.float64)
    y = epilogue.reference(y.to(torch.float32), activation)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype if x.dtype.is_floating_point else torch.float32)


@torch.library.custom_op("sparsert::linear_q8bsr", mutates_args=())
def linear_q8bsr(x: Tensor, row_ptr: Tensor, col_indices: Tensor, qblocks: Tensor, scales: Tensor,
                 out_features: int, bias: Optional[Tensor], activation: int, num_threads: int) -> Tensor:
    """act(dequant(quant(x) @ Wq.T) + bias) for W given as int8 1x4-block arrays and per-row scales."""
    _check_args(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads)
    _check_contents(row_ptr, col_indices, qblocks, scales, out_features, x.shape[-1])
    return linear_q8bsr_torch(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation)


@linear_q8bsr.register_fake
def _linear_q8bsr_fake(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads):
    _check_args(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads)
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------- the CPU kernel
def _check_contents(row_ptr, col_indices, qblocks, scales, out_features, in_features) -> None:
    """The O(nnz) checks that keep the kernel inside x and the weight."""
    if in_features > MAX_COLS:
        raise ValueError(f"{_OP}: in_features {in_features} is too wide for int32 accumulation (at most {MAX_COLS})")
    if qblocks.dtype != torch.int8 or qblocks.dim() != 2 or qblocks.shape[1] != BLOCK_COLS:
        raise ValueError(f"{_OP}: qblocks must be int8 (nblocks, 4), got {qblocks.dtype} {tuple(qblocks.shape)}")
    if scales.shape != (out_features,) or not scales.is_floating_point():
        raise ValueError(f"{_OP}: scales must be float of shape ({out_features},), got {tuple(scales.shape)}")
    if row_ptr.numel() != out_features + 1:
        raise ValueError(f"row_ptr has {row_ptr.numel()} entries, expected {out_features + 1}")
    rp = row_ptr.to(torch.int64)
    if int(rp[0]) != 0 or bool((rp[1:] < rp[:-1]).any()):
        raise ValueError("row_ptr must start at 0 and be non-decreasing")
    nnz = int(rp[-1])
    if col_indices.numel() != nnz or qblocks.shape[0] != nnz:
        raise ValueError("col_indices/qblocks sizes do not match row_ptr[-1]")
    if nnz:
        cols = decode_indices(col_indices)
        nbc = -(-in_features // BLOCK_COLS)
        if int(cols.min()) < 0 or int(cols.max()) >= nbc:
            raise ValueError(f"column indices must lie in [0, {nbc}) (block columns of a "
                             f"{out_features}x{in_features} matrix)")


def check_q8_arrays(row_ptr: Tensor, col_indices: Tensor, qblocks: Tensor, scales: Tensor, out_features: int,
                    in_features: int) -> Validated:
    """Validates the arrays as the int8 kernels read them (contiguous CPU int32 row
    pointer, int16/int32 indices, int8 qblocks, float32 scales) and returns private
    copies of the row pointer, indices and scales (remembered per objects and versions,
    like :func:`sparsert.ops.backends.cpu.check_weight_arrays`)."""
    def validate() -> Validated:
        for name, t, dtypes in (("row_ptr", row_ptr, (torch.int32,)), ("col_indices", col_indices,
                                (torch.int16, torch.int32)), ("qblocks", qblocks, (torch.int8,)),
                                ("scales", scales, (torch.float32,))):
            if not isinstance(t, Tensor) or t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in dtypes:
                raise ValueError(f"{name} must be a contiguous CPU tensor of {dtypes} (build weights with "
                                 "sparsert.formats.q8bsr.Q8BSR)")
        rp, ci, sc = row_ptr.clone(), col_indices.clone(), scales.clone()
        _check_contents(rp, ci, qblocks, sc, out_features, in_features)
        # the kernel reads 4 bytes per block: a view of qblocks as int32 (or a private copy when unaligned)
        lanes = qblocks if qblocks.data_ptr() % 4 == 0 else qblocks.clone()
        lanes = lanes.view(torch.int32).reshape(-1)
        return Validated((rp, ci, sc, lanes), lanes,
                         (rp.data_ptr(), rp.numel(), ci.data_ptr(), ci.numel(), index_bits(ci), lanes.data_ptr(),
                          qblocks.numel(), sc.data_ptr()))

    key = (out_features, in_features, "q8", id(scales), _version(scales))
    return _remembered(row_ptr, col_indices, qblocks, key, validate)


#: the few-token VNNI kernel over the "lanes" layout (csrc/spmm_int8/spmm_int8.h, Int8LaneMatrix)
LANES_KERNEL = "s8_lanes16_avx512vnni"


@functools.lru_cache(maxsize=None)
def _lanes_max_tokens() -> int:
    """Up to how many tokens a call takes the lanes kernel on this CPU (0: it cannot run here)."""
    return native().int8_lanes_max_tokens() if native().int8_lanes_supported() else 0


def _lanes_arrays(checked: Validated, out_features: int, in_features: int) -> tuple:
    """The lanes layout's native arguments, built from the validated 1x4 arrays on first
    use and kept with them (a private copy: rebuilt whenever the arrays are validated again)."""
    derived = checked.derived
    if "lanes" not in derived:
        n = native()
        groups, chunks = n.int8_lanes_groups_chunks(out_features, in_features)
        block = checked.native[:7]  # row_ptr, its length, col_idx, its length, index bits, values, their length
        step_ptr = torch.empty(groups * chunks + 1, dtype=torch.int32)
        steps = n.int8_lanes_plan(out_features, in_features, *block, step_ptr.data_ptr(), step_ptr.numel())
        lane_cols = torch.zeros(16 * steps, dtype=torch.uint8)
        lane_w = torch.zeros(64 * steps, dtype=torch.int8)
        n.int8_lanes_fill(out_features, in_features, *block, step_ptr.data_ptr(), step_ptr.numel(),
                          lane_cols.data_ptr(), lane_cols.numel(), lane_w.data_ptr(), lane_w.numel())
        args = (step_ptr.data_ptr(), step_ptr.numel(), lane_cols.data_ptr(), lane_w.data_ptr(), steps,
                checked.native[7])
        derived["lanes"] = (step_ptr, lane_cols, lane_w, args)
    return derived["lanes"][3]


#: the many-token VNNI kernel over the "groups" layout (csrc/spmm_int8/spmm_int8.h, Int8GroupMatrix)
GROUPS_KERNEL = "s8_groups4_avx512vnni"
#: rows of each 4-bit pattern 0..15 (the row-group layout's pattern_counts, with 0 for no rows)
_PATTERN_ROWS = torch.cat([torch.zeros(1, dtype=torch.int64), pattern_counts()])


def groups_layout(row_ptr: Tensor, col_indices: Tensor, lanes: Tensor, out_features: int, in_features: int) -> tuple:
    """The groups layout (Int8GroupMatrix) of validated 1x4 arrays (``lanes``: the blocks as
    int32): rows in groups of 4, per group its block columns sorted by which of the 4 rows
    hold a block there (the pattern, 1..15), each column followed by those rows' blocks.
    Returns (seg_ptr, columns, blocks, group_ptr, row_offsets), all int32."""
    rows, nbc = out_features, -(-in_features // BLOCK_COLS)
    groups = -(-rows // GROUP_ROWS)
    rp = row_ptr.to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(rows), rp[1:] - rp[:-1])
    kb = decode_indices(col_indices).to(torch.int64)
    group, bit = row_of // GROUP_ROWS, row_of % GROUP_ROWS
    key = group * nbc + kb  # one per (group, block column) a block of the group sits in
    pattern = torch.zeros(groups * nbc, dtype=torch.int64).index_add_(0, key, 1 << bit)  # bits are distinct: a sum is an or
    occupied = pattern.nonzero().squeeze(1)  # ascending: (group, column) order
    occ_group, occ_col, occ_pattern = occupied // nbc, occupied % nbc, pattern[occupied]
    order = torch.argsort((occ_group * (PATTERNS + 1) + occ_pattern) * nbc + occ_col)
    s_group, s_pattern, s_col = occ_group[order], occ_pattern[order], occ_col[order]
    counts = torch.bincount(s_group * PATTERNS + s_pattern - 1, minlength=groups * PATTERNS)
    seg_ptr = torch.zeros(groups * PATTERNS + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=seg_ptr[1:])
    # each block's slot: after the blocks of the columns sorted before its own, at its row's rank in the pattern
    width = _PATTERN_ROWS[s_pattern]
    first_slot = torch.cumsum(width, 0) - width
    sorted_pos = torch.empty_like(order)
    sorted_pos[order] = torch.arange(order.numel())
    pos = sorted_pos[torch.searchsorted(occupied, key)]
    slot = first_slot[pos] + _PATTERN_ROWS[pattern[key] & ((1 << bit) - 1)]
    blocks = torch.empty_like(lanes)
    blocks[slot] = lanes
    group_ptr = rp[torch.clamp(torch.arange(groups + 1) * GROUP_ROWS, max=rows)]
    # 128 * (sum of the row's weights), wrapped to int32 as the kernel's sums wrap
    sums = torch.zeros(rows, dtype=torch.int64).index_add_(0, row_of, lanes.view(torch.int8).view(-1, 4).to(
        torch.int64).sum(1))
    offsets = (sums * 128 + 2**31) % 2**32 - 2**31
    return (seg_ptr.to(torch.int32), s_col.to(torch.int32), blocks, group_ptr.to(torch.int32),
            offsets.to(torch.int32))


@functools.lru_cache(maxsize=None)
def _groups_supported() -> bool:
    return bool(native().int8_groups_supported())


#: the groups kernel's default from this block density up (blocks / (rows x block columns)): measured
#: on Zen 4 at 16-128 tokens, 1.3-1.5x the panel kernel at 0.5, 1.0-1.3x at 0.3, 0.93-1.04x at 0.1
GROUPS_MIN_DENSITY = 0.2


def _groups_pay(checked: Validated, out_features: int, in_features: int) -> bool:
    """True when a call past the lanes kernel's tokens should take the groups kernel."""
    blocks = checked.native[3]
    return (blocks >= GROUPS_MIN_DENSITY * out_features * -(-in_features // BLOCK_COLS) and blocks > 0
            and _groups_supported())


def _groups_arrays(checked: Validated, out_features: int, in_features: int) -> tuple:
    """The groups layout's native arguments, built from the validated 1x4 arrays on first
    use and kept with them (like :func:`_lanes_arrays`)."""
    derived = checked.derived
    if "groups" not in derived:
        rp, ci, sc, lanes = checked.indices
        seg_ptr, columns, blocks, group_ptr, offsets = groups_layout(rp, ci, lanes, out_features, in_features)
        args = (seg_ptr.data_ptr(), seg_ptr.numel(), columns.data_ptr(), columns.numel(), blocks.data_ptr(),
                blocks.numel(), group_ptr.data_ptr(), group_ptr.numel(), offsets.data_ptr(), sc.data_ptr())
        derived["groups"] = (seg_ptr, columns, blocks, group_ptr, offsets, args)
    return derived["groups"][5]


def linear_q8bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, qblocks: Tensor, scales: Tensor,
                     out_features: int, bias: Optional[Tensor], activation: int, num_threads: int,
                     kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces an int8 kernel (tests, benchmarks): a registry
    kernel, :data:`LANES_KERNEL` (the default on CPUs with AVX-512 VNNI up to
    ``int8_lanes_max_tokens()`` tokens) or :data:`GROUPS_KERNEL` (their default past it, for
    weights of at least :data:`GROUPS_MIN_DENSITY` block density)."""
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have at least 1 dimension(s), got shape ()")
    in_features = x.shape[-1]
    checked = check_q8_arrays(row_ptr, col_indices, qblocks, scales, out_features, in_features)
    tokens = x.numel() // in_features if in_features else math.prod(x.shape[:-1])
    if kernel == LANES_KERNEL or (not kernel and 0 < tokens <= _lanes_max_tokens()):
        return run_token_rows_kernel(native().spmm_int8_lanes, _lanes_arrays(checked, out_features, in_features), x,
                                     bias, out_features, activation, num_threads, kernel)
    if kernel == GROUPS_KERNEL or (not kernel and tokens > 0 and _groups_pay(checked, out_features, in_features)):
        return run_token_rows_kernel(native().spmm_int8_groups, _groups_arrays(checked, out_features, in_features),
                                     x, bias, out_features, activation, num_threads, kernel)
    return run_token_rows_kernel(native().spmm_int8, checked.native, x, bias, out_features, activation,
                                 num_threads, kernel)


@linear_q8bsr.register_kernel("cpu")
def _linear_q8bsr_cpu(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads):
    _check_args(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads)
    return linear_q8bsr_cpu(x, row_ptr, col_indices, qblocks, scales, out_features, bias, activation, num_threads)


def linear_q8_arrays(x: Tensor, row_ptr: Tensor, col_indices: Tensor, qblocks: Tensor, scales: Tensor,
                     out_features: int, bias: Optional[Tensor], code: int, num_threads: int = 0) -> Tensor:
    """The int8 op over a :class:`~sparsert.formats.q8bsr.Q8BSR`'s arrays and an epilogue
    code: a plain eager CPU call runs the kernel directly, anything else calls the op."""
    if eager_cpu_call(x, bias, scales):
        return linear_q8bsr_cpu(x, row_ptr, col_indices, qblocks, scales, out_features, bias, code, num_threads)
    return torch.ops.sparsert.linear_q8bsr.default(x, row_ptr, col_indices, qblocks, scales, out_features, bias,
                                                   code, num_threads)


def int8_kernels() -> list:
    """Every native int8 kernel of this build (name, isa, kind, block, supported): the
    registry's 1x4 kernels, the lanes kernel (:data:`LANES_KERNEL`) and the groups kernel
    (:data:`GROUPS_KERNEL`)."""
    lanes = {"name": LANES_KERNEL, "isa": "avx512vnni", "kind": "lanes", "block": (1, BLOCK_COLS),
             "supported": native().int8_lanes_supported()}
    groups = {"name": GROUPS_KERNEL, "isa": "avx512vnni", "kind": "groups", "block": (1, BLOCK_COLS),
              "supported": native().int8_groups_supported()}
    return native().int8_kernels() + [lanes, groups]
