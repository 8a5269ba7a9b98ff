"""``SparseLinear`` and ``SparseConv2d``: inference layers over a packed weight.

Storage
-------
The packed weight's arrays are registered as (persistent) buffers of the
module, so ``.to(device)``, ``state_dict`` and ``load_state_dict`` work. The
buffer names are ``"packed_" + name`` for every ``name`` in
``module.packed.tensors()``:

============  =================================================================
format        buffers
============  =================================================================
CSR           ``packed_row_ptr``, ``packed_col_indices``, ``packed_values``
BSR           ``packed_row_ptr``, ``packed_col_indices``, ``packed_blocks``
N:M           ``packed_values``, ``packed_col_indices`` (plus the non-persistent
              ``packed_kernel_row_ptr``, derived from the shape)
bitmask16     ``packed_masks``, ``packed_values`` (plus the non-persistent
              ``packed_row_offsets`` and ``packed_padded_values``; Linear only)
rowgroup4     ``packed_seg_ptr``, ``packed_columns``, ``packed_values`` (Linear only)
q8bsr1x4      ``packed_row_ptr``, ``packed_col_indices``, ``packed_qblocks`` (int8),
              ``packed_scales`` (float32 per row; Linear only, ``precision`` "int8")
dense         ``packed_weight``
============  =================================================================

``module.packed`` is the format object (``CSR``/``BSR``/``NM`` or a dense
``Tensor``), always in sync with the buffers; ``module.packed.kind`` and
``module.packed.shape`` describe it. Stored sparse values stay float32 (what
the kernels compute in) even after ``module.half()``/``.double()``; inputs of
other dtypes are computed in float32 and cast back.

These layers are for inference, with frozen weights: gradients flow through
them to their input (and to a bias that requires grad), eagerly and under
``torch.compile``, so the layers before them can train; the packed weight gets
no gradient (see :mod:`sparsert.ops.schema`).
"""

from __future__ import annotations

import statistics
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops as _ops
from ..formats import SparseFormat, pack
from ..formats._common import IdentityCache
from ..ops import epilogue
from ..ops.backends.best_dense import GEMV_MAX_ROWS, PackedDenseLinear, gemv, gemv_available, path_for
from ..ops.conv import conv_padding, pair

__all__ = ["SparseLinear", "SparseConv2d", "DenseLinear", "Int8DenseLinear"]


