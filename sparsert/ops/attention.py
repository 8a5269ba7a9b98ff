"""``attention``: multi-head softmax attention of an encoder layer, as ``torch.ops.sparsert.attention``.

``attention(q, k, v, key_bias, heads=h)`` takes q, k and v as ``(batch, tokens, heads * head_dim)``
(three slices of one fused Q/K/V projection's output are read in place: no copies into
head-major order) and returns ``softmax(q k^T * scale + key_bias) v`` per sentence and head in the
same layout, ready for the output projection. ``key_bias`` (``(batch, tokens)``, optional) is added
to every score of a key: 0 keeps it, a very negative value masks it (a padding mask).

On the CPU in float32 the native kernel (``sparsert._C``, one task per sentence and head, the
scores of a query row in registers) runs it; anywhere else, or in another dtype, the same math in
torch (:func:`attention_torch`). Inference only: the op has no backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._ext import native as _native
from ._threads import get_num_threads
from .backends.cpu import available as _native_available
from .backends.cpu import eager_cpu_call

__all__ = ["attention", "attention_torch", "attention_cpu", "attention_kernels"]

_F32 = torch.float32


def _check(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor], heads: int) -> tuple[int, int, int, int]:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k and v must be (batch, tokens, heads * head_dim) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, tokens, width = q.shape
    if heads < 1 or width % heads:
        raise ValueError(f"heads must be >= 1 and divide the width {width}, got {heads}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_bias is not None and tuple(key_bias.shape) != (batch, tokens):
        raise ValueError(f"key_bias must be (batch, tokens) = {(batch, tokens)}, got {tuple(key_bias.shape)}")
    return batch, tokens, width, width // heads


def attention_torch(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor], heads: int,
                    scale: float) -> Tensor:
    """The op's math in torch (matmul, softmax, matmul): its default and reference."""
    batch, tokens, width, head = _check(q, k, v, key_bias, heads)
    split = (batch, tokens, heads, head)
    qh, kh, vh = (t.reshape(split).transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if key_bias is not None:
        scores = scores + key_bias.to(scores.dtype)[:, None, None, :]
    return torch.matmul(torch.softmax(scores, dim=-1), vh).transpose(1, 2).reshape(batch, tokens, width)


def _rows_in_place(t: Tensor, width: int) -> bool:
    """t's (batch, token) rows as the kernel reads them: unit column stride, rows and sentences apart."""
    b, n, _ = t.shape
    return t.stride(2) == 1 and (n <= 1 or t.stride(1) >= width) and (b <= 1 or t.stride(0) >= n * t.stride(1))


def attention_cpu(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor], heads: int, scale: float,
                  num_threads: int = 0, kernel: str = "") -> Tensor:
    """The CPU implementation: the native kernel for float32 (``kernel`` forces one of
    :func:`attention_kernels` by name), torch's math otherwise."""
    batch, tokens, width, head = _check(q, k, v, key_bias, heads)
    if q.dtype is not _F32 or not _native_available():
        return attention_torch(q, k, v, key_bias, heads, scale)
    strides = (q.stride(0), q.stride(1))
    if not all(_rows_in_place(t, width) and (t.stride(0), t.stride(1)) == strides for t in (q, k, v)):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        strides = (q.stride(0), q.stride(1))
    bias = None if key_bias is None else key_bias.to(_F32).contiguous()
    out = torch.empty(batch, tokens, width, dtype=_F32)
    _native().attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides[0], strides[1], out.data_ptr(),
                        tokens * width, width, 0 if bias is None else bias.data_ptr(), batch, tokens, heads, head,
                        float(scale), num_threads if num_threads > 0 else get_num_threads(), kernel)
    return out


@torch.library.custom_op("sparsert::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor], heads: int, scale: float,
                  num_threads: int) -> Tensor:
    return attention_torch(q, k, v, key_bias, heads, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, key_bias, heads, scale, num_threads):
    _check(q, k, v, key_bias, heads)
    return q.new_empty(q.shape)


@_attention_op.register_kernel("cpu")
def _attention_cpu(q, k, v, key_bias, heads, scale, num_threads):
    return attention_cpu(q, k, v, key_bias, heads, scale, num_threads)


_ATTENTION_OP = torch.ops.sparsert.attention.default


def attention(q: Tensor, k: Tensor, v: Tensor, key_bias: Optional[Tensor] = None, *, heads: int,
              scale: Optional[float] = None, num_threads: int = 0) -> Tensor:
    """``softmax(q k^T * scale + key_bias) v`` per sentence and head (module docstring);
    ``scale`` defaults to ``head_dim ** -0.5``; ``num_threads`` 0 follows :func:`get_num_threads`."""
    if scale is None:
        scale = (q.shape[-1] // max(heads, 1)) ** -0.5
    if eager_cpu_call(q, k, v, key_bias):
        return attention_cpu(q, k, v, key_bias, heads, scale, num_threads)
    return _ATTENTION_OP(q, k, v, key_bias, heads, float(scale), num_threads)


def attention_kernels() -> list:
    """Every native attention kernel of this build (name, isa, kind, supported)."""
    return _native().attention_kernels()
