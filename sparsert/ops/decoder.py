"""The arithmetic between a LLaMA-style decoder's Linear layers, one native call each.

* :func:`rms_norm` — ``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension; with
  ``add=y`` it first adds ``y`` into ``x`` in place (``x`` is the residual stream): the residual
  add and the next norm in one pass;
* :func:`swiglu` — ``silu(gate) * up`` from one fused gate/up projection's output;
* :func:`cached_attention` — one decode step (one new token per sequence): q and k rotated by the
  token's angle, k and v written into the KV cache at ``position``, q attending the cached
  positions ``0..position`` (grouped heads read their shared key/value head in place).

Why: at one token a torch op is all overhead (~4-20 µs each: torch's ``rms_norm`` alone runs six),
and a decode step of SmolLM2-135M ran ~30 of them per layer around 4 Linear calls. In float32 on
the CPU the native kernels (``sparsert._C``) run these; anywhere else the same math in torch
(the ``*_torch`` functions, also the tests' reference). Inference only; not ``torch.library``
ops (the streamlined decoder that calls them is not meant for ``torch.compile``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import native as _native
from .._ext import native_or_none
from ._threads import get_num_threads
from .backends.cpu import available as _native_available

__all__ = ["rms_norm", "rms_norm_torch", "swiglu", "swiglu_torch", "cached_attention", "cached_attention_torch",
           "decoder_kernels", "native_decoder_ops"]

_F32 = torch.float32


def _native_for(*tensors) -> bool:
    # (dtype and is_cpu: ~0.1 µs each; t.device.type costs 0.5)
    return all(t.dtype is _F32 and t.is_cpu for t in tensors) and native_or_none() is not None


def native_decoder_ops(t: Tensor) -> bool:
    """True where the native kernels run these ops for tensors like ``t`` (float32 on the CPU)."""
    return _native_for(t)


def _rows_of(t: Tensor, name: str) -> tuple[int, int]:
    """(rows, row stride): a contiguous tensor's at once, else :func:`_rows`."""
    if t.is_contiguous():
        width = t.shape[-1]
        return (t.numel() // width if width else 0), width
    return _rows(t, name)


def _output(out: Optional[Tensor], shape, like: Optional[Tensor] = None) -> Tensor:
    """``out`` checked (float32 CPU, contiguous, ``shape``), or a new tensor (``torch.empty`` with a
    dtype argument costs 2.8 µs, ``empty_like`` of a contiguous float32 tensor 0.9)."""
    if out is None:
        if like is not None and like.is_contiguous():
            return torch.empty_like(like)
        return torch.empty(shape, dtype=_F32)
    if out.shape != shape or out.dtype is not _F32 or not out.is_cpu or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(shape)}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def decoder_kernels() -> list:
    """Every native decoder kernel set of this build (dicts: name, isa, kind, supported)."""
    return list(_native().decoder_kernels()) if _native_available() else []


