"""CUDA kernels and the CUDA path of sparsert::linear_bsr.

Two parts:
- pure-Python / no-GPU checks (always run): dtype handling of formats, the
  2:4 detection, path selection, the per-weight cache, input alignment, the
  op registration, and the native module's registry and selection rule
  (the module is built by scripts/build_cuda.sh wherever nvcc exists; its
  import needs no GPU);
- GPU checks (skip without CUDA): every registry kernel against torch in
  float64 and against the reference kernel, on odd shapes, empty rows,
  all-zero and dense weights, one token and many; the op end to end.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import re
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparsert.ops
import sparsert.ops.backends.cuda as cu
from sparsert.formats import BSR, CSR, NM, pack

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _native_or_skip():
    try:
        return cu.native_cuda()
    except ImportError as err:
        pytest.skip(f"sparsert._C_cuda is not built ({err}); run bash scripts/build_cuda.sh")


def _sparse(rows, cols, density, *, dtype=torch.float32, empty_rows=()):
    w = torch.randn(rows, cols, dtype=torch.float64)
    w = w * (torch.rand(rows, cols, dtype=torch.float64) < density)
    for r in empty_rows:
        if r < rows:
            w[r] = 0
    return w.to(dtype)


def _block_sparse(rows, cols, block, density):
    r, c = block
    nbr, nbc = -(-rows // r), -(-cols // c)
    keep = torch.rand(nbr, nbc) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return torch.randn(rows, cols) * mask


def _two_four(rows, cols):
    w = torch.randn(rows, cols)
    groups = w.reshape(rows, cols // 4, 4)
    drop = torch.rand(rows, cols // 4, 4).argsort(-1)[..., :2]
    groups.scatter_(-1, drop, 0.0)
    return groups.reshape(rows, cols)


# --------------------------------------------------------------------------
# No GPU needed
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["csr", "bsr4x2", "nm2:4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_format_to_dtype_converts_values_keeps_indices(kind, dtype):
    w = _two_four(6, 12) if kind.startswith("nm") else _sparse(6, 13, 0.4)
    fmt = pack(w, kind)
    moved = fmt.to("cpu", dtype=dtype)
    assert type(moved) is type(fmt) and moved.shape == fmt.shape and moved.kind == fmt.kind
    for name, t in moved.tensors().items():
        original = fmt.tensors()[name]
        if t.dtype.is_floating_point:
            assert t.dtype == dtype
        else:
            assert t.dtype == original.dtype and torch.equal(t, original)
    assert torch.equal(moved.to_dense(), w.to(dtype))


@pytest.mark.parametrize("bad", [torch.int32, "bf16", torch.bool])
def test_format_to_rejects_non_float_dtype(bad):
    with pytest.raises(ValueError, match="floating"):
        CSR.from_dense(_sparse(4, 4, 0.5)).to("cpu", dtype=bad)


def test_format_to_without_dtype_keeps_float32():
    fmt = BSR.from_dense(_sparse(8, 8, 0.5), (2, 2)).to("cpu")
    assert fmt.blocks.dtype == torch.float32


def test_is_2_4_accepts_nm_2_4_arrays():
    fmt = NM.from_dense(_two_four(8, 16), 2, 4)
    row_ptr, col, _, _, _ = fmt.kernel_arrays()
    assert cu.is_2_4(row_ptr, col, 8, 16)


def test_is_2_4_accepts_groups_with_fewer_nonzeros():
    w = _two_four(4, 8)
    w[1, :4] = 0  # a group with no nonzeros still holds two slots
    w[2, 4:] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    row_ptr, col, _, _, _ = NM.from_dense(w, 2, 4).kernel_arrays()
    assert cu.is_2_4(row_ptr, col, 4, 8)


def test_is_2_4_rejects_other_layouts():
    w = _two_four(4, 8)
    csr = CSR.from_dense(w)
    # CSR of the same matrix: right count only by chance, checked by structure.
    dense_rows = CSR.from_dense(torch.ones(4, 8))
    assert not cu.is_2_4(dense_rows.row_ptr, dense_rows.col_indices, 4, 8)
    row_ptr, col, _, _, _ = NM.from_dense(w, 2, 4).kernel_arrays()
    swapped = col.clone().reshape(4, 4)
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert cu.is_2_4(row_ptr, swapped.reshape(-1), 4, 8)  # slot order within a group is free
    crossed = col.clone().reshape(4, 4)
    crossed[0, [1, 2]] = crossed[0, [2, 1]]  # the slots of two groups exchanged
    assert not cu.is_2_4(row_ptr, crossed.reshape(-1), 4, 8)
    moved = col.clone().reshape(4, 4)
    moved[2, 0] = 5  # a slot of group 0 pointing into group 1
    assert not cu.is_2_4(row_ptr, moved.reshape(-1), 4, 8)
    nm14 = NM.from_dense(_sparse(4, 8, 0.2) * 0, 1, 4)
    assert not cu.is_2_4(nm14.kernel_arrays()[0], nm14.kernel_arrays()[1], 4, 8)
    assert not cu.is_2_4(csr.row_ptr[:1], csr.col_indices[:0], 0, 8)
    nm_odd = NM.from_dense(_two_four(4, 12)[:, :10], 2, 4)  # cols not a multiple of 4
    assert not cu.is_2_4(nm_odd.kernel_arrays()[0], nm_odd.kernel_arrays()[1], 4, 10)


@pytest.mark.parametrize("block, rows, cols, dtype, two_four, expected", [
    ((1, 1), 128, 256, torch.bfloat16, True, cu.SEMI_STRUCTURED),
    ((1, 1), 64, 64, torch.float16, True, cu.SEMI_STRUCTURED),
    ((1, 1), 128, 256, torch.float32, True, "native"),
    ((1, 1), 128, 256, torch.bfloat16, False, "native"),
    ((1, 1), 96, 256, torch.bfloat16, True, "native"),
    ((1, 1), 128, 260, torch.bfloat16, True, "native"),
    ((16, 16), 128, 256, torch.bfloat16, True, "native"),
])
def test_select_path(block, rows, cols, dtype, two_four, expected):
    assert cu.select_path(*block, rows, cols, dtype, two_four) == expected


@pytest.mark.parametrize("dtype, expected", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float32)])
def test_compute_dtype(dtype, expected):
    assert cu.compute_dtype(dtype) == expected


def test_prepare_row_order_longest_first_and_cached():
    w = _sparse(40, 30, 0.3, empty_rows=(3, 7))
    w[5] = 1.0  # one dense row
    fmt = CSR.from_dense(w)
    args = (fmt.row_ptr, fmt.col_indices, fmt.values, 40, 30, 1, 1, torch.bfloat16, torch.device("cpu"))
    prep = cu._prepare(*args)
    lengths = (fmt.row_ptr[1:] - fmt.row_ptr[:-1]).tolist()
    order = prep.row_order.tolist()
    assert prep.row_order.dtype == torch.int32 and sorted(order) == list(range(40))
    assert order[0] == 5 and all(lengths[a] >= lengths[b] for a, b in zip(order, order[1:]))
    assert prep.values.dtype == torch.bfloat16 and torch.equal(prep.values, fmt.values.bfloat16())
    assert prep.nnz == fmt.nnz and prep.semi is None and not prep.two_four
    assert cu._prepare(*args) is prep
    fmt.values.mul_(2)  # in-place change: the cached conversion must be rebuilt
    again = cu._prepare(*args)
    assert again is not prep and torch.equal(again.values, fmt.values.bfloat16())


def test_prepare_keeps_no_reference_to_the_weight():
    fmt = CSR.from_dense(_sparse(10, 10, 0.5))
    prep = cu._prepare(fmt.row_ptr, fmt.col_indices, fmt.values, 10, 10, 1, 1, torch.float32, torch.device("cpu"))
    assert prep.values is None  # same dtype and device: values not copied
    # the index arrays are always private copies (what the kernels read)
    assert prep.row_ptr.data_ptr() != fmt.row_ptr.data_ptr()
    assert prep.col_indices.data_ptr() != fmt.col_indices.data_ptr()
    alive = weakref.ref(fmt.values)
    del fmt, prep
    gc.collect()
    assert alive() is None


def test_prepare_nm_regular_rows_no_order_and_2_4_detected():
    fmt = NM.from_dense(_two_four(64, 64), 2, 4)
    row_ptr, col, values, r, c = fmt.kernel_arrays()
    prep = cu._prepare(row_ptr, col, values, 64, 64, r, c, torch.bfloat16, torch.device("cpu"))
    assert prep.row_order is None and prep.two_four
    # torch compresses 2:4 weights on CUDA only: on the CPU there is no compressed weight.
    assert prep.semi is None


def test_converted_bias_is_cached_per_weight_and_follows_changes():
    fmt = CSR.from_dense(_sparse(6, 6, 0.5))
    prep = cu._prepare(fmt.row_ptr, fmt.col_indices, fmt.values, 6, 6, 1, 1, torch.float32, torch.device("cpu"))
    b16 = torch.randn(6).bfloat16()
    first = cu._converted_bias(prep, b16, torch.float32)
    assert first.dtype == torch.float32 and torch.equal(first, b16.float())
    assert cu._converted_bias(prep, b16, torch.float32) is first
    b16.mul_(2)
    assert torch.equal(cu._converted_bias(prep, b16, torch.float32), b16.float())
    b32 = torch.randn(6)
    assert cu._converted_bias(prep, b32, torch.float32).data_ptr() == b32.data_ptr()  # nothing to convert
    assert cu._converted_bias(prep, None, torch.float32) is None


def test_prepare_rejects_inconsistent_arrays():
    fmt = CSR.from_dense(_sparse(6, 6, 0.5))
    with pytest.raises(ValueError, match="do not match"):
        cu._prepare(fmt.row_ptr, fmt.col_indices[:-1], fmt.values[:-1], 6, 6, 1, 1, torch.float32,
                    torch.device("cpu"))


def test_check_rejects_bad_arrays():
    fmt = CSR.from_dense(_sparse(6, 5, 0.5))
    x = torch.randn(3, 5)
    good = (x, fmt.row_ptr, fmt.col_indices, fmt.values, 6, 1, 1, None)
    cu._check(*good)
    with pytest.raises(ValueError, match="row_ptr"):
        cu._check(x, fmt.row_ptr.long(), *good[2:])
    with pytest.raises(ValueError, match="col_indices"):
        cu._check(x, fmt.row_ptr, fmt.col_indices.long(), *good[3:])
    with pytest.raises(ValueError, match="values"):
        cu._check(x, fmt.row_ptr, fmt.col_indices, fmt.values.long(), *good[4:])
    with pytest.raises(ValueError, match="entries"):
        cu._check(x, fmt.row_ptr, fmt.col_indices, fmt.values, 7, 1, 1, None)
    with pytest.raises(ValueError, match="bias"):
        cu._check(*good[:-1], torch.zeros(5))
    with pytest.raises(ValueError, match="positive"):
        cu._check(x, fmt.row_ptr, fmt.col_indices, fmt.values, 6, 0, 1, None)


@pytest.mark.parametrize("tokens, cols, sliced", [(5, 13, False), (5, 16, True), (1, 13, False), (4, 16, False)])
def test_kernel_input_is_aligned_with_same_values(tokens, cols, sliced):
    x = torch.randn(tokens, cols * 2 if sliced else cols, dtype=torch.bfloat16)
    x = x[:, ::2] if sliced else x
    xk = cu._kernel_input(x)
    assert torch.equal(xk, x) and xk.stride(-1) == 1 and xk.data_ptr() % 16 == 0
    assert tokens <= 1 or xk.stride(0) % 8 == 0
    if not sliced and (cols % 8 == 0 or tokens <= 1):
        assert xk.data_ptr() == x.data_ptr()  # no copy when already fit


def test_cuda_kernel_is_registered_for_the_op():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparsert::linear_bsr", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparsert::linear_bsr", "CPU")


def test_native_registry_names_are_unique_and_complete():
    mod = _native_or_skip()
    ks = mod.kernels()
    names = [k["name"] for k in ks]
    assert len(names) == len(set(names))
    for dt in ("f32", "f16", "bf16"):
        assert f"{dt}_spmm_ref_cuda" in names
        for tt in (1, 2, 4, 8):
            assert f"{dt}_spmm_csr_t{tt}_cuda" in names
    for dt in ("f16", "bf16"):
        for b in (16, 32, 64):
            for tm in (32, 128):
                assert f"{dt}_spmm_bsr{b}x{b}_m{tm}_wmma" in names
    for k in ks:
        assert k["name"].startswith(k["dtype"] + "_spmm_")
        assert k["kind"] in ("reference", "csr", "bsr_wmma")


@pytest.mark.parametrize("block, tokens, dtype, expected", [
    ((1, 1), 1, 2, "bf16_spmm_csr_t1_cuda"),
    ((1, 1), 2, 2, "bf16_spmm_csr_t2_cuda"),
    ((1, 1), 3, 2, "bf16_spmm_csr_t4_cuda"),
    ((1, 1), 16, 0, "f32_spmm_csr_t8_cuda"),
    ((1, 1), 4096, 1, "f16_spmm_csr_t8_cuda"),
    ((16, 16), 1, 2, "bf16_spmm_bsr16x16_m32_wmma"),
    ((32, 32), 32, 1, "f16_spmm_bsr32x32_m32_wmma"),
    ((32, 32), 33, 2, "bf16_spmm_bsr32x32_m128_wmma"),
    ((32, 32), 64, 0, "f32_spmm_ref_cuda"),
    ((4, 1), 64, 2, "bf16_spmm_ref_cuda"),
    ((16, 32), 64, 2, "bf16_spmm_ref_cuda"),
])
def test_native_select_kernel(block, tokens, dtype, expected):
    mod = _native_or_skip()
    assert mod.select_kernel(512, 1024, *block, 16, tokens, dtype, x_row_stride=1024) == expected


def test_native_select_kernel_falls_back_for_misaligned_x():
    mod = _native_or_skip()
    assert mod.select_kernel(512, 1024, 32, 32, 16, 64, 2, x=2, x_row_stride=1024) == "bf16_spmm_ref_cuda"
    assert mod.select_kernel(512, 1020, 32, 32, 16, 64, 2, x_row_stride=1020) == "bf16_spmm_ref_cuda"
    assert mod.select_kernel(512, 1020, 1, 1, 16, 64, 2, x_row_stride=1020) == "bf16_spmm_ref_cuda"
    assert mod.select_kernel(512, 1020, 1, 1, 16, 64, 2, x=8, x_row_stride=1024) == "bf16_spmm_ref_cuda"
    assert mod.select_kernel(512, 1020, 1, 1, 16, 1, 2, x_row_stride=1020) == "bf16_spmm_csr_t1_cuda"


def test_native_rejects_bad_arguments_before_touching_memory():
    mod = _native_or_skip()
    fake = 4096  # a non-null address that is never dereferenced: every case fails its checks first
    args = dict(rows=4, cols=4, block_rows=1, block_cols=1, row_ptr=fake, col_idx=fake, index_bits=16, values=fake,
                row_order=fake, x=fake, tokens=1, x_row_stride=4, y=fake, y_row_stride=4, bias=0, activation=0,
                dtype=2, device=0, stream=0)
    for key, bad, match in [("index_bits", 8, "index_bits"), ("activation", 2, "activation"),
                            ("dtype", 3, "dtype"), ("block_rows", 0, "block"), ("tokens", -1, "tokens must be in")]:
        with pytest.raises(ValueError, match=match):
            mod.spmm(**{**args, key: bad})
    with pytest.raises(ValueError, match="unknown"):
        mod.spmm(**args, kernel="no_such_kernel")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
def test_native_without_gpu_raises_runtime_error():
    mod = _native_or_skip()
    assert mod.device_count() == 0
    with pytest.raises(ValueError, match="null address"):
        mod.spmm(4, 4, 1, 1, 0, 0, 16, 0, 0, 0, 1, 4, 0, 4, 0, 0, 2, 0, 0)
    fake = 4096  # non-null, never dereferenced: the device is set (and fails) before any launch
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        mod.spmm(4, 4, 1, 1, fake, fake, 16, fake, fake, fake, 1, 4, fake, 4, 0, 0, 2, 0, 0)


class _PointerStub:
    """Stands in for sparsert._C_cuda on the CPU: reads the arrays through the
    raw addresses the Python layer passes (so argument order, strides, dtype
    codes and buffer sizes are checked) and computes the product in numpy."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _array(address, count, np_dtype):
        if count == 0:
            return np.zeros(0, np_dtype)
        nbytes = count * np.dtype(np_dtype).itemsize
        return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8)), (nbytes,)).view(np_dtype)

    def spmm(self, rows, cols, block_rows, block_cols, row_ptr, col_idx, index_bits, values, row_order, x, tokens,
             x_row_stride, y, y_row_stride, bias, activation, dtype, device, stream, kernel):
        self.calls.append(dict(kernel=kernel, row_order=row_order, dtype=dtype, x_row_stride=x_row_stride))
        r, c = block_rows, block_cols
        nbr, nbc = -(-rows // r), -(-cols // c)
        rp = self._array(row_ptr, nbr + 1, np.int32).astype(np.int64)
        nnz = int(rp[-1])
        idx = self._array(col_idx, nnz, np.uint16 if index_bits == 16 else np.int32).astype(np.int64)
        raw = self._array(values, nnz * r * c, [np.float32, np.float16, np.uint16][dtype])
        vals = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == 2 else raw.astype(np.float32)
        if row_order:
            assert sorted(self._array(row_order, rows, np.int32).tolist()) == list(range(rows))
        grid = np.zeros((nbr, nbc, r, c), np.float64)
        for br in range(nbr):
            for b in range(rp[br], rp[br + 1]):
                grid[br, idx[b]] += vals[b * r * c:(b + 1) * r * c].reshape(r, c)
        w = grid.transpose(0, 2, 1, 3).reshape(nbr * r, nbc * c)[:rows, :cols]
        x_dtype = [np.float32, np.float16, np.uint16][dtype]
        x_raw = self._array(x, (tokens - 1) * x_row_stride + cols, x_dtype)
        xs = np.stack([x_raw[t * x_row_stride:t * x_row_stride + cols] for t in range(tokens)])
        xs = (xs.astype(np.uint32) << 16).view(np.float32) if dtype == 2 else xs.astype(np.float32)
        out = xs.astype(np.float64) @ w.T
        if bias:
            out += self._array(bias, rows, np.float32)
        if activation == 1:
            out = np.maximum(out, 0)
        y_view = self._array(y, (tokens - 1) * y_row_stride + rows, x_dtype)
        for t in range(tokens):
            row = out[t].astype(np.float32)
            y_view[t * y_row_stride:t * y_row_stride + rows] = \
                (row.view(np.uint32) + 0x8000 >> 16).astype(np.uint16) if dtype == 2 else row.astype(x_dtype)
        return kernel or "stub"


@pytest.fixture
def stub(monkeypatch):
    s = _PointerStub()
    monkeypatch.setattr(cu, "native_cuda", lambda: s)
    monkeypatch.setattr(cu, "_launch_context", lambda x: (0, 0))
    return s


def test_stub_signature_matches_the_native_binding():
    mod = _native_or_skip()
    names = re.findall(r"(\w+): ", mod.spmm.__doc__.split("->")[0])
    assert names == list(inspect.signature(_PointerStub.spmm).parameters)[1:]


@pytest.mark.parametrize("kind, x_dtype, w_dtype", [
    ("csr", torch.float32, None), ("csr", torch.bfloat16, torch.bfloat16), ("bsr4x2", torch.float16, None),
    ("nm2:4", torch.bfloat16, torch.bfloat16), ("bsr16x16", torch.float64, None)])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("tokens, cols", [(1, 13), (5, 13), (4, 16)])
def test_python_layer_passes_consistent_arrays(stub, kind, x_dtype, w_dtype, act, tokens, cols):
    rows = 12
    w = _two_four(rows, 16)[:, :cols] if kind == "nm2:4" else _sparse(rows, cols, 0.4, empty_rows=(2,))
    fmt = pack(w, kind).to("cpu", dtype=w_dtype)
    x = torch.randn(2, tokens, cols).to(x_dtype)
    b = torch.randn(rows)
    rp, col, vals, r, c = fmt.kernel_arrays()
    code = sparsert.ops.epilogue.code_of(act)
    y = cu.linear_bsr_cuda(x, rp, col, vals, rows, r, c, b, code)
    assert y.shape == (2, tokens, rows) and y.dtype == x_dtype
    compute = cu.compute_dtype(x_dtype)
    w64 = fmt.to_dense().to(compute).double()
    _assert_matches(y, w64, x.to(compute).double(), b.double(), compute, act)
    call = stub.calls[-1]
    assert call["dtype"] == cu.DTYPE_CODES[compute]
    assert (call["row_order"] != 0) == (kind == "csr")  # rows of unequal length are reordered
    assert tokens <= 1 or call["x_row_stride"] % 8 == 0


@pytest.mark.parametrize("ks, stride, padding, dilation, act", [
    ((1, 1), (1, 1), (0, 0), (1, 1), 0), ((3, 3), (1, 1), (1, 1), (1, 1), 1), ((3, 2), (2, 1), (0, 1), (1, 2), 3),
    ((5, 5), (2, 2), (2, 2), (1, 1), 2)])
@pytest.mark.parametrize("kind", ["csr", "bsr4x3"])
def test_conv2d_cuda_path_matches_f_conv2d(stub, ks, stride, padding, dilation, act, kind):
    from sparsert.ops.conv import ConvWeight
    w4 = _sparse(6, 4 * ks[0] * ks[1], 0.4).reshape(6, 4, *ks)
    cw = ConvWeight.from_dense(w4, kind)
    x = torch.randn(2, 4, 9, 8)
    b = torch.randn(6)
    rp, col, vals, r, c = cw.format.kernel_arrays()
    y = cu.conv2d_bsr_cuda(x, rp, col, vals, 6, ks, r, c, b, stride, padding, dilation, 1, act)
    ref = F.conv2d(x.double(), cw.to_dense().double(), b.double(), stride, padding, dilation)
    ref = {0: ref, 1: torch.relu(ref), 2: F.gelu(ref), 3: ref.clamp(0, 6)}[act]
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert stub.calls[-1]["kernel"] == ""


def test_conv2d_cuda_path_grouped_takes_pure_torch(stub):
    w4 = _sparse(6, 2 * 9, 0.5).reshape(6, 2, 3, 3)
    fmt = CSR.from_dense(w4.reshape(6, -1))
    x = torch.randn(1, 4, 7, 7)
    y = cu.conv2d_bsr_cuda(x, fmt.row_ptr, fmt.col_indices, fmt.values, 6, (3, 3), 1, 1, None, (1, 1), (1, 1),
                           (1, 1), 2, 0)
    torch.testing.assert_close(y, F.conv2d(x, w4, None, 1, 1, 1, 2), rtol=1e-5, atol=1e-5)
    assert not stub.calls


# --------------------------------------------------------------------------
# The op, parametrized by device (CPU always; CUDA when present)
# --------------------------------------------------------------------------

def _tolerance(dtype):
    return {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]


def _assert_matches(y, w64, x64, b64, dtype, act=None):
    """|y - ref| <= eps * (|ref| + sum|w||x|) with ref computed in float64 from
    the same (rounded) inputs: output rounding plus fp32 accumulation."""
    ref = F.linear(x64, w64, b64)
    bound = F.linear(x64.abs(), w64.abs(), None if b64 is None else b64.abs())
    if act == "relu":
        ref = torch.relu(ref)
    elif act == "gelu":
        ref = F.gelu(ref)
    err = (y.double().cpu() - ref.cpu()).abs()
    allowed = _tolerance(dtype) * (ref.abs().cpu() + bound.cpu()) + 1e-30
    worst = (err / allowed).max() if err.numel() else torch.tensor(0.0)
    assert worst <= 1, f"max error ratio {float(worst):.3g} at {divmod(int((err / allowed).argmax()), err.shape[-1])}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["csr", "bsr16x16", "bsr4x1", "nm2:4"])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_linear_by_device_float32(device, kind, act):
    rows, cols = 48, 64
    w = _two_four(rows, cols) if kind == "nm2:4" else _sparse(rows, cols, 0.3, empty_rows=(0, 5))
    fmt = pack(w, kind).to(device)
    x = torch.randn(2, 3, cols, device=device)
    b = torch.randn(rows, device=device)
    y = sparsert.ops.linear(x, fmt, b, act)
    assert y.shape == (2, 3, rows) and y.dtype == torch.float32 and y.device.type == device
    _assert_matches(y, w.double(), x.double().cpu(), b.double().cpu(), torch.float32, act)


# --------------------------------------------------------------------------
# GPU: every kernel in the registry
# --------------------------------------------------------------------------

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [(1, 1), (37, 13), (64, 64), (130, 200), (96, 1000)]
TOKENS = [1, 3, 8, 33, 130]


def _run_kernel(name, fmt, x, bias=None, act=0):
    rp, col, vals, r, c = fmt.kernel_arrays()
    return cu.linear_bsr_cuda(x, rp, col, vals, fmt.shape[0], r, c, bias, act, 0, kernel=name)


def _blocks_for(kernel):
    if kernel["kind"] == "reference":
        return [(1, 1), (4, 1), (16, 16), (3, 5)]
    return [tuple(kernel["block"])]


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_every_cuda_kernel_against_float64(shape):
    mod = _native_or_skip()
    rows, cols = shape
    for k in mod.kernels():
        dtype = DT[k["dtype"]]
        for block in _blocks_for(k):
            w = _block_sparse(rows, cols, block, 0.3) if block != (1, 1) else _sparse(rows, cols, 0.3, empty_rows=(1,))
            fmt = pack(w, "csr" if block == (1, 1) else f"bsr{block[0]}x{block[1]}").to("cuda", dtype=dtype)
            w64 = fmt.to_dense().double().cpu()
            for tokens in TOKENS:
                x = torch.randn(tokens, cols, device="cuda").to(dtype)
                b = torch.randn(rows, device="cuda")
                for act in (0, 1):
                    y = _run_kernel(k["name"], fmt, x, b, act)
                    assert y.dtype == dtype and y.shape == (tokens, rows)
                    _assert_matches(y, w64, x.double().cpu(), b.double().cpu(), dtype, "relu" if act else None)


@requires_cuda
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("pattern", ["zero", "dense", "empty_rows"])
def test_fast_kernels_match_reference_kernel(dtype, pattern):
    mod = _native_or_skip()
    rows, cols, tokens = 200, 192, 70
    for k in mod.kernels():
        if k["dtype"] != dtype or k["kind"] == "reference":
            continue
        r, c = k["block"]
        w = torch.randn(rows, cols)
        if pattern == "zero":
            w.zero_()
        elif pattern == "empty_rows":
            w[: rows // 2] = 0
        fmt = pack(w, "csr" if (r, c) == (1, 1) else f"bsr{r}x{c}").to("cuda", dtype=DT[dtype])
        x = torch.randn(tokens, cols, device="cuda").to(DT[dtype])
        fast = _run_kernel(k["name"], fmt, x)
        ref = _run_kernel(f"{dtype}_spmm_ref_cuda", fmt, x)
        _assert_matches(fast, fmt.to_dense().double().cpu(), x.double().cpu(), None, DT[dtype])
        _assert_matches(ref, fmt.to_dense().double().cpu(), x.double().cpu(), None, DT[dtype])
        if pattern == "zero":
            assert not fast.any() and not ref.any()


@requires_cuda
@pytest.mark.parametrize("kind", ["csr", "bsr32x32", "bsr64x64", "nm2:4"])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_linear_bf16_end_to_end(kind, tokens):
    rows, cols = 128, 256
    w = _two_four(rows, cols) if kind == "nm2:4" else _block_sparse(rows, cols, (32, 32), 0.4) \
        if kind.startswith("bsr") else _sparse(rows, cols, 0.1)
    fmt = pack(w, kind).to("cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(rows, device="cuda", dtype=torch.bfloat16)
    y = sparsert.ops.linear(x, fmt, b, "relu")
    assert y.dtype == torch.bfloat16
    _assert_matches(y, fmt.to_dense().double().cpu(), x.double().cpu(), b.double().cpu(), torch.bfloat16, "relu")
    if kind == "nm2:4":
        rp, col, vals, r, c = fmt.kernel_arrays()
        prep = cu._prepare(rp, col, vals, rows, cols, r, c, torch.bfloat16, x.device)
        assert prep.two_four and prep.semi is not None, "torch's 2:4 path should take this weight on sm80+"


@requires_cuda
def test_float32_weight_with_bf16_input_converts_once():
    fmt = CSR.from_dense(_sparse(64, 96, 0.2)).to("cuda")
    x = torch.randn(5, 96, device="cuda", dtype=torch.bfloat16)
    y = sparsert.ops.linear(x, fmt)
    _assert_matches(y, fmt.to_dense().double().cpu(), x.double().cpu(), None, torch.bfloat16)
    rp, col, vals, _, _ = fmt.kernel_arrays()
    prep = cu._prepare(rp, col, vals, 64, 96, 1, 1, torch.bfloat16, x.device)
    assert prep.values.dtype == torch.bfloat16
    assert cu._prepare(rp, col, vals, 64, 96, 1, 1, torch.bfloat16, x.device) is prep


@requires_cuda
def test_runs_on_the_current_stream_and_strided_input():
    fmt = BSR.from_dense(_block_sparse(96, 160, (16, 16), 0.5), (16, 16)).to("cuda", dtype=torch.float16)
    base = torch.randn(40, 320, device="cuda", dtype=torch.float16)
    x = base[:, ::2]  # column stride 2: copied to an aligned buffer
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = sparsert.ops.linear(x, fmt)
    stream.synchronize()
    _assert_matches(y, fmt.to_dense().double().cpu(), x.double().cpu(), None, torch.float16)


@requires_cuda
def test_in_place_weight_change_is_seen():
    fmt = CSR.from_dense(_sparse(32, 32, 0.5)).to("cuda", dtype=torch.float16)
    x = torch.randn(4, 32, device="cuda", dtype=torch.float16)
    y1 = sparsert.ops.linear(x, fmt)
    fmt.values.mul_(-1)
    y2 = sparsert.ops.linear(x, fmt)
    torch.testing.assert_close(y2, -y1)


@requires_cuda
@pytest.mark.parametrize("kind", ["csr", "bsr16x16"])
def test_opcheck_cuda(kind):
    fmt = pack(_block_sparse(32, 48, (16, 16), 0.5), kind).to("cuda", dtype=torch.bfloat16)
    rp, col, vals, r, c = fmt.kernel_arrays()
    x = torch.randn(3, 48, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.sparsert.linear_bsr.default, (x, rp, col, vals, 32, r, c, None, 1, 0))


@requires_cuda
def test_forced_semi_structured_rejects_other_weights():
    fmt = CSR.from_dense(_sparse(64, 64, 0.5)).to("cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="2:4"):
        _run_kernel(cu.SEMI_STRUCTURED, fmt, x)


@requires_cuda
@pytest.mark.parametrize("kind", ["csr", "bsr16x16"])
def test_conv2d_bf16_on_gpu(kind):
    from sparsert.ops.conv import ConvWeight
    w4 = _block_sparse(32, 16 * 9, (16, 16), 0.5).reshape(32, 16, 3, 3)
    cw = ConvWeight.from_dense(w4, kind)
    cw = ConvWeight(cw.format.to("cuda", dtype=torch.bfloat16), cw.kernel_size)
    x = torch.randn(2, 16, 10, 9, device="cuda", dtype=torch.bfloat16)
    y = sparsert.ops.conv2d(x, cw, None, 1, 1, activation="relu")
    ref = torch.relu(F.conv2d(x.double().cpu(), cw.to_dense().double().cpu(), None, 1, 1))
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    bound = F.conv2d(x.double().cpu().abs(), cw.to_dense().double().cpu().abs(), None, 1, 1)
    assert ((y.double().cpu() - ref).abs() <= 2.0 ** -7 * (ref.abs() + bound)).all()


def test_hostile_indices_never_reach_the_cuda_kernels(stub):
    """Index contents are validated once per weight, on private copies the kernels
    read: bad indices are a ValueError, and later writes torch does not record
    (``.data``, numpy) do not reach the kernels (issue 17)."""
    fmt = CSR.from_dense(_sparse(12, 10, 0.5))
    rp, col, vals, r, c = fmt.kernel_arrays()
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="column indices must lie"):
        cu.linear_bsr_cuda(x, rp, torch.full_like(col, 300), vals, 12, 1, 1, None, 0)
    bad_rp = rp.clone()
    bad_rp[1] = 10**6
    with pytest.raises(ValueError, match="row_ptr"):
        cu.linear_bsr_cuda(x, bad_rp, col, vals, 12, 1, 1, None, 0)
    y = cu.linear_bsr_cuda(x, rp, col, vals, 12, 1, 1, None, 0)
    col.data.fill_(300)
    rp.numpy()[1] = 10**6
    assert torch.equal(cu.linear_bsr_cuda(x, rp, col, vals, 12, 1, 1, None, 0), y)


def test_cuda_op_checks_scalars_like_every_backend():
    fmt = CSR.from_dense(_sparse(6, 5, 0.5))
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="activation"):
        cu._linear_bsr_cuda(x, fmt.row_ptr, fmt.col_indices, fmt.values, 6, 1, 1, None, 5, 0)
    with pytest.raises(ValueError, match="block_rows"):
        cu._linear_bsr_cuda(x, fmt.row_ptr, fmt.col_indices, fmt.values, 6, 2**31, 1, None, 0, 0)
