"""``sparsert::conv2d_bsr`` and :func:`conv2d`: sparse 2-D convolution.

The weight of a convolution is packed as a sparsert format (CSR, BSR, N:M)
over its flattened ``(out_channels, in_channels / groups * kh * kw)`` matrix,
``weight.reshape(out_channels, -1)``: column ``k = (ci * kh + ky) * kw + kx``.
A flattened matrix does not say its kernel's spatial size, so :func:`conv2d`
takes it from a :class:`ConvWeight` (the format plus ``kernel_size`` — what
``sparsert.nn.SparseConv2d`` holds), or from the ``kernel_size=`` argument
next to a bare format (1x1 when omitted and the columns equal
``in_channels / groups``).

The op has a fake (meta) implementation so ``torch.compile`` and
``torch.export`` trace through it, a native CPU implementation (NCHW float32,
kernels in ``csrc/conv/``), and a pure-torch default for every other
device (schema and default in :mod:`sparsert.ops.schema`, kernels in
:mod:`sparsert.ops.backends`). Depthwise convolutions work (CSR, or blocks of 1 row) but are not
where sparsity pays: keep them dense (``F.conv2d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import SparseFormat
from . import epilogue
from .backends.cpu import conv2d_bsr_cpu, eager_cpu_call
from .linear import check_num_threads
from .schema import check_conv_args, conv_out_size

__all__ = ["ConvWeight", "conv2d", "conv2d_arrays", "pair", "conv_padding", "apply_pre_pad", "PADDING_MODES"]

_CONV_OP = torch.ops.sparsert.conv2d_bsr.default

#: the ``padding_mode`` values of ``nn.Conv2d``
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def pair(v, name: str) -> Tuple[int, int]:
    """``3`` -> ``(3, 3)``; a pair of ints as a tuple; ValueError otherwise (bools are not ints).
    The one rule for conv sizes (ops, modules, files)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


def conv_padding(padding, kernel_size, dilation, stride, padding_mode: str = "zeros"):
    """How a convolution pads, as torch does it: ``(op_padding, pre_pad)``.

    ``op_padding`` is the symmetric ``[top/bottom, left/right]`` padding the op
    takes; ``pre_pad`` is None or the ``F.pad`` amounts (left, right, top,
    bottom) to apply to x first, in ``padding_mode`` ("zeros" = constant):
    for other padding modes, and for ``"same"`` when the dilated kernel is even
    (torch puts the odd pixel at the bottom/right). ``"same"`` needs stride 1
    (as in ``F.conv2d``)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}")
    pre_pad = None
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0)
        elif padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in F.conv2d)")
            totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            pad = (totals[0] // 2, totals[1] // 2)
            if any(t % 2 for t in totals):
                pre_pad = [totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2]
                pad = (0, 0)
        else:
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same'; got {padding!r}")
    else:
        pad = pair(padding, "padding")
        if min(pad) < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
    if padding_mode != "zeros":
        pre_pad = pre_pad or [pad[1], pad[1], pad[0], pad[0]]
        pad = (0, 0)
    return [int(pad[0]), int(pad[1])], pre_pad


def apply_pre_pad(x: Tensor, pre_pad, padding_mode: str = "zeros") -> Tensor:
    """``x`` padded by :func:`conv_padding`'s ``pre_pad`` (None: x itself)."""
    return x if pre_pad is None else F.pad(x, pre_pad, mode="constant" if padding_mode == "zeros" else padding_mode)


