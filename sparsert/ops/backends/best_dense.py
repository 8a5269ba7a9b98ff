"""The fastest dense Linear torch offers on this CPU, for layers left dense
and as the baseline every benchmark reports.

Measured on a 2-core Zen 3 (fp32, 1 thread, thread CPU time; see
``benchmarks/bench_dense_paths.py``): oneDNN with a weight reordered once
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight`` +
``_linear_pointwise``, what ``torch.compile`` with freezing emits) runs
768->3072 / 3072->768 / 4096->4096 1.1-1.8x faster than eager ``F.linear``
from 2 to 16 tokens and ~1.1x at 128; for a single token eager ``F.linear``
(a GEMV) is 1.3-2.8x faster than the packed weight, so one token takes that
path. onnxruntime is faster still at 16-128 tokens (~1.15x) but is not a
runtime dependency; the benchmarks time it beside this when installed.
Packing for a fixed batch size (the op's optional hint) was within noise of
the batch-independent layout from 2 tokens on, so one packed weight serves
every call.

That rule of thumb is not always right: on small layers (384->384,
1536->384 at 16-512 tokens) eager ``F.linear`` measured 0-25% faster than the
packed weight. So a layer can be *tuned*: both paths timed at the token
counts it will see (``sparsert.nn.DenseLinear.tune``), the faster one kept
per token count (:func:`path_for`); a token count not measured takes the choice
of the nearest measured one.
"""

from __future__ import annotations

import bisect
import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_ACTIVATIONS = {None: "none", "none": "none", "relu": "relu"}
#: the dense paths a call can take: oneDNN's prepacked weight, eager ``F.linear``, sparsert's GEMV (1 token)
PATHS = ("onednn", "torch", "gemv")
#: the most tokens the "gemv" path takes (each token reads the weight again, from cache)
GEMV_MAX_ROWS = 4


def gemv_available() -> bool:
    """True when sparsert's native GEMV kernels (``sparsert._C.gemv``) load."""
    from ..._ext import native_or_none

    module = native_or_none()
    return module is not None and hasattr(module, "gemv")


def gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, num_threads: int = 0, kernel: str = "") -> Tensor:
    """``x @ weight.T + bias`` by sparsert's GEMV kernel: float32 CPU tensors, ``weight`` (out, in)
    with unit column stride, x of at most :data:`GEMV_MAX_ROWS` tokens. One token streams the weight
    from memory on every thread (torch's F.linear at one token streams it at one core's pace here:
    ~10 GB/s against ~20; ``benchmarks/RESULTS.md``)."""
    from ..._ext import native_or_none
    from .._threads import get_num_threads

    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_f}")
    if not gemv_available():
        raise RuntimeError("sparsert's native kernels are not built")
    if not (x.dtype is weight.dtype is torch.float32 and x.is_cpu and weight.is_cpu) or weight.stride(1) != 1:
        raise ValueError("gemv takes float32 CPU tensors and a weight with unit column stride")
    rows = x.numel() // max(in_f, 1)
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} tokens, got {rows}")
    x2 = x.reshape(rows, in_f)
    if x2.stride(-1) != 1 or (rows > 1 and x2.stride(0) < in_f):
        x2 = x2.contiguous()
    if bias is not None and (bias.shape != (out_f,) or bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().to(torch.float32).contiguous().reshape(out_f)
    y = torch.empty(*x.shape[:-1], out_f)
    native_or_none().gemv(weight.data_ptr(), weight.stride(0), x2.data_ptr(), x2.stride(0) if rows > 1 else in_f,
                         0 if bias is None else bias.data_ptr(), y.data_ptr(), out_f, out_f, in_f, rows,
                         num_threads or get_num_threads(), kernel)
    return y


def path_for(tuned: Mapping[int, str], rows: int) -> str:
    """The dense path (:data:`PATHS`) for a call of ``rows`` tokens, given the measured choices
    ``tuned`` ({token count: path}): the nearest measured count's (in ratio); with nothing
    measured the default rule, packed from 2 tokens; one token (a GEMV: eager F.linear measured
    1.3-2.8x faster than the packed weight, sparsert's GEMV 1.8-2.5x faster than F.linear from
    memory) takes sparsert's GEMV where it is built, else ``F.linear``, unless one token itself was
    measured."""
    for count, path in tuned.items():
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if int(count) < 1:
            raise ValueError(f"rows must be >= 1, got {count}")
    if not tuned or (rows <= 1 and 1 not in tuned):
        return ("gemv" if gemv_available() else "torch") if rows <= 1 else "onednn"
    counts = sorted(tuned)
    i = bisect.bisect_left(counts, rows)
    if i == len(counts):
        return tuned[counts[-1]]
    if i == 0 or counts[i] == rows:
        return tuned[counts[i]]
    lo, hi = counts[i - 1], counts[i]
    return tuned[lo if math.log(rows / lo) <= math.log(hi / rows) else hi]


def onednn_available() -> bool:
    """True when this torch build has oneDNN and its prepacked-Linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return (torch.ops.mkldnn._reorder_linear_weight is not None
                and torch.ops.mkldnn._linear_pointwise is not None)
    except (AttributeError, RuntimeError):
        return False


class PackedDenseLinear:
    """``act(x @ W.T + b)`` for a dense float32 weight packed once.

    ``backend`` is ``"onednn"`` (prepacked weight) or ``"torch"`` (plain
    ``F.linear``: no oneDNN in this build, or forced). A single token, and
    inputs the packed path does not take (another dtype or device, or
    anything that needs gradients), go through ``F.linear`` on the plain
    weight, so a call never fails for want of the fast path. The "onednn"
    backend keeps both layouts: twice the weight memory of the layer.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, *, backend: str = "auto"):
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
        if backend not in ("auto", "onednn", "torch"):
            raise ValueError(f"backend must be 'auto', 'onednn' or 'torch', got {backend!r}")
        w = weight.detach().to(torch.float32).contiguous()
        self.out_features, self.in_features = w.shape
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = bias.detach().to(torch.float32).contiguous()
        self.bias = bias
        use_onednn = backend == "onednn" or (backend == "auto" and w.device.type == "cpu" and onednn_available())
        if backend == "onednn" and not onednn_available():
            raise ValueError("backend='onednn' but this torch build has no oneDNN prepacked Linear")
        self.backend = "onednn" if use_onednn and w.numel() else "torch"
        self.weight = w  # the plain (out, in) layout
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w, None) if self.backend == "onednn" else None

    def __call__(self, x: Tensor, activation: Optional[str] = None, path: Optional[str] = None) -> Tensor:
        """``path`` forces ``"onednn"`` or ``"torch"`` for this call (``None``: the default rule of
        :func:`path_for`); a call the packed path cannot take runs ``F.linear`` whatever ``path`` says."""
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be None, 'none' or 'relu'; got {activation!r}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {self.in_features}")
        # Under torch.compile the plain F.linear is traced instead: Inductor lowers
        # mkldnn._linear_pointwise only for a weight that is a graph constant (freezing),
        # and the prepacked weight reaches the graph as an input (LoweringException).
        if path is not None and path not in PATHS:
            raise ValueError(f"path must be None or one of {PATHS}, got {path!r}")
        rows = x.numel() // max(x.shape[-1], 1)
        path = path or path_for({}, rows)
        fast = (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel()
                and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling())
        if fast and path == "onednn" and self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, _ACTIVATIONS[activation], [], "")
        if fast and path == "gemv" and rows <= GEMV_MAX_ROWS and self.weight.is_cpu and gemv_available():
            y = gemv(x, self.weight, self.bias)
            return torch.relu_(y) if _ACTIVATIONS[activation] == "relu" else y
        w = self.weight.to(x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return torch.relu(y) if _ACTIVATIONS[activation] == "relu" else y
