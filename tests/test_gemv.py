"""sparsert's dense GEMV (the best dense path at one token): every kernel against float64 on odd
shapes, strided weights and inputs, with and without bias, 1 to 4 tokens, on one thread and on
several (a weight past the threading threshold); and DenseLinear's 1-token calls through it."""

import pytest
import torch
import torch.nn.functional as F

from sparsert.ops.backends import best_dense as bd

pytestmark = pytest.mark.skipif(not bd.gemv_available(), reason="the native extension is not built")


def kernels():
    from sparsert._ext import native

    return [k["name"] for k in native().gemv_kernels() if k["supported"]]


@pytest.mark.parametrize("kernel", kernels())
@pytest.mark.parametrize("out_f,in_f", [(1, 1), (3, 7), (4, 33), (5, 64), (17, 576), (1000, 31), (300, 576)])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_float64(kernel, out_f, in_f, rows, with_bias):
    g = torch.Generator().manual_seed(out_f * 31 + in_f)
    big = torch.randn(out_f, in_f + 5, generator=g)
    w = big[:, 2:2 + in_f]  # rows in_f + 5 floats apart
    x = torch.randn(rows, in_f + 3, generator=g)[:, :in_f]
    b = torch.randn(out_f, generator=g) if with_bias else None
    got = bd.gemv(x, w, b, kernel=kernel)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (rows, out_f)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_one_and_two_threads_agree_and_three_dimensional_inputs():
    w, x = torch.randn(2048, 200), torch.randn(1, 1, 200)  # 1.6 MB: past the threading threshold
    one = bd.gemv(x, w, num_threads=1)
    two = bd.gemv(x, w, num_threads=2)
    assert one.shape == (1, 1, 2048) and torch.equal(one, two)  # rows split, each row summed alike


def test_refusals():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="features"):
        bd.gemv(torch.randn(1, 15), w)
    with pytest.raises(ValueError, match="at most"):
        bd.gemv(torch.randn(5, 16), w)
    with pytest.raises(ValueError, match="float32"):
        bd.gemv(torch.randn(1, 16, dtype=torch.float64), w.double())
    with pytest.raises(ValueError, match="unit column stride"):
        bd.gemv(torch.randn(1, 8), w.t())
    with pytest.raises(ValueError, match="unknown"):
        bd.gemv(torch.randn(1, 16), w, kernel="f32_gemv_nonesuch")


def test_dense_linear_runs_one_token_through_the_gemv():
    from torch import nn

    from sparsert.nn import DenseLinear

    lin = nn.Linear(40, 24)
    layer = DenseLinear.from_linear(lin)
    x = torch.randn(1, 40)
    with torch.no_grad():
        got = layer(x)
    assert layer.__dict__["_path_memo"] == {1: "gemv"}
    torch.testing.assert_close(got.double(), F.linear(x.double(), lin.weight.double(), lin.bias.double()),
                               rtol=1e-5, atol=1e-5)
    packed = bd.PackedDenseLinear(lin.weight, lin.bias)
    torch.testing.assert_close(packed(x, activation="relu"), torch.relu(got), rtol=1e-6, atol=1e-6)
