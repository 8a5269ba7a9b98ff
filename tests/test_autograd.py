"""Gradients through the sparse ops: x (and bias) get torch's gradients, the packed weight stays frozen.

The ops compute in float32, so a finite-difference ``gradcheck`` runs with a
step (1e-3) whose rounding error stays far below its tolerance; the exact check
is the comparison with the dense op's autograd in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert import ops
from sparsert.formats import pack
from sparsert.nn import SparseConv2d, SparseLinear

ACTIVATIONS = [None, "relu", "gelu", "relu6"]


def pruned(*shape, density=0.4, block=(1, 1)):
    """A weight with exact zeros in whole blocks of its flattened (out, rest) matrix."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    r, c = block
    keep = torch.rand(-(-rows // r), -(-cols // c)) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return (torch.randn(rows, cols) * mask).reshape(shape)


def dense_activation(y, activation):
    if activation == "relu":
        return torch.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    if activation == "gelu":
        return F.gelu(y)
    return y


KINDS = {"csr": (1, 1), "bsr4x1": (4, 1), "nm2:4": (1, 4)}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradients_equal_the_dense_ops_in_float64(kind, activation):
    w = pruned(12, 16, block=KINDS[kind]) if kind != "nm2:4" else _two_four(12, 16)
    fmt = pack(w, kind)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 12, dtype=torch.float64)
    y = ops.linear(x, fmt, bias, activation)
    gx, gb = torch.autograd.grad(y, (x, bias), dy)
    y_ref = dense_activation(F.linear(x, w.double(), bias), activation)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, bias), dy)
    # x's gradient is dy . W in float64 (exact but for the float32 forward feeding the epilogue's mask / GELU)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)
    if activation is None:  # no float32 forward involved at all: equal to the last bits
        torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)


def _two_four(rows, cols):
    w = torch.randn(rows, cols).reshape(rows, cols // 4, 4)
    w[..., 1::2] = 0
    return w.reshape(rows, cols)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_gradcheck(activation):
    w = pruned(7, 10, density=0.5)
    fmt = pack(w, "csr")
    # keep pre-activations away from ReLU's / ReLU6's kinks, where finite differences are not the derivative
    x = torch.randn(4, 10, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64)
    pre = F.linear(x, w.double(), bias)
    bias = (bias + torch.where(pre.abs().min(0).values < 0.05, 0.3, 0.0)).requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: ops.linear(x, fmt, b, activation), (x, bias), eps=1e-3,
                                    atol=2e-3, rtol=2e-3)


def test_a_wrong_gradient_fails_the_gradcheck():
    """The gradcheck's step and tolerances can fail: a backward with the weight's columns shuffled does."""
    w = pruned(7, 10, density=0.5)
    fmt, wrong = pack(w, "csr"), w[:, torch.randperm(10)].double()
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)

    class Mixed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return ops.linear(x, fmt)

        @staticmethod
        def backward(ctx, g):
            return g @ wrong

    assert not torch.autograd.gradcheck(Mixed.apply, (x,), eps=1e-3, atol=2e-3, rtol=2e-3, raise_exception=False)


@pytest.mark.parametrize("kind", ["csr", "bsr4x1"])
@pytest.mark.parametrize("case", [
    # (x shape, out, kernel, stride, padding, dilation, groups, activation)
    ((2, 6, 7, 9), 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, None),
    ((1, 6, 8, 8), 8, (3, 3), (2, 1), (0, 1), (1, 1), 1, "relu"),
    ((1, 4, 9, 7), 8, (3, 2), (2, 2), (1, 0), (2, 1), 2, "gelu"),
    ((2, 6, 5, 5), 12, (1, 1), (1, 1), (0, 0), (1, 1), 1, "relu6"),
])
def test_conv_gradients_equal_the_dense_ops_in_float64(kind, case):
    shape, out, ks, stride, padding, dilation, groups, activation = case
    w = pruned(out, shape[1] // groups, *ks, block=(4, 1) if kind == "bsr4x1" else (1, 1))
    cw = ops.ConvWeight.from_dense(w, kind)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True)
    y = ops.conv2d(x, cw, bias, stride, padding, dilation, groups, activation)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), dy)
    y_ref = dense_activation(F.conv2d(x, w.double(), bias, stride, padding, dilation, groups), activation)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, bias), dy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)