@dataclass(frozen=True)
class ConvWeight:
    """A packed convolution weight: ``format`` over the flattened
    ``(out_channels, in_channels / groups * kh * kw)`` matrix, and ``kernel_size = (kh, kw)``."""

    format: SparseFormat
    kernel_size: Tuple[int, int]

    def __post_init__(self):
        if not isinstance(self.format, SparseFormat):
            raise TypeError(f"ConvWeight.format must be a sparsert format, got {type(self.format).__name__}")
        kh, kw = pair(self.kernel_size, "kernel_size")
        if kh < 1 or kw < 1 or self.format.shape[1] % (kh * kw):
            raise ValueError(f"kernel_size {self.kernel_size} does not divide the {self.format.shape[1]} weight columns")
        object.__setattr__(self, "kernel_size", (kh, kw))

    @classmethod
    def from_dense(cls, weight: Tensor, kind: str = "csr") -> "ConvWeight":
        """Packs a 4-D ``(out, in/groups, kh, kw)`` (pruned) weight as ``kind`` ("csr", "bsr4x1", ...)."""
        from ..formats import pack
        if weight.dim() != 4:
            raise ValueError(f"a convolution weight is 4-D (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
        packed = pack(weight.detach().reshape(weight.shape[0], -1), kind)
        if not isinstance(packed, SparseFormat):
            raise ValueError("ConvWeight needs a sparse format; use the dense weight with F.conv2d for 'dense'")
        return cls(packed, (int(weight.shape[2]), int(weight.shape[3])))

    @property
    def out_channels(self) -> int:
        return self.format.shape[0]

    def to_dense(self) -> Tensor:
        """The 4-D dense weight."""
        rows, cols = self.format.shape
        kh, kw = self.kernel_size
        return self.format.to_dense().reshape(rows, cols // (kh * kw), kh, kw)


def conv2d(x: Tensor, w: Union[ConvWeight, SparseFormat, Tensor], bias: Optional[Tensor] = None,
           stride=1, padding=0, dilation=1, groups: int = 1, activation: Optional[str] = None,
           num_threads: Optional[int] = None, kernel_size=None) -> Tensor:
    """``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups))`` for a sparse weight.

    ``x`` is ``(N, C, H, W)`` (or ``(C, H, W)``). ``w`` is a :class:`ConvWeight`
    (format + kernel size), a sparsert format over the flattened
    ``(out_channels, C / groups * kh * kw)`` weight together with
    ``kernel_size`` (may be omitted for 1x1), or a dense 4-D weight (then this is
    ``F.conv2d``). ``activation``: None, "relu", "relu6" or "gelu".
    ``num_threads`` defaults to :func:`sparsert.ops.get_num_threads`.
    """
    code = epilogue.code_of(activation)
    threads = check_num_threads(num_threads)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride_ = pair(stride, "stride")
    dilation_ = pair(dilation, "dilation")
    if min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got {stride!r}, {dilation!r}")
    if isinstance(w, Tensor):
        return epilogue.reference(F.conv2d(x, w, bias, stride_, padding, dilation_, groups), code)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    cin = x.shape[1]
    if cin % groups:
        raise ValueError(f"groups={groups} does not divide the {cin} input channels")
    if isinstance(w, ConvWeight):
        if kernel_size is not None and pair(kernel_size, "kernel_size") != w.kernel_size:
            raise ValueError(f"kernel_size {kernel_size!r} disagrees with the ConvWeight's {w.kernel_size}")
        fmt, ks = w.format, w.kernel_size
    elif isinstance(w, SparseFormat):
        fmt = w
        if kernel_size is None:
            if fmt.shape[1] != cin // groups:
                raise ValueError("a flattened weight does not say its kernel size: pass kernel_size= "
                                 "or a ConvWeight (only 1x1 is inferred)")
            ks = (1, 1)
        else:
            ks = pair(kernel_size, "kernel_size")
    else:
        raise TypeError(f"w must be a ConvWeight, a sparsert format or a torch.Tensor, got {type(w).__name__}")
    if min(ks) < 1:
        raise ValueError(f"kernel_size must be >= 1, got {ks}")
    rows, cols = fmt.shape
    if cols != cin // groups * ks[0] * ks[1]:
        raise ValueError(f"the weight has {cols} columns; x with {cin} channels, groups={groups} and kernel "
                         f"{ks} needs {cin // groups * ks[0] * ks[1]}")
    if rows % groups:
        raise ValueError(f"groups={groups} does not divide the {rows} output channels")
    pad, pre_pad = conv_padding(padding, ks, dilation_, stride_)
    x = apply_pre_pad(x, pre_pad, "zeros")
    for size, k, s, p, d in zip(x.shape[2:], ks, stride_, pad, dilation_):
        if conv_out_size(size, k, s, p, d) < 1:
            raise ValueError(f"input of size {tuple(x.shape[2:])} is smaller than the dilated kernel {ks}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    row_ptr, col_indices, values, r, c = fmt.kernel_arrays()
    if groups > 1 and (rows // groups) % r:
        raise ValueError(f"with groups={groups}, out_channels/groups={rows // groups} must be a multiple of the "
                         f"format's block rows ({r}); use CSR or a smaller block")
    check_conv_args(x, row_ptr, col_indices, values, rows, list(ks), r, c, bias, list(stride_), pad,
                    list(dilation_), groups, code, threads)  # (sizes the 32-bit kernels can address)
    y = conv2d_arrays(x, row_ptr, col_indices, values, rows, list(ks), r, c, bias, list(stride_), pad,
                      list(dilation_), groups, code, threads)
    return y.squeeze(0) if unbatched else y


def conv2d_arrays(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                  kernel_size: list, block_rows: int, block_cols: int, bias: Optional[Tensor], stride: list,
                  padding: list, dilation: list, groups: int, code: int, num_threads: int = 0,
                  pre_pad=None, padding_mode: str = "zeros") -> Tensor:
    """:func:`conv2d` over a weight's kernel arrays, an epilogue code and a padding
    resolved by :func:`conv_padding`, with no per-call argument checks: what
    layers that prepared everything once call (``sparsert.nn``). ``x`` may be
    unbatched (C, H, W). A plain eager CPU call runs the kernel directly;
    anything else calls the op."""
    x = apply_pre_pad(x, pre_pad, padding_mode)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    op = conv2d_bsr_cpu if eager_cpu_call(x, bias, values) else _CONV_OP
    y = op(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols, bias, stride,
           padding, dilation, groups, code, num_threads)
    return y.squeeze(0) if unbatched else y
