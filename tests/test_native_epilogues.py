"""The fused epilogues of the C++ kernels (csrc/common/epilogue.h), through the
raw ``_C`` functions: the table ``_C.kernel_epilogues()`` reports, and that each
code does what its name says in the spmm and the conv kernels, against torch in
float64. Raw calls only (no sparsert.ops), so these pin the C++ side alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsert._ext import native

EXPECTED = {"none": 0, "relu": 1}
APPLY = {"none": lambda y: y, "relu": torch.relu}


def test_kernel_epilogue_table():
    table = native().kernel_epilogues()
    assert table == EXPECTED
    assert all(type(code) is int for code in table.values())


def test_python_epilogue_table_uses_the_kernel_codes():
    """ops.epilogue hands the kernels only codes that csrc/common/epilogue.h defines."""
    from sparsert.ops import epilogue

    table = native().kernel_epilogues()
    assert (epilogue.KERNEL_NONE, epilogue.KERNEL_RELU) == (table["none"], table["relu"])
    assert {e.kernel for e in epilogue.EPILOGUES} <= set(table.values())


def _csr(w):
    """CSR arrays of a dense 2-D float32 weight (int32 indices)."""
    mask = w != 0
    row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = mask.sum(1).cumsum(0).to(torch.int32)
    col_idx = mask.nonzero()[:, 1].to(torch.int32).contiguous()
    values = w[mask].contiguous()
    return row_ptr, col_idx, values


def raw_spmm(w, x, bias, code, kernel=""):
    row_ptr, col_idx, values = _csr(w)
    y = torch.empty(x.shape[0], w.shape[0])
    native().spmm(w.shape[0], w.shape[1], 1, 1, row_ptr.data_ptr(), row_ptr.numel(), col_idx.data_ptr(),
                  col_idx.numel(), 32, values.data_ptr(), values.numel(), x.data_ptr(), x.shape[0], x.stride(0),
                  y.data_ptr(), y.stride(0), bias.data_ptr(), code, 1, kernel)
    return y


def raw_conv(w4, x, bias, code, padding=1, kernel=""):
    cout, cin, kh, kw = w4.shape
    row_ptr, col_idx, values = _csr(w4.reshape(cout, -1))
    oh, ow = x.shape[2] + 2 * padding - kh + 1, x.shape[3] + 2 * padding - kw + 1
    y = torch.empty(x.shape[0], cout, oh, ow)
    native().conv2d(cout, 1, 1, row_ptr.data_ptr(), col_idx.data_ptr(), 32, values.data_ptr(), x.data_ptr(),
                    x.shape[0], cin, x.shape[2], x.shape[3], kh, kw, 1, 1, padding, padding, 1, 1, 1,
                    y.data_ptr(), bias.data_ptr(), code, 1, kernel)
    return y


def _sparse(*shape, density=0.4):
    return torch.randn(*shape) * (torch.rand(*shape) < density)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("kernel", ["", "f32_spmm_bsr_reference"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_spmm_epilogue_matches_torch(name, kernel, tokens):
    w, x, bias = _sparse(13, 21), torch.randn(tokens, 21), torch.randn(13)
    y = raw_spmm(w, x, bias, native().kernel_epilogues()[name], kernel)
    expected = APPLY[name](F.linear(x.double(), w.double(), bias.double()))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("kernel", ["", "f32_conv_bsr_reference"])
def test_conv_epilogue_matches_torch(name, kernel):
    w4, x, bias = _sparse(6, 3, 3, 3), torch.randn(2, 3, 7, 9), torch.randn(6)
    y = raw_conv(w4, x, bias, native().kernel_epilogues()[name], kernel=kernel)
    expected = APPLY[name](F.conv2d(x.double(), w4.double(), bias.double(), padding=1))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("code", [-1, 2, 5, 2**31 - 1])
def test_unknown_epilogue_code_is_a_value_error(code):
    w, x, bias = _sparse(4, 5), torch.randn(2, 5), torch.randn(4)
    with pytest.raises(ValueError, match=r"activation must be a kernel epilogue code: 0 \(none\), 1 \(relu\)"):
        raw_spmm(w, x, bias, code)
    w4, x4 = _sparse(4, 2, 3, 3), torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="activation must be a kernel epilogue code"):
        raw_conv(w4, x4, bias, code)