def _rows(t: Tensor, name: str) -> tuple[int, int]:
    """(rows, row stride) of ``t`` seen as rows of its last dimension, read in place."""
    if t.dim() < 1 or t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have unit stride in its last dimension")
    rows = t.numel() // max(1, t.shape[-1])
    if t.dim() == 1 or rows <= 1:
        return rows, t.shape[-1]
    lead = t.shape[:-1]
    stride = t.stride(-2)
    # rows evenly spaced: every leading dimension's stride is the next one's times its size
    expect = stride
    for size, st in zip(reversed(lead), reversed(t.stride()[:-1])):
        if size > 1 and st != expect:
            raise ValueError(f"{name}'s rows must be evenly spaced (make it contiguous)")
        expect = st * size if size > 1 else expect
    return rows, stride


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float, add: Optional[Tensor] = None) -> Tensor:
    """The math in torch, as Hugging Face's LLaMA RMSNorm computes it (in float32 whatever the dtype)."""
    if add is not None:
        x.add_(add)
    x32 = x.to(_F32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, add: Optional[Tensor] = None, out: Optional[Tensor] = None,
             num_threads: int = 0, kernel: str = "") -> Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, after ``x += add`` (in place)
    when ``add`` is given. Into ``out`` (contiguous, ``x``'s shape; not ``x``) or a new tensor;
    ``num_threads``: 0 for :func:`~sparsert.ops.get_num_threads`; ``kernel`` forces a native kernel set."""
    shape = x.shape
    width = shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight must be ({width},), got {tuple(weight.shape)}")
    if add is not None and add.shape != shape:
        raise ValueError(f"add must have x's shape {tuple(shape)}, got {tuple(add.shape)}")
    if not (_native_for(x, weight) if add is None else _native_for(x, weight, add)):
        y = rms_norm_torch(x, weight, eps, add)
        return y if out is None else out.copy_(y)
    rows, x_stride = _rows_of(x, "x")
    add_stride = 0 if add is None else _rows_of(add, "add")[1]
    if not weight.is_contiguous():
        weight = weight.contiguous()
    out = _output(out, shape, x)
    native_or_none().rms_norm(x.data_ptr(), x_stride, 0 if add is None else add.data_ptr(), add_stride, weight.data_ptr(),
                        eps, out.data_ptr(), width, rows, width, num_threads or get_num_threads(), kernel)
    return out


def swiglu_torch(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: Tensor, *, out: Optional[Tensor] = None, num_threads: int = 0, kernel: str = "") -> Tensor:
    """``silu(gate) * up`` where ``gate_up``'s last dimension holds gate then up (one fused Linear's
    output); into ``out`` (contiguous, half as wide) or a new tensor."""
    shape = gate_up.shape
    if shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (gate then up), got {shape[-1]}")
    if not _native_for(gate_up):
        y = swiglu_torch(gate_up)
        return y if out is None else out.copy_(y)
    rows, stride = _rows_of(gate_up, "gate_up")
    width = shape[-1] // 2
    out = _output(out, (*shape[:-1], width))
    native_or_none().swiglu(gate_up.data_ptr(), stride, out.data_ptr(), width, rows, width, num_threads or get_num_threads(),
                      kernel)
    return out


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def cached_attention_torch(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, position: int,
                           heads: int, kv_heads: int, scale: float) -> Tensor:
    """The math in torch (the reference of :func:`cached_attention`)."""
    batch = qkv.shape[0]
    d = k_cache.shape[-1]
    q = _rotate(qkv[:, : heads * d].reshape(batch, heads, d), cos, sin)
    k = _rotate(qkv[:, heads * d:(heads + kv_heads) * d].reshape(batch, kv_heads, d), cos, sin)
    k_cache[:, :, position] = k
    v_cache[:, :, position] = qkv[:, (heads + kv_heads) * d:].reshape(batch, kv_heads, d)
    keys, values = k_cache[:, :, : position + 1], v_cache[:, :, : position + 1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, d)
    p = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, values).reshape(batch, heads * d)


def cached_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, position: int, *,
                     heads: int, kv_heads: int, scale: float, out: Optional[Tensor] = None, num_threads: int = 0,
                     kernel: str = "") -> Tensor:
    """One decode step's attention. ``qkv``: ``(batch, (heads + 2 kv_heads) * head_dim)``, each row q
    then k then v of a sequence's new token; ``cos``, ``sin``: ``(head_dim,)``, the token's rotary
    angle (LLaMA's rotate_half convention); ``k_cache``, ``v_cache``: ``(batch, kv_heads, capacity,
    head_dim)``, written at ``position`` (the number of tokens cached before this one). Returns
    ``(batch, heads * head_dim)``: each query head's softmax-weighted values over positions
    ``0..position`` of its key/value head (head ``h`` uses ``h // (heads // kv_heads)``); into ``out``
    (contiguous) or a new tensor."""
    if qkv.dim() != 2 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("qkv must be (batch, width) and the caches (batch, kv_heads, capacity, head_dim) alike, got "
                         f"{tuple(qkv.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, kvh, capacity, d = k_cache.shape
    if kv_heads != kvh or heads < 1 or heads % kv_heads or d % 2:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads}, the caches': {kvh}) and "
                         f"head_dim ({d}) even")
    if qkv.shape != (batch, (heads + 2 * kv_heads) * d):
        raise ValueError(f"qkv must be ({batch}, {(heads + 2 * kv_heads) * d}), got {tuple(qkv.shape)}")
    if cos.shape != (d,) or sin.shape != (d,):
        raise ValueError(f"cos and sin must be ({d},), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if not 0 <= position < capacity:
        raise ValueError(f"position {position} is outside the cache's capacity {capacity}")
    if d > 512 or not _native_for(qkv, cos, sin, k_cache, v_cache):
        y = cached_attention_torch(qkv, cos, sin, k_cache, v_cache, position, heads, kv_heads, scale)
        return y if out is None else out.copy_(y)
    ks = k_cache.stride()
    if qkv.stride(1) != 1 or ks[1:] != (capacity * d, d, 1) or v_cache.stride() != ks:
        raise ValueError("qkv's rows and the caches' (kv_heads, capacity, head_dim) blocks must be contiguous, "
                         "the two caches strided alike")
    if not cos.is_contiguous():
        cos = cos.contiguous()
    if not sin.is_contiguous():
        sin = sin.contiguous()
    out = _output(out, (batch, heads * d))
    native_or_none().cached_attention(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                v_cache.data_ptr(), ks[0], capacity * d, capacity, position, out.data_ptr(), heads * d,
                                batch, heads, kv_heads, d, scale, num_threads or get_num_threads(), kernel)
    return out
