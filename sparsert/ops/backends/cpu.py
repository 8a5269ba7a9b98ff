"""The native CPU backend of the ``sparsert`` ops (kernels in ``sparsert._C``).

Three things live here: the CPU kernels registered for the ops
(``linear_bsr_cpu``, ``linear_bitmask_cpu``, ``conv2d_bsr_cpu``), the
validation of a weight's raw
arrays before a kernel reads them, and the eager fast path
(:func:`eager_cpu_call`): a plain eager CPU call runs the kernel directly,
skipping the torch.library dispatcher, whose Python layers cost several times
the kernel for small layers.

Validation, in full, once per weight: the kernels index x with the column
indices and walk the row pointer, so a malformed array would read out of
bounds. Checking them is O(nnz), more than a small layer's kernel, so the
backend checks them once and keeps PRIVATE copies of the two index arrays,
which are what the kernels read (:class:`Validated`): no later write to the
caller's arrays can reach a kernel, whether torch records it (in-place ops
bump the version counter: validated and copied again, so updates take
effect) or not (``.data``, numpy and storage writes, inference tensors:
the kernels keep the validated copies). Values stay shared; the kernels read
them inside a storage the backend holds and checks per call. A call with
the same, unchanged tensors costs a dict lookup and a few compares
(``benchmarks/bench_safety.py`` measures it against the previous design).
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..._ext import native as _native  # (private: the raw functions take addresses)
from ...formats._common import index_bits
from ...formats.bitmask import GROUP, VALUE_PADDING, masks_to_bits
from ...formats.rowgroup import check_rowgroup_layout
from ...formats.rowgroup import value_offsets as rowgroup_value_offsets
from .. import epilogue
from .._threads import get_num_threads
from ..schema import (_int, check_array_contents, check_conv_args, check_linear_args, conv2d_bsr, conv_out_size,
                      linear_bitmask, linear_bsr, linear_rowgroup)

__all__ = ["linear_bsr_cpu", "linear_bitmask_cpu", "linear_rowgroup_cpu", "check_rowgroup_arrays", "rowgroup_kernels", "conv2d_bsr_cpu", "check_bitmask_arrays", "bitmask_kernels",
           "eager_cpu_call", "check_weight_arrays", "kernels",
           "conv_kernels", "best_isa", "available"]


def available() -> bool:
    """True when the native CPU kernels (``sparsert._C``) load."""
    from ..._ext import available as _available
    return _available()


def kernels() -> list:
    """Every native SpMM kernel of this build (name, kind, isa, block, supported, ...)."""
    return _native().kernels()


def conv_kernels() -> list:
    """Every native convolution kernel of this build."""
    return _native().conv_kernels()


def bitmask_kernels() -> list:
    """Every native bitmask kernel of this build (name, isa, kind, supported)."""
    return _native().bitmask_kernels()


def rowgroup_kernels() -> list:
    """Every native row-group kernel of this build (name, isa, kind, supported)."""
    return _native().rowgroup_kernels()


def best_isa() -> str:
    """The widest instruction set this CPU and build run ("avx512", "avx2", "scalar")."""
    return _native().best_isa()


# --------------------------------------------------------------------------- eager fast path
def eager_cpu_call(*tensors: Optional[Tensor]) -> bool:
    """True when calling an op's CPU implementation directly is indistinguishable
    from calling the registered op: every tensor given is a plain CPU tensor,
    none needs autograd, and nothing traces, compiles, exports or intercepts
    (dispatch and function modes). Eager CPU calls then skip the dispatcher's
    Python layers, which cost tens of microseconds per call (more than a small
    sparse layer's kernel). ``None`` entries (e.g. no bias) are ignored."""
    if _is_compiling() or _function_mode_enabled() or _dispatch_modes() > 0:
        return False
    grad = _grad_enabled()
    for t in tensors:
        if t is None:
            continue
        kind = type(t)
        if (kind is not Tensor and kind is not _Parameter) or not t.is_cpu:  # no subclass (fake, functional...)
            return False  # (is_cpu: t.device.type costs 4x as much, per call)
        if grad and t.requires_grad:
            return False
    return True


# (bound once: each attribute lookup through ``torch._C`` costs per call)
_is_compiling = torch.compiler.is_compiling
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_Parameter = torch.nn.Parameter


# --------------------------------------------------------------------------- weight validation
_INDEX_DTYPES = (torch.int16, torch.int32)

# id(values) -> the Validated arrays of (row_ptr, col_indices, values) or (masks, row_offsets, values)
_validated: dict[int, "Validated"] = {}


class Validated:
    """A weight's arrays as the kernels read them, validated once.

    ``row_ptr`` and ``col_indices`` are PRIVATE copies, validated after they
    were made and never handed out: the kernels index x with them, and nothing
    a caller does to the public arrays (writes through ``.data``, numpy or
    ``untyped_storage()``, in-place changes to inference tensors, which keep
    no version counter) reaches them. The values stay shared: no index is
    read from them, so only where they are matters. The kernel reads
    ``values_numel`` floats at the address they had when validated, inside
    ``storage``, which this object holds (the memory cannot be freed and
    reused under it) and which is checked per call not to have been resized
    or moved (``untyped_storage().resize_`` and ``share_memory_()`` are the
    ways to swap the memory under a tensor). ``native`` is the argument tuple
    for ``sparsert._C``; callers keep this object alive while the kernel runs.

    It also remembers what it was validated from (:meth:`current`): the
    three array objects (weakly), their version counters, the values' address
    and the sizes that were checked."""

    __slots__ = ("indices", "storage", "storage_bytes", "storage_ptr", "native", "sizes", "refs", "versions",
                 "versioned", "values_ptr", "derived")

    def __init__(self, indices: tuple, values, native: tuple):
        self.indices = indices  # the private index copies (kept alive: ``native`` holds their addresses)
        self.storage = values.untyped_storage()  # (not values itself: see _validated's weakrefs)
        self.storage_bytes, self.storage_ptr = self.storage.nbytes(), self.storage.data_ptr()
        if self.storage_ptr + self.storage_bytes < values.data_ptr() + values.numel() * 4:
            raise ValueError("the storage of values is smaller than values (resized under it)")
        self.native = native
        self.sizes = self.refs = self.versions = self.values_ptr = None
        self.versioned = False
        # kernels' own layouts of these arrays by name, built from them on first use (private, like the indices)
        self.derived: dict = {}

    def intact(self) -> bool:
        """False once the values' storage was resized or moved since validation."""
        storage = self.storage
        return storage.nbytes() == self.storage_bytes and storage.data_ptr() == self.storage_ptr

    def current(self, a: Tensor, b: Tensor, values: Tensor) -> bool:
        """True while ``(a, b, values)`` are the objects this was validated from,
        with the same version counters (torch bumps them on every in-place
        change it records: such a change is validated and copied again, so it
        takes effect) and the values at the same address, inside intact memory.
        The fast path of every call: identities and integer compares only."""
        ra, rb, rv = self.refs
        if ra() is not a or rb() is not b or rv() is not values:
            return False
        versions = self.versions
        try:
            if self.versioned:
                if a._version != versions[0] or b._version != versions[1] or values._version != versions[2]:
                    return False
            elif _versions(a, b, values) != versions:  # inference tensors among them keep no counter
                return False
        except RuntimeError:  # (an array's data swapped for an inference tensor's: validate again)
            return False
        storage = self.storage
        return (values.data_ptr() == self.values_ptr and storage.nbytes() == self.storage_bytes
                and storage.data_ptr() == self.storage_ptr)

    def remember(self, a: Tensor, b: Tensor, values: Tensor, sizes: tuple) -> "Validated":
        """Records what this was validated from and files it under ``id(values)``."""
        vid = id(values)
        self.sizes, self.values_ptr = sizes, values.data_ptr()  # (the caller's values: int8 may read a copy)
        self.refs = (weakref.ref(a), weakref.ref(b), weakref.ref(values, lambda r, vid=vid: _forget(vid, r)))
        self.versions = _versions(a, b, values)
        self.versioned = -1 not in self.versions
        _validated[vid] = self
        return self


def _forget(vid: int, ref) -> None:
    checked = _validated.get(vid)
    if checked is not None and checked.refs[2] is ref:
        del _validated[vid]


def _version(t: Tensor) -> int:
    """``t``'s version counter; -1 for an inference tensor (it keeps none)."""
    return -1 if isinstance(t, Tensor) and t.is_inference() else t._version


def _versions(*tensors: Tensor) -> tuple:
    return tuple(map(_version, tensors))


def _remembered(a: Tensor, b: Tensor, values: Tensor, sizes: tuple, validate) -> Validated:
    """``validate()``'s :class:`Validated`, remembered per (a, b, values) objects,
    versions and the values' address (:meth:`Validated.current`) and ``sizes``
    (whatever else the validation depended on, compared by equality)."""
    checked = _validated.get(id(values))
    if checked is not None and checked.sizes == sizes and checked.current(a, b, values):
        return checked
    return validate().remember(a, b, values, sizes)


def check_weight_arrays(row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                        in_features: int, block_rows: int, block_cols: int) -> Validated:
    """Raises ValueError unless the arrays describe a valid ``out_features x
    in_features`` block-sparse matrix of ``block_rows x block_cols`` blocks in
    the layout the native kernels read (CPU, contiguous, int32 row pointer,
    int16/int32 column indices, float32 values).

    Returns the :class:`Validated` arrays the kernel must read (private index
    copies). They are remembered per (row_ptr, col_indices, values) objects,
    version counters and the values' address (:meth:`Validated.current`), so
    a normal update (an in-place change, new arrays, new buffers after
    ``load_state_dict``) is validated and copied again; a change of the index
    arrays that torch does not record (writes through ``.data``, numpy or the
    storage, ``t.data = other``, in-place changes to inference tensors)
    leaves the kernel on the last validated indices, which is safe. Kept
    lean: a layer calls it on every forward."""
    checked = _validated.get(id(values))
    if (checked is not None and checked.sizes == (out_features, in_features, block_rows, block_cols)
            and checked.current(row_ptr, col_indices, values)):
        return checked
    _check_layout(row_ptr, col_indices, values, block_rows, block_cols, out_features, in_features)
    # Copies first, contents checked second: what is checked is exactly what the kernel reads.
    rp, ci = row_ptr.clone(), col_indices.clone()
    check_array_contents(rp, ci, values, out_features, in_features, block_rows, block_cols)
    checked = Validated((rp, ci), values, (rp.data_ptr(), rp.numel(), ci.data_ptr(), ci.numel(), index_bits(ci),
                                           values.data_ptr(), values.numel()))
    return checked.remember(row_ptr, col_indices, values, (out_features, in_features, block_rows, block_cols))


def _check_layout(row_ptr, col_indices, values, block_rows, block_cols, out_features, in_features):
    """Types, devices, dtypes, layouts and storages: metadata only (cheap)."""
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous CPU tensor (build weights with sparsert.formats)")
    if row_ptr.dtype != torch.int32 or col_indices.dtype not in _INDEX_DTYPES or values.dtype != torch.float32:
        raise ValueError("row_ptr must be int32, col_indices int16/int32 and values float32 "
                         "(build weights with sparsert.formats)")
    for name, t in (("row_ptr", row_ptr), ("col_indices", col_indices), ("values", values)):
        storage = t.untyped_storage()
        if storage.data_ptr() + storage.nbytes() < t.data_ptr() + t.numel() * t.element_size():
            raise ValueError(f"the storage of {name} is smaller than {name} (resized under it)")
    op = "sparsert::linear_bsr"
    _int(op, "block_rows", block_rows, 1)
    _int(op, "block_cols", block_cols, 1)
    _int(op, "out_features", out_features, 0)
    _int(op, "in_features", in_features, 0)


def check_bitmask_arrays(masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                         in_features: int) -> Validated:
    """Raises ValueError unless the arrays are a valid ``out_features x in_features``
    bitmask matrix as the kernels read it (``Bitmask.kernel_arrays()``): int16 masks
    ``(rows, ceil(cols / 16))`` with no bits past the last column, int64 row offsets
    equal to the running popcount, float32 values plus their padding. Like
    :func:`check_weight_arrays`, the kernel reads private, validated copies of masks
    and row offsets, remembered per array objects and versions."""
    checked = _validated.get(id(values))
    if (checked is not None and checked.sizes == (out_features, in_features, 0, 0)
            and checked.current(masks, row_offsets, values)):
        return checked

    def validate() -> Validated:
        for name, t, dtype in (("masks", masks, torch.int16), ("row_offsets", row_offsets, torch.int64),
                               ("values", values, torch.float32)):
            if not isinstance(t, Tensor) or t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype:
                raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor (build weights with "
                                 "sparsert.formats.bitmask.Bitmask)")
        groups = -(-in_features // GROUP)
        if tuple(masks.shape) != (out_features, groups) or row_offsets.shape != (out_features + 1,):
            raise ValueError(f"masks must have shape ({out_features}, {groups}) and row_offsets "
                             f"{out_features + 1} entries for a {out_features}x{in_features} matrix")
        private_masks, private_offsets = masks.clone(), row_offsets.clone()
        bits = masks_to_bits(private_masks)
        tail = groups * GROUP - in_features
        if tail and out_features and bool(bits[:, -1, GROUP - tail:].any()):
            raise ValueError("masks have bits set past the last column")
        expected = torch.zeros(out_features + 1, dtype=torch.int64)
        torch.cumsum(bits.sum((1, 2)), 0, out=expected[1:])
        if not torch.equal(private_offsets, expected):
            raise ValueError("row_offsets must be the running popcount of the masks")
        if values.numel() != int(expected[-1]) + VALUE_PADDING:
            raise ValueError(f"values must hold the {int(expected[-1])} stored values plus {VALUE_PADDING} padding")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("bitmask values must be finite (the kernels multiply padding by zero)")
        return Validated((private_masks, private_offsets), values,
                         (private_masks.data_ptr(), private_masks.numel(), private_offsets.data_ptr(),
                          private_offsets.numel(), values.data_ptr(), values.numel()))

    return validate().remember(masks, row_offsets, values, (out_features, in_features, 0, 0))


def check_rowgroup_arrays(seg_ptr: Tensor, columns: Tensor, values: Tensor, out_features: int,
                          in_features: int) -> Validated:
    """Raises ValueError unless the arrays are a valid ``out_features x in_features``
    row-group matrix as the kernels read it (``RowGroup.kernel_arrays()``: int32 segment
    offsets, int32 columns in range and once per group, float32 finite values). Like
    :func:`check_weight_arrays`, the kernel reads private, validated copies of seg_ptr
    and columns, remembered per array objects and versions."""
    def validate() -> Validated:
        for name, t, dtype in (("seg_ptr", seg_ptr, torch.int32), ("columns", columns, torch.int32),
                               ("values", values, torch.float32)):
            if not isinstance(t, Tensor) or t.device.type != "cpu" or not t.is_contiguous() or t.dtype != dtype:
                raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor (build weights with "
                                 "sparsert.formats.rowgroup.RowGroup)")
        if seg_ptr.dim() != 1 or columns.dim() != 1:
            raise ValueError("seg_ptr and columns must be 1-D")
        private_segments, private_columns = seg_ptr.clone(), columns.clone()
        check_rowgroup_layout(private_segments, private_columns, values.numel(), out_features, in_features)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("row-group values must be finite")
        offsets = rowgroup_value_offsets(private_segments, out_features)  # once, not per call
        return Validated((private_segments, private_columns, offsets), values,
                         (private_segments.data_ptr(), private_segments.numel(), private_columns.data_ptr(),
                          private_columns.numel(), values.data_ptr(), values.numel(), offsets.data_ptr(),
                          offsets.numel()))

    return _remembered(seg_ptr, columns, values, ("rowgroup", out_features, in_features), validate)


# --------------------------------------------------------------------------- kernels
# The per-call glue below runs once per layer per forward, around kernels that take a
# few microseconds for a token: it uses the cheapest torch queries (``dtype is``,
# ``is_contiguous``, ``numel``; ``torch.empty`` with positional sizes, half the cost of
# a tuple) and handles the common case (float32, contiguous) first.
_F32 = torch.float32


def float32_bias(bias: Optional[Tensor], out_features: int) -> Optional[Tensor]:
    """``bias`` as the kernels read it (float32, contiguous; None for none), after checking its shape."""
    if bias is None:
        return None
    if bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if bias.dtype is not _F32 or not bias.is_contiguous():
        bias = bias.detach().to(_F32).contiguous()
    return bias


def token_rows(x: Tensor) -> tuple:
    """x's float32 token rows as the row-strided kernels read them (unit column stride,
    rows at least ``in_features`` apart): (the tensor holding them, its address, the
    number of tokens, the row stride). A row-strided 2-D x (a slice) is read in place."""
    in_features = x.shape[-1]
    if x.dtype is _F32 and x.is_contiguous():  # the common case: no copy, no reshape
        tokens = x.numel() // in_features if in_features else math.prod(x.shape[:-1])
        return x, x.data_ptr(), tokens, in_features
    x32 = x if x.dtype is _F32 else x.float()
    x2 = x32.reshape(-1, in_features)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < in_features):
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    return x2, x2.data_ptr(), tokens, x2.stride(0) if tokens else in_features


def run_token_rows_kernel(native_fn, arrays: tuple, x: Tensor, bias: Optional[Tensor], out_features: int,
                          activation: int, num_threads: int, kernel: str) -> Tensor:
    """Calls a native kernel of the token-rows signature (out, in, *arrays, x, tokens,
    x row stride, y, y row stride, bias, epilogue, threads, forced kernel) and finishes the
    epilogue: the one body of every Linear op's CPU path (CSR/BSR, bitmask, row-group, int8)."""
    rows, x_address, tokens, x_stride = token_rows(x)  # (rows: kept alive while the kernel reads it)
    y = torch.empty(*x.shape[:-1], out_features, dtype=_F32)
    bias = float32_bias(bias, out_features)
    fused, after = epilogue.split(activation)
    native_fn(out_features, x.shape[-1], *arrays, x_address, tokens, x_stride, y.data_ptr(), out_features,
              0 if bias is None else bias.data_ptr(), fused,
              num_threads if num_threads > 0 else get_num_threads(), kernel)
    if after is not None:
        y = after(y)
    return y if x.dtype is _F32 else y.to(x.dtype)


def linear_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_features: int,
                   block_rows: int, block_cols: int, bias: Optional[Tensor], activation: int,
                   num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks).

    Kept lean: it runs once per layer per call (a small layer's kernel takes
    a few microseconds). The weight arrays are validated in full once per
    tensor version (see :func:`check_weight_arrays`, which also checks the
    scalars that size the weight); per call only x, bias and the activation are checked.
    Raw op calls check every argument first (``_linear_bsr_cpu``).
    """
    if x.dim() == 0:
        raise ValueError("sparsert::linear_bsr: x must have at least 1 dimension(s), got shape ()")
    checked = check_weight_arrays(row_ptr, col_indices, values, out_features, x.shape[-1], block_rows,
                                  block_cols)  # (kept alive while the kernel runs)
    return run_token_rows_kernel(_native().spmm, (block_rows, block_cols, *checked.native), x, bias, out_features,
                                 activation, num_threads, kernel)


def linear_bitmask_cpu(x: Tensor, masks: Tensor, row_offsets: Tensor, values: Tensor, out_features: int,
                       bias: Optional[Tensor], activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path of ``linear_bitmask``; ``kernel`` forces a bitmask registry kernel."""
    checked = check_bitmask_arrays(masks, row_offsets, values, out_features, x.shape[-1])
    return run_token_rows_kernel(_native().spmm_bitmask, checked.native, x, bias, out_features, activation,
                                 num_threads, kernel)