def _with_params(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """Copies weight (and bias) into a freshly built dense module; returns it."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


class _PackedWeight(nn.Module):
    """Shared storage logic: packed arrays as buffers, the format object in sync."""

    _fmt: Union[SparseFormat, None]

    def _init_packed(self, packed) -> None:
        if isinstance(packed, Tensor):
            if packed.dim() != 2 or not packed.dtype.is_floating_point:
                raise ValueError(f"a dense packed weight must be a 2-D floating tensor, got shape "
                                 f"{tuple(packed.shape)} and dtype {packed.dtype}")
            self._fmt = None
            self.register_buffer("packed_weight", packed.detach().contiguous())
            self._block = (1, 1)
            return
        if not isinstance(packed, SparseFormat):
            raise TypeError(f"packed must be a sparsert format (CSR, BSR, NM) or a dense 2-D tensor, "
                            f"got {type(packed).__name__}")
        self._fmt = packed
        for name, tensor in packed.tensors().items():
            self.register_buffer("packed_" + name, tensor)
        # arrays the kernels need but files do not store (N:M's regular row pointer)
        for name, tensor in packed.derived_tensors().items():
            self.register_buffer("packed_" + name, tensor, persistent=False)
        self._array_names = tuple(packed.tensors()) + tuple(packed.derived_tensors())
        self._buffer_names = tuple("packed_" + n for n in self._array_names)
        self._kernel_cache = IdentityCache()
        self._block = tuple(int(v) for v in packed.kernel_arrays()[3:])

    @property
    def packed(self):
        """The packed weight: a sparsert format object, or a dense ``Tensor``."""
        fmt = self._fmt
        if fmt is None:
            return self.packed_weight
        fmt.set_tensors({n: self._buffers[b] for n, b in zip(self._array_names, self._buffer_names)})
        return fmt

    @property
    def format(self) -> str:
        """The packed weight's kind: "dense", "csr", "bsr4x1", "nm2:4", ..."""
        return "dense" if self._fmt is None else self._fmt.kind

    @property
    def precision(self) -> str:
        """What the weight is stored and computed in: "int8" (q8bsr1x4) or "fp32"."""
        return "fp32" if self._fmt is None else getattr(self._fmt, "precision", "fp32")

    @property
    def density(self) -> float:
        if self._fmt is None:
            w = self.packed_weight
            return float((w != 0).sum()) / w.numel() if w.numel() else 0.0
        return self._fmt.density

    @property
    def packed_nbytes(self) -> int:
        """Bytes of the stored weight arrays (what a file holds for the weight)."""
        if self._fmt is None:
            return self.packed_weight.numel() * self.packed_weight.element_size()
        return self.packed.nbytes

    def _weight_2d(self) -> Tensor:
        """The weight as a dense 2-D tensor (float32 for sparse formats)."""
        return self.packed_weight if self._fmt is None else self.packed.to_dense()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._fmt is not None:
            # Sparse values stay float32 whatever dtype the model is cast to.
            for name in self._array_names:
                t = self._buffers["packed_" + name]
                if t.is_floating_point() and t.dtype != torch.float32:
                    self._buffers["packed_" + name] = t.to(torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loading copies into the buffers in place, which bumps no version counter
        # on inference tensors (a server that builds its layers under
        # torch.inference_mode): new tensor objects over the same storage make the
        # kernels validate and copy the loaded index arrays again.
        for name in getattr(self, "_buffer_names", ()):
            self._buffers[name] = self._buffers[name].detach()

    def _kernel_arrays(self):
        """(row_ptr, col_indices, values) as the kernels take them (bitmask: masks,
        row_offsets, values), rebuilt only when a
        buffer is replaced (``.to()``, ``load_state_dict``): a layer's per-call cost."""
        current = tuple(map(self._buffers.__getitem__, self._buffer_names))
        cache = self._kernel_cache
        return cache.lookup(current) or cache.store(current, self.packed.kernel_arrays()[:3])


def _check_bias(bias, rows: int) -> Optional[Tensor]:
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (rows,):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must be a tensor of shape ({rows},), got {shape}")
    return bias


class SparseLinear(_PackedWeight):
    """``act(x @ W.T + bias)`` with ``W`` packed (CSR, BSR, N:M) or dense.

    Args:
        packed: a sparsert format (``out_features x in_features``) or a dense 2-D tensor.
        bias: optional ``(out_features,)`` tensor (stored as a frozen parameter).
        activation: an epilogue name (:mod:`sparsert.ops.epilogue`): ``None``,
            ``"relu"``, ``"relu6"`` (fused in the kernel) or ``"gelu"``.

    ``forward`` calls :func:`sparsert.ops.linear_arrays` (what
    :func:`sparsert.ops.linear` calls) with the kernel arrays prepared once.
    """

    def __init__(self, packed, bias: Optional[Tensor] = None, activation: Optional[str] = None):
        super().__init__()
        self._init_packed(packed)
        self._bitmask = self._fmt is not None and self._fmt.LINEAR_OP == "bitmask"
        self._int8 = self._fmt is not None and self._fmt.LINEAR_OP == "q8bsr"
        self._rowgroup = self._fmt is not None and self._fmt.LINEAR_OP == "rowgroup"
        self.out_features, self.in_features = (int(s) for s in (packed.shape))
        self._act = epilogue.code_of(activation)
        self.activation = epilogue.name_of(self._act)
        bias = _check_bias(bias, self.out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear, format: str = "csr", activation: Optional[str] = None) -> "SparseLinear":
        """Packs ``linear.weight`` (zeros are the pruned entries) in the format named ``format``.

        ``format`` is a kind string: ``"dense"``, ``"csr"``, ``"bsrRxC"`` or ``"nmN:M"``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        return cls(pack(linear.weight.detach(), format), linear.bias, activation)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly the stored weight and bias (the activation is not included)."""
        w = self._weight_2d()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        return _with_params(out, w, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:  # (the kernels take x's width as the weight's: check it is)
            raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features="
                             f"{self.in_features}")
        if self._fmt is None:
            return _ops.linear(x, self.packed_weight, self.bias, self.activation)
        rp, ci, val = self._kernel_arrays()
        # (nn.Module's __getattr__ costs a microsecond per parameter or buffer: read its dicts)
        params = self._parameters
        bias = params["bias"] if "bias" in params else self.bias
        if self._bitmask:
            return _ops.linear_bitmask_arrays(x, rp, ci, val, self.out_features, bias, self._act)
        if self._rowgroup:
            return _ops.linear_rowgroup_arrays(x, rp, ci, val, self.out_features, bias, self._act)
        if self._int8:
            return _ops.linear_q8_arrays(x, rp, ci, val, self._buffers["packed_scales"], self.out_features, bias,
                                         self._act)
        return _ops.linear_arrays(x, rp, ci, val, self.out_features, self._block[0], self._block[1], bias,
                                  self._act)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
             f"density={self.density:.3f}, bytes={self.packed_nbytes}, bias={self.bias is not None}")
        return s + (f", activation={self.activation}" if self.activation else "")


class SparseConv2d(_PackedWeight):
    """``nn.Conv2d`` over a packed weight.

    The packed weight is the conv weight flattened to
    ``(out_channels, in_channels // groups * kh * kw)`` (``weight.reshape(out_channels, -1)``).
    ``forward`` calls :func:`sparsert.ops.conv2d_arrays` (what
    :func:`sparsert.ops.conv2d` calls) with the kernel arrays and the padding
    (:func:`sparsert.ops.conv.conv_padding`, torch's rule) prepared once.
    """

    def __init__(self, packed, bias: Optional[Tensor] = None, *, in_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                 activation: Optional[str] = None):
        super().__init__()
        self._init_packed(packed)
        if self._fmt is not None and self._fmt.LINEAR_OP != "bsr":
            raise ValueError(f"SparseConv2d takes block-sparse formats (csr, bsrRxC, nmN:M) or dense; "
                             f"{self._fmt.kind} runs Linear layers only")
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding")
        self.groups = int(groups)
        self.in_channels = int(in_channels)
        self.out_channels = int(packed.shape[0])
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={self.out_channels}")
        if self.groups > 1 and (self.out_channels // self.groups) % self._block[0]:
            raise ValueError(f"with groups={self.groups}, out_channels/groups={self.out_channels // self.groups} "
                             f"must be a multiple of the format's block rows ({self._block[0]})")
        kh, kw = self.kernel_size
        cols = self.in_channels // self.groups * kh * kw
        if int(packed.shape[1]) != cols:
            raise ValueError(f"packed weight has {packed.shape[1]} columns; in_channels/groups*kh*kw = {cols}")
        self.padding_mode = padding_mode
        self._op_padding, self._pre_pad = conv_padding(self.padding, self.kernel_size, self.dilation, self.stride,
                                                       padding_mode)
        self._op_stride, self._op_dilation = list(self.stride), list(self.dilation)
        self._op_kernel = list(self.kernel_size)
        self._act = epilogue.code_of(activation)
        self.activation = epilogue.name_of(self._act)
        bias = _check_bias(bias, self.out_channels)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, format: str = "csr", activation: Optional[str] = None) -> "SparseConv2d":
        """Packs ``conv.weight.reshape(out_channels, -1)`` in the format named ``format``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight.detach()
        return cls(pack(w.reshape(w.shape[0], -1), format), conv.bias, in_channels=conv.in_channels,
                   kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
                   activation=activation)

    def weight_4d(self) -> Tensor:
        """The weight as ``(out_channels, in_channels // groups, kh, kw)``."""
        return self._weight_2d().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with exactly the stored weight and bias (the activation is not included)."""
        w = self.weight_4d()
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, self.groups, self.bias is not None, self.padding_mode,
                        device=w.device, dtype=w.dtype)
        return _with_params(out, w, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:  # (the kernels take x's channels as given)
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) or ({self.in_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        if self._fmt is None:
            w = self.weight_4d()
            x = _ops.conv.apply_pre_pad(x, self._pre_pad, self.padding_mode)
            return _ops.conv2d(x, w if x.dtype == w.dtype else w.to(x.dtype),
                               None if self.bias is None else self.bias.to(x.dtype), self.stride, self._op_padding,
                               self.dilation, self.groups, self.activation)
        rp, ci, val = self._kernel_arrays()
        return _ops.conv2d_arrays(x, rp, ci, val, self.out_channels, self._op_kernel, self._block[0],
                                  self._block[1], self.bias, self._op_stride, self._op_padding, self._op_dilation,
                                  self.groups, self._act, 0, self._pre_pad, self.padding_mode)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, format={self.format}, "
             f"density={self.density:.3f}, bytes={self.packed_nbytes}, bias={self.bias is not None}")
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + (f", activation={self.activation}" if self.activation else "")



def _frozen_linear_like(cls, linear: nn.Linear):
    """An instance of the nn.Linear subclass ``cls`` holding ``linear``'s weight and bias
    storage (no copy), frozen: DenseLinear and Int8DenseLinear are built this way."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
              dtype=linear.weight.dtype)
    out.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return out


def _params_identity(w: Tensor, b: Optional[Tensor]) -> tuple:
    """What a cache derived from (w, b) must match to stay valid: the tensors, where
    their data lives and their version counters (in-place edits bump them)."""
    return (id(w), w.data_ptr(), w._version, id(b), None if b is None else (b.data_ptr(), b._version))


class DenseLinear(nn.Linear):
    """An ``nn.Linear`` that runs through the best dense path (:class:`PackedDenseLinear`:
    oneDNN with a prepacked weight from 2 tokens, ``F.linear`` for one): what
    :func:`sparsert.sparsify` puts where a layer stays dense, so a sparsified model is
    never slower than the best dense path layer by layer.

    It *is* an ``nn.Linear`` (same parameters, ``state_dict`` and files: a plain dense
    weight); the packed copy of the weight is rebuilt when the weight or bias tensor
    changes (replaced, moved, edited in place). Calls that need autograd through the
    weight, and inputs the packed path does not take, run ``F.linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DenseLinear":
        """A frozen DenseLinear sharing ``linear``'s weight and bias storage (no copy)."""
        return _frozen_linear_like(cls, linear)

    def _packed_layer(self) -> PackedDenseLinear:
        w, b = self.weight, self.bias
        key = _params_identity(w, b)
        cached = self.__dict__.get("_packed_cache")
        if cached is None or cached[0] != key:
            cached = (key, PackedDenseLinear(w, b))
            self.__dict__["_packed_cache"] = cached
        return cached[1]

    def __getstate__(self):
        # the prepacked oneDNN weight is an opaque tensor that cannot be copied or pickled:
        # copies (copy.deepcopy, pickle) drop it and re-pack on their first call
        state = dict(super().__getstate__())
        state.pop("_packed_cache", None)
        return state

    @property
    def tuned_paths(self) -> dict:
        """{token count: ``"onednn"``, ``"torch"`` or ``"gemv"``}: the path measured faster at that count by
        :meth:`tune` (other counts follow the nearest one); empty = the default rule."""
        return dict(self.__dict__.get("_tuned_paths", {}))

    def tune(self, x: Tensor, min_time: float = 0.02, rounds: int = 5, margin: float = 0.05) -> dict:
        """Times the dense paths (oneDNN prepacked, eager ``F.linear``, and sparsert's GEMV up to
        :data:`~sparsert.ops.backends.best_dense.GEMV_MAX_ROWS` tokens) on ``x``, interleaved,
        and keeps one for calls with ``x``'s token count: the default rule's path
        (:func:`~sparsert.ops.backends.best_dense.path_for` with nothing measured) unless the
        other measures more than ``margin`` (a share, 0.05 = 5%) faster. On ~100 us layers the
        two paths often differ by less than their run-to-run spread, and without a margin the
        choice flipped with the noise. Returns the median seconds per call of each path,
        ``{"onednn": s, "torch": s, "gemv": s}`` (those that can run); the
        choice is in :attr:`tuned_paths`."""
        from ..convert.timing import call_times  # timing lives with the converter

        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be a tensor with {self.in_features} features in its last dim, got "
                             f"{getattr(x, 'shape', type(x))}")
        rows = x.numel() // self.in_features
        if rows < 1:
            raise ValueError("x has no tokens to time")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        layer = self._packed_layer()
        paths = [p for p in ("onednn", "torch") if p == "torch" or layer.backend == "onednn"]
        if rows <= GEMV_MAX_ROWS and x.dtype == torch.float32 and x.is_cpu and gemv_available():
            paths.append("gemv")
        samples: dict = {p: [] for p in paths}
        with torch.no_grad():
            for p in paths:  # warm-up: first calls allocate and page the weights in
                layer(x, path=p)
            for _ in range(max(1, rounds)):
                for p in paths:
                    samples[p].extend(call_times(lambda: layer(x, path=p), min_time / max(1, rounds), 3))
        times = {p: statistics.median(v) for p, v in samples.items()}
        best = min(times, key=times.get)
        default = path_for({}, rows)
        if default not in times:  # (no oneDNN in this build: eager is the default from 2 tokens)
            default = "torch"
        if times[best] > times[default] * (1 - margin):
            best = default
        tuned = self.__dict__.setdefault("_tuned_paths", {})
        tuned[int(rows)] = best
        self.__dict__["_path_memo"] = {}  # the nearest-count choices may have moved
        return times

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # Inductor compiles (and with freezing prepacks) the plain Linear itself;
            # the packed cache below is eager-only (Dynamo cannot trace is_inference()).
            return super().forward(x)
        w = self.weight
        b = self.bias
        needs_grad = torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))
        if w.dtype != torch.float32 or not w.is_cpu or w.is_inference() or needs_grad:
            return super().forward(x)
        if x.dtype != torch.float32 or not self.in_features:
            return self._packed_layer()(x)
        # The path per token count is memoised and the eager path calls F.linear directly: the
        # packed layer's checks cost ~10 us per call (measured), ~10% of a 384->384 layer at 16 tokens.
        rows = x.numel() // self.in_features
        memo = self.__dict__.setdefault("_path_memo", {})
        path = memo.get(rows)
        if path is None:
            path = path_for(self.__dict__.get("_tuned_paths", {}), rows)
            if path == "onednn" and self._packed_layer().backend != "onednn":
                path = "torch"
            if path == "gemv" and (rows > GEMV_MAX_ROWS or w.stride(1) != 1):
                path = "torch"
            memo[rows] = path
        if path == "torch":
            return F.linear(x, w, b)
        if path == "gemv":  # (straight to the kernel: the packed layer's checks cost more than a small GEMV)
            return gemv(x, w, b)
        return self._packed_layer()(x, path=path)

    def extra_repr(self) -> str:
        tuned = self.tuned_paths
        return super().extra_repr() + (f", tuned_paths={tuned}" if tuned else "")


