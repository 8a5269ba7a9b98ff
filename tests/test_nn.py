"""SparseLinear / SparseConv2d against torch's dense layers (float64 references)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsert
from sparsert.formats import BSR, CSR, NM, pack
from sparsert.nn import SparseConv2d, SparseLinear

KINDS = ["dense", "csr", "bsr4x1", "bsr1x4", "bsr8x1", "bsr4x4", "nm2:4", "bitmask16"]


def pruned_weight(rows, cols, kind, density=0.3):
    """A random weight whose zero pattern fits ``kind``."""
    w = torch.randn(rows, cols)
    if kind.startswith("nm"):
        n, m = (int(v) for v in kind[2:].split(":"))
        groups = -(-cols // m)
        keep = torch.zeros(rows, groups * m, dtype=torch.bool)
        idx = torch.rand(rows, groups, m).argsort(-1)[..., :n]
        keep.view(rows, groups, m).scatter_(-1, idx, True)
        return w * keep[:, :cols]
    r, c = (int(v) for v in kind[3:].split("x")) if kind.startswith("bsr") else (1, 1)
    keep = torch.rand(-(-rows // r), -(-cols // c)) < density
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return w * keep


def ref_linear(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return torch.relu(y) if act == "relu" else F.gelu(y) if act == "gelu" else y


def assert_close64(out, ref):
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,cols", [(13, 37), (64, 48), (1, 5)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_sparse_linear_matches_dense(kind, rows, cols, tokens):
    lin = nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.copy_(pruned_weight(rows, cols, kind))
    sl = SparseLinear.from_dense(lin, kind)
    assert sl.format == kind.replace("nm2:4", "nm2:4")
    assert (sl.in_features, sl.out_features) == (cols, rows)
    x = torch.randn(tokens, cols)
    assert_close64(sl(x), ref_linear(x, lin.weight, lin.bias, None))


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("kind", ["csr", "bsr4x1", "dense"])
def test_sparse_linear_activation_bias_and_leading_dims(activation, kind):
    w = pruned_weight(24, 40, kind)
    b = torch.randn(24)
    sl = SparseLinear(pack(w, kind), b, activation=activation)
    x = torch.randn(2, 3, 40)
    out = sl(x)
    assert out.shape == (2, 3, 24)
    assert_close64(out, ref_linear(x, w, b, activation))
    assert sl.activation == activation
    no_bias = SparseLinear(pack(w, kind), None, activation=activation)
    assert no_bias.bias is None
    assert_close64(no_bias(x), ref_linear(x, w, None, activation))


@pytest.mark.parametrize("kind", KINDS)
def test_linear_round_trip_is_exact(kind):
    lin = nn.Linear(33, 20, bias=kind != "csr")
    with torch.no_grad():
        lin.weight.copy_(pruned_weight(20, 33, kind))
    back = SparseLinear.from_dense(lin, kind).to_dense()
    assert isinstance(back, nn.Linear) and back.in_features == 33 and back.out_features == 20
    assert torch.equal(back.weight, lin.weight)
    assert (back.bias is None) == (lin.bias is None)
    if lin.bias is not None:
        assert torch.equal(back.bias, lin.bias)


@pytest.mark.parametrize("kind,names", [
    ("csr", ["packed_row_ptr", "packed_col_indices", "packed_values"]),
    ("bsr4x1", ["packed_row_ptr", "packed_col_indices", "packed_blocks"]),
    ("nm2:4", ["packed_values", "packed_col_indices"]),
    ("dense", ["packed_weight"]),
    ("bitmask16", ["packed_masks", "packed_values"]),
])
def test_packed_tensors_are_buffers_and_state_dict_round_trips(kind, names):
    w = pruned_weight(16, 24, kind)
    sl = SparseLinear(pack(w, kind), torch.randn(16))
    assert [n for n in sl.state_dict() if n != "bias"] == names
    if kind != "dense":
        for n, t in sl.packed.tensors().items():
            assert getattr(sl, "packed_" + n) is t
    # load into a module with the same pattern but other values
    other = SparseLinear(pack(w * 2, kind), torch.zeros(16))
    other.load_state_dict(sl.state_dict())
    x = torch.randn(5, 24)
    assert torch.equal(other(x), sl(x))
    assert torch.equal(other.to_dense().weight, sl.to_dense().weight)


def test_to_keeps_format_in_sync_and_values_float32():
    w = pruned_weight(16, 24, "csr")
    sl = SparseLinear(pack(w, "csr"), torch.randn(16))
    sl.double()
    assert sl.packed_values.dtype == torch.float32
    assert sl.packed.values is sl.packed_values
    assert sl.bias.dtype == torch.float64
    x = torch.randn(3, 24, dtype=torch.float64)
    out = sl(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_linear(x, w, sl.bias.float(), None), rtol=1e-4, atol=1e-4)
    sl.to("cpu")
    assert sl.packed.device == torch.device("cpu")


def test_nm_after_apply_keeps_kernel_row_ptr():
    w = pruned_weight(8, 16, "nm2:4")
    sl = SparseLinear(pack(w, "nm2:4")).float()
    assert "packed_kernel_row_ptr" not in sl.state_dict()
    assert isinstance(sl.packed, NM) and sl.packed._row_ptr is sl.packed_kernel_row_ptr
    x = torch.randn(4, 16)
    assert_close64(sl(x), ref_linear(x, w, None, None))


def test_extra_repr_shows_format_density_bytes():
    w = pruned_weight(16, 24, "bsr4x1", density=0.25)
    sl = SparseLinear(pack(w, "bsr4x1"))
    text = repr(sl)
    assert "format=bsr4x1" in text
    assert f"density={sl.packed.density:.3f}" in text
    assert f"bytes={sl.packed.nbytes}" in text
    assert isinstance(sl.packed, BSR) and sl.packed_nbytes == sl.packed.nbytes


def test_inference_mode_and_gradients():
    w = pruned_weight(8, 12, "csr")
    sl = SparseLinear(pack(w, "csr"), torch.randn(8))
    x = torch.randn(3, 12)
    with torch.inference_mode():
        y = sl(x)
    assert_close64(y, ref_linear(x, w, sl.bias, None))
    assert not sl.bias.requires_grad
    y = sl(x.requires_grad_())
    y.sum().backward()  # x gets its gradient (tests/test_autograd.py); the packed weight none
    assert_close64(x.grad, torch.ones(3, 8, dtype=torch.float64) @ w.double())


def test_constructor_errors():
    with pytest.raises(TypeError, match="sparsert format"):
        SparseLinear([[1.0]])
    with pytest.raises(ValueError, match="bias"):
        SparseLinear(pack(pruned_weight(4, 4, "csr"), "csr"), torch.zeros(5))
    with pytest.raises(ValueError, match="activation"):
        SparseLinear(pack(pruned_weight(4, 4, "csr"), "csr"), activation="tanh")
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear(torch.zeros(4))
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(lin, "nm2:4")


# --------------------------------------------------------------------------- conv
CONV_CASES = [
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=8, kernel_size=(3, 1), stride=2, padding=(1, 0), groups=2),
    dict(in_channels=3, out_channels=4, kernel_size=2, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=3, dilation=2, padding="same", bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=8, out_channels=16, kernel_size=1),
]


def conv_ref(conv, x):
    """torch's conv in float64 (its 'same' with an even kernel warns about a padded copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'")
        return copy.deepcopy(conv).double()(x.double())