def linear_rowgroup_cpu(x: Tensor, seg_ptr: Tensor, columns: Tensor, values: Tensor, out_features: int,
                        bias: Optional[Tensor], activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path of ``linear_rowgroup``; ``kernel`` forces a row-group registry kernel."""
    checked = check_rowgroup_arrays(seg_ptr, columns, values, out_features, x.shape[-1])
    return run_token_rows_kernel(_native().spmm_rowgroup, checked.native, x, bias, out_features, activation,
                                 num_threads, kernel)


def conv2d_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                   kernel_size: Sequence[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                   activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks).
    Per call only what layers cannot have checked once is checked here; raw op
    calls check every argument first (``_conv2d_bsr_cpu``)."""
    if x.dim() != 4:
        raise ValueError(f"sparsert::conv2d_bsr: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    if groups < 1 or cin % groups:
        raise ValueError(f"groups={groups} must be positive and divide the {cin} input channels")
    checked = check_weight_arrays(row_ptr, col_indices, values, out_channels, cin // groups * kh * kw,
                                  block_rows, block_cols)  # (kept alive while the kernel runs)
    rp_address, _, ci_address, _, index_bits, values_address, _ = checked.native
    oh = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    x32 = x if x.dtype == torch.float32 else x.float()
    x32 = x32.contiguous()  # NCHW; a channels_last input is converted here
    y = torch.empty(n, out_channels, max(oh, 0), max(ow, 0), dtype=torch.float32)
    bias = float32_bias(bias, out_channels)
    _native().conv2d(out_channels, block_rows, block_cols, rp_address, ci_address, index_bits, values_address,
                    x32.data_ptr(),
                    n, cin, h, w, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
                    dilation[1], groups, y.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    epilogue.kernel_code(activation), num_threads if num_threads > 0 else get_num_threads(),
                    kernel)
    y = epilogue.finish(y, activation)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@linear_bsr.register_kernel("cpu")
def _linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                    activation, num_threads):
    check_linear_args(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias, activation,
                      num_threads)
    return linear_bsr_cpu(x, row_ptr, col_indices, values, out_features, block_rows, block_cols, bias,
                          activation, num_threads)


@linear_bitmask.register_kernel("cpu")
def _linear_bitmask_cpu(x, masks, row_offsets, values, out_features, bias, activation, num_threads):
    return linear_bitmask_cpu(x, masks, row_offsets, values, out_features, bias, activation, num_threads)


@linear_rowgroup.register_kernel("cpu")
def _linear_rowgroup_cpu(x, seg_ptr, columns, values, out_features, bias, activation, num_threads):
    return linear_rowgroup_cpu(x, seg_ptr, columns, values, out_features, bias, activation, num_threads)


@conv2d_bsr.register_kernel("cpu")
def _conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                    bias, stride, padding, dilation, groups, activation, num_threads):
    check_conv_args(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias,
                    stride, padding, dilation, groups, activation, num_threads)
    return conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                          block_cols, bias, stride, padding, dilation, groups, activation, num_threads)