def test_conv_gradcheck():
    w = pruned(4, 3, 3, 3, density=0.5)
    cw = ops.ConvWeight.from_dense(w, "csr")
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.conv2d(x, cw, None, 2, 1, activation="gelu"), (x,), eps=1e-3,
                                    atol=2e-3, rtol=2e-3)


def test_opcheck_including_autograd():
    """opcheck's autograd checks (registration, AOT dispatch with backward) on inputs that require grad."""
    w = pruned(12, 16, block=(4, 1))
    rp, col, values, r, c = pack(w, "bsr4x1").kernel_arrays()
    for act in (0, 1, 2, 3):
        x = torch.randn(5, 16, requires_grad=True)
        bias = torch.randn(12, requires_grad=True)
        torch.library.opcheck(torch.ops.sparsert.linear_bsr.default, (x, rp, col, values, 12, r, c, bias, act, 0))
    w4 = pruned(8, 6, 3, 3, block=(4, 1))
    rp, col, values, r, c = pack(w4.reshape(8, -1), "bsr4x1").kernel_arrays()
    for act in (0, 2, 3):
        x = torch.randn(2, 6, 7, 9, requires_grad=True)
        bias = torch.randn(8, requires_grad=True)
        torch.library.opcheck(torch.ops.sparsert.conv2d_bsr.default,
                              (x, rp, col, values, 8, [3, 3], r, c, bias, [2, 1], [1, 1], [1, 1], 1, act, 0))


def test_the_packed_weight_is_frozen():
    rp, col, values, r, c = pack(pruned(6, 8), "csr").kernel_arrays()
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError, match="packed weight frozen"):
        torch.ops.sparsert.linear_bsr(x, rp, col, values.clone().requires_grad_(), 6, r, c, None, 0, 0)
    with pytest.raises(ValueError, match="packed weight frozen"):  # also when only the values require grad
        torch.ops.sparsert.linear_bsr(x.detach(), rp, col, values.clone().requires_grad_(), 6, r, c, None, 0, 0)
    with torch.no_grad():  # no autograd: nothing to refuse
        torch.ops.sparsert.linear_bsr(x, rp, col, values.clone().requires_grad_(), 6, r, c, None, 0, 0)
    w4 = pruned(4, 2, 3, 3)
    rp, col, values, r, c = pack(w4.reshape(4, -1), "csr").kernel_arrays()
    with pytest.raises(ValueError, match="packed weight frozen"):
        torch.ops.sparsert.conv2d_bsr(torch.randn(1, 2, 5, 5, requires_grad=True), rp, col,
                                      values.clone().requires_grad_(), 4, [3, 3], r, c, None, [1, 1], [0, 0],
                                      [1, 1], 1, 0, 0)


def _model():
    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.GELU(), nn.Linear(16, 4))
    return nn.Sequential(convs, head)


def _sparse_copy(model):
    import copy

    sparse = copy.deepcopy(model)
    with torch.no_grad():
        for m in sparse.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand_like(m.weight) < 0.5)
    dense = copy.deepcopy(sparse)
    sparse[0][2] = SparseConv2d.from_dense(sparse[0][2], "csr")
    sparse[1][1] = SparseLinear.from_dense(sparse[1][1], "bsr4x1")
    sparse[1][3] = SparseLinear.from_dense(sparse[1][3], "csr")
    return dense, sparse


@pytest.mark.parametrize("compiled", [False, True])
def test_training_mode_calls_backpropagate_through_sparse_layers(compiled):
    """What failed in the issue: a sparse model called with grad enabled, eager and under torch.compile;
    the dense layer before the sparse ones gets the dense model's gradient."""
    dense, sparse = _sparse_copy(_model())
    run = torch.compile(sparse, backend="aot_eager", fullgraph=True) if compiled else sparse
    if compiled:
        torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    run(x).square().sum().backward()
    dense(x).square().sum().backward()
    first_sparse, first_dense = sparse[0][0], dense[0][0]  # a plain Conv2d before the sparse layers
    torch.testing.assert_close(first_sparse.weight.grad, first_dense.weight.grad, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for m in sparse.modules() if isinstance(m, (SparseLinear, SparseConv2d))
               for p in m.parameters())