def pruned_conv(case, kind="csr"):
    conv = nn.Conv2d(**case)
    with torch.no_grad():
        w2 = pruned_weight(conv.weight.shape[0], conv.weight[0].numel(), kind, density=0.4)
        conv.weight.copy_(w2.reshape(conv.weight.shape))
    return conv


@pytest.fixture
def conv_path():
    return "op"  # (a dense-weight fallback existed while there was no conv op; there is one path now)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("kind", ["csr", "bsr4x1", "dense"])
def test_sparse_conv_matches_dense(case, kind, conv_path):
    conv = pruned_conv(case, kind)
    sc = SparseConv2d.from_dense(conv, kind)
    x = torch.randn(2, case["in_channels"], 9, 11)
    ref = conv_ref(conv, x)
    out = sc(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert sc.format == kind and sc.out_channels == case["out_channels"]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_round_trip_is_exact(case):
    conv = pruned_conv(case)
    back = SparseConv2d.from_dense(conv, "csr").to_dense()
    assert isinstance(back, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(back, attr) == getattr(conv, attr), attr
    assert torch.equal(back.weight, conv.weight)
    assert (back.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(back.bias, conv.bias)


def test_conv_keeps_no_dense_copy_and_float32_values():
    conv = pruned_conv(CONV_CASES[0])
    sc = SparseConv2d.from_dense(conv, "csr")
    assert set(sc.state_dict()) == {"packed_row_ptr", "packed_col_indices", "packed_values", "bias"}
    assert not hasattr(sc, "dense_weight_cache")
    assert isinstance(sc.packed, CSR) and sc.packed.shape == (8, 36)
    assert "format=csr" in repr(sc) and "bytes=" in repr(sc)
    sc.double()
    assert sc.packed.values.dtype == torch.float32


def test_conv_relu_activation_and_errors(conv_path):
    conv = pruned_conv(CONV_CASES[0])
    sc = SparseConv2d.from_dense(conv, "csr", activation="relu")
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(sc(x).double(), torch.relu(conv_ref(conv, x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        SparseConv2d(pack(pruned_weight(8, 35, "csr"), "csr"), in_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match="groups"):
        SparseConv2d(pack(pruned_weight(8, 18, "csr"), "csr"), in_channels=4, kernel_size=3, groups=3)
    with pytest.raises(ValueError, match="block rows"):
        SparseConv2d.from_dense(nn.Conv2d(6, 6, 3, groups=3), "bsr4x1")
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(2, 2))
    unbatched = torch.randn(4, 6, 6)
    torch.testing.assert_close(sc(unbatched), sc(unbatched[None])[0])


def test_top_level_names():
    assert sparsert.SparseLinear is SparseLinear
    assert sparsert.SparseConv2d is SparseConv2d


def test_dispatch_modes_see_the_op():
    """The eager fast path skips the dispatcher only when nothing is watching it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    w = pruned_weight(8, 12, "csr")
    sl = SparseLinear(pack(w, "csr"))
    x = torch.randn(2, 12)
    fast = sl(x)
    with Record() as rec:
        watched = sl(x)
    assert "sparsert.linear_bsr.default" in rec.ops
    assert torch.equal(fast, watched)


def test_inputs_of_the_wrong_width_are_refused_not_computed():
    """The kernels read x's width as the weight's: a wider x was silently multiplied by a zero-padded weight."""
    linear = nn.Linear(20, 8)
    linear.weight.data[:, ::2] = 0
    conv = nn.Conv2d(4, 8, 3)
    conv.weight.data[:, :, 0] = 0
    for kind in ("csr", "dense"):
        with pytest.raises(ValueError, match="in_features=20"):
            SparseLinear.from_dense(linear, kind)(torch.randn(3, 21))
        with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
            SparseConv2d.from_dense(conv, kind)(torch.randn(1, 5, 9, 9))
        with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
            SparseConv2d.from_dense(conv, kind)(torch.randn(4, 9))