class Int8DenseLinear(nn.Linear):
    """An ``nn.Linear`` run as torch's dynamic int8 Linear (FBGEMM/oneDNN:
    ``torch.ops.quantized.linear_dynamic``; weights symmetric int8 per output channel,
    activations quantised per call): what ``sparsify(precision="int8")`` puts where a
    layer stays dense, so an int8 model is never slower than int8 dense layer by layer.

    Its parameters, ``state_dict`` and files are those of the float ``nn.Linear`` (the
    int8 weight is derived from it and rebuilt when the weight or bias changes).
    Inference only: calls that need autograd run ``F.linear`` in float.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DenseLinear":
        """A frozen Int8DenseLinear sharing ``linear``'s weight and bias storage (no copy)."""
        return _frozen_linear_like(cls, linear)

    precision = "int8"

    def _packed_params(self):
        w, b = self.weight, self.bias
        key = _params_identity(w, b)
        cached = self.__dict__.get("_int8_cache")
        if cached is None or cached[0] != key:
            w32 = w.detach().to(torch.float32)
            scales = (w32.abs().amax(1) / 127).clamp_min(1e-12).to(torch.float64)
            with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; the op still runs
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                qw = torch.quantize_per_channel(w32, scales, torch.zeros(w32.shape[0], dtype=torch.int64), 0,
                                                torch.qint8)
            bias = None if b is None else b.detach().to(torch.float32)
            cached = (key, torch.ops.quantized.linear_prepack(qw, bias))
            self.__dict__["_int8_cache"] = cached
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if not w.is_cpu or torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return super().forward(x)
        x32 = x if x.dtype == torch.float32 else x.float()
        # reduce_range: FBGEMM's AVX2 path uses 7-bit activations so vpmaddubsw cannot saturate
        y = torch.ops.quantized.linear_dynamic(x32.contiguous(), self._packed_params(), True)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
