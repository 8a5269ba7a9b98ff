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
kernels in ``csrc/kernels/conv*``), and a pure-torch default for every other
device. Depthwise convolutions work (CSR, or blocks of 1 row) but are not
where sparsity pays: keep them dense (``F.conv2d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import native
from ..formats import SparseFormat
from ._threads import get_num_threads
from ._eager import eager_cpu_call
from ._checks import check_weight_arrays
from .linear import _dense_weight, float32_bias

__all__ = ["ConvWeight", "conv2d", "conv2d_bsr", "conv2d_bsr_cpu", "conv2d_bsr_torch", "CONV_ACTIVATIONS"]

#: activation name -> op code. The kernels fuse ReLU; ReLU6 is the kernel's
#: ReLU then a clamp, GELU runs after the kernel.
CONV_ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "gelu": 2, "relu6": 3}
_KERNEL_ACTIVATION = {0: 0, 1: 1, 2: 0, 3: 1}


def _activation_code(activation) -> int:
    try:
        return CONV_ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of None, 'relu', 'gelu', 'relu6'; got {activation!r}") from None


def _apply_after(y: Tensor, activation: int) -> Tensor:
    """What the kernel did not fuse (the pure-torch path applies all of it)."""
    if activation == 2:
        return F.gelu(y)
    if activation == 3:
        return y.clamp_max_(6.0)
    return y


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")


@dataclass(frozen=True)
class ConvWeight:
    """A packed convolution weight: ``format`` over the flattened
    ``(out_channels, in_channels / groups * kh * kw)`` matrix, and ``kernel_size = (kh, kw)``."""

    format: SparseFormat
    kernel_size: Tuple[int, int]

    def __post_init__(self):
        if not isinstance(self.format, SparseFormat):
            raise TypeError(f"ConvWeight.format must be a sparsert format, got {type(self.format).__name__}")
        kh, kw = _pair(self.kernel_size, "kernel_size")
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


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d_bsr_torch(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                     kernel_size: Sequence[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                     activation: int) -> Tensor:
    """The pure-torch path (any device): densify W and call F.conv2d."""
    kh, kw = kernel_size
    cols = x.shape[1] // groups * kh * kw
    w = _dense_weight(row_ptr, col_indices, values, out_channels, cols, block_rows, block_cols)
    w = w.reshape(out_channels, cols // (kh * kw), kh, kw).to(x.dtype)
    y = F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
    if activation in (1, 3):
        y = torch.relu(y)
    return _apply_after(y, activation)


@torch.library.custom_op("sparsert::conv2d_bsr", mutates_args=())
def conv2d_bsr(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
               kernel_size: List[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
               stride: List[int], padding: List[int], dilation: List[int], groups: int,
               activation: int, num_threads: int) -> Tensor:
    """act(conv2d(x, W) + bias) for NCHW ``x`` and W given as BSR arrays over the
    flattened weight (pure-torch default for any device; native on CPU).
    activation: 0 none, 1 relu, 2 gelu, 3 relu6. num_threads: 0 = sparsert's default."""
    return conv2d_bsr_torch(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                            block_cols, bias, stride, padding, dilation, groups, activation)


@conv2d_bsr.register_fake
def _conv2d_bsr_fake(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                     bias, stride, padding, dilation, groups, activation, num_threads):
    oh = _out_size(x.shape[2], kernel_size[0], stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[3], kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], out_channels, oh, ow))


def conv2d_bsr_cpu(x: Tensor, row_ptr: Tensor, col_indices: Tensor, values: Tensor, out_channels: int,
                   kernel_size: Sequence[int], block_rows: int, block_cols: int, bias: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                   activation: int, num_threads: int, kernel: str = "") -> Tensor:
    """The native CPU path; ``kernel`` forces a registry kernel (tests, benchmarks)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    n, cin, h, w = x.shape
    kh, kw = kernel_size
    if groups < 1 or cin % groups:
        raise ValueError(f"groups={groups} must be positive and divide the {cin} input channels")
    rp_address, _, ci_address, _, index_bits, values_address, _ = check_weight_arrays(
        row_ptr, col_indices, values, out_channels, cin // groups * kh * kw, block_rows, block_cols)
    oh = _out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _out_size(w, kw, stride[1], padding[1], dilation[1])
    x32 = x if x.dtype == torch.float32 else x.float()
    x32 = x32.contiguous()  # NCHW; a channels_last input is converted here
    y = torch.empty(n, out_channels, max(oh, 0), max(ow, 0), dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous()
    native().conv2d(out_channels, block_rows, block_cols, rp_address, ci_address, index_bits, values_address,
                    x32.data_ptr(),
                    n, cin, h, w, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
                    dilation[1], groups, y.data_ptr(), float32_bias(bias, out_channels),
                    _KERNEL_ACTIVATION[activation], num_threads if num_threads > 0 else get_num_threads(),
                    kernel)
    y = _apply_after(y, activation)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@conv2d_bsr.register_kernel("cpu")
def _conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows, block_cols,
                    bias, stride, padding, dilation, groups, activation, num_threads):
    return conv2d_bsr_cpu(x, row_ptr, col_indices, values, out_channels, kernel_size, block_rows,
                          block_cols, bias, stride, padding, dilation, groups, activation, num_threads)


def _resolve_padding(padding, kernel_size, dilation, stride) -> Tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in F.conv2d)")
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even dilated kernel needs asymmetric padding; pad x first")
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same'; got {padding!r}")
    return _pair(padding, "padding")


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
    code = _activation_code(activation)
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride_ = _pair(stride, "stride")
    dilation_ = _pair(dilation, "dilation")
    if min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got {stride!r}, {dilation!r}")
    if isinstance(w, Tensor):
        y = F.conv2d(x, w, bias, stride_, padding, dilation_, groups)
        if code in (1, 3):
            y = torch.relu(y)
        return _apply_after(y, code)
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
        if kernel_size is not None and _pair(kernel_size, "kernel_size") != w.kernel_size:
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
            ks = _pair(kernel_size, "kernel_size")
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
    pad = _resolve_padding(padding, ks, dilation_, stride_)
    if min(pad) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    for size, k, s, p, d in zip(x.shape[2:], ks, stride_, pad, dilation_):
        if _out_size(size, k, s, p, d) < 1:
            raise ValueError(f"input of size {tuple(x.shape[2:])} is smaller than the dilated kernel {ks}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    row_ptr, col_indices, values, r, c = fmt.kernel_arrays()
    if groups > 1 and (rows // groups) % r:
        raise ValueError(f"with groups={groups}, out_channels/groups={rows // groups} must be a multiple of the "
                         f"format's block rows ({r}); use CSR or a smaller block")
    args = (x, row_ptr, col_indices, values, rows, list(ks), r, c, bias, list(stride_), list(pad),
            list(dilation_), groups, code, num_threads or 0)
    y = conv2d_bsr_cpu(*args) if eager_cpu_call(x, bias, values) else conv2d_bsr(*args)
    return y.squeeze(0) if unbatched else y

