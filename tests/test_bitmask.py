"""The bitmask16 format and every bitmask kernel in the registry, against torch in float64."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from sparsert import ops
from sparsert._ext import native
from sparsert.formats.bitmask import GROUP, VALUE_PADDING, Bitmask
from sparsert.ops import epilogue
from sparsert.ops.backends.cpu import bitmask_kernels, linear_bitmask_cpu

from kernel_util import assert_close, expected, random_weight

KERNELS = [k["name"] for k in bitmask_kernels()]
RUNNABLE = [k["name"] for k in bitmask_kernels() if k["supported"]]


def linear_bitmask(x, fmt, bias=None, activation=None, *, kernel="", num_threads=0):
    """The CPU kernel of sparsert::linear_bitmask, with a forced registry kernel."""
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    return linear_bitmask_cpu(x, masks, offsets, values, fmt.shape[0], bias, epilogue.code_of(activation),
                              num_threads, kernel)



# -- the format ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 16), (5, 17), (7, 33), (13, 100), (0, 5), (4, 0)])
def test_round_trip(shape):
    gen = torch.Generator().manual_seed(1)
    w = random_weight(*shape, 0.4, gen)
    fmt = Bitmask.from_dense(w)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.nnz == int((w != 0).sum())
    assert fmt.masks.shape == (shape[0], -(-shape[1] // GROUP))
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    assert offsets.dtype == torch.int64 and offsets.numel() == shape[0] + 1
    assert values.numel() == fmt.nnz + VALUE_PADDING
    assert fmt.nbytes == fmt.masks.numel() * 2 + fmt.nnz * 4


def test_mask_bits_and_value_order():
    w = torch.zeros(2, 20)
    w[0, 0], w[0, 15], w[0, 16], w[1, 19] = 1.0, 2.0, 3.0, 4.0
    fmt = Bitmask.from_dense(w)
    masks = fmt.masks.to(torch.int32) & 0xFFFF
    assert masks.tolist() == [[1 | 1 << 15, 1], [0, 1 << 3]]
    assert fmt.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert fmt.row_offsets.tolist() == [0, 3, 4]


def test_from_arrays_round_trip_and_int32_masks():
    gen = torch.Generator().manual_seed(2)
    w = random_weight(9, 37, 0.5, gen)
    fmt = Bitmask.from_dense(w)
    again = Bitmask.from_arrays(fmt.masks.to(torch.int32) & 0xFFFF, fmt.values.clone(), w.shape)
    assert torch.equal(again.to_dense(), w)
    assert again.masks.dtype == torch.int16


@pytest.mark.parametrize("breakage, message", [
    (lambda m, v: (m[:, :1], v), "masks must have shape"),
    (lambda m, v: (m, v[:-1]), "one entry per set mask bit"),
    (lambda m, v: (m, torch.cat([v, v[:1]])), "one entry per set mask bit"),
    (lambda m, v: (m, v.clone().fill_(float("nan"))), "NaN"),
    (lambda m, v: (m.to(torch.int32) + 70000, v), "16-bit patterns"),
    (lambda m, v: (m.to(torch.float32), v), "integer dtype"),
])
def test_from_arrays_rejects(breakage, message):
    gen = torch.Generator().manual_seed(3)
    fmt = Bitmask.from_dense(random_weight(4, 37, 0.5, gen) + 0.0)
    masks, values = breakage(fmt.masks.clone(), fmt.values.clone())
    with pytest.raises(ValueError, match=message):
        Bitmask.from_arrays(masks, values, (4, 37))


def test_from_arrays_rejects_bits_past_the_last_column():
    masks = torch.zeros(2, 3, dtype=torch.int32)
    masks[1, 2] = 1 << 10  # column 42 of a 40-column matrix
    with pytest.raises(ValueError, match=r"masks\[1, 2\] has bits set past the last column"):
        Bitmask.from_arrays(masks, torch.ones(1), (2, 40))


# -- the kernels ----------------------------------------------------------------

def test_registry_lists_every_isa_and_kind():
    names = set(KERNELS)
    assert "f32_spmm_bitmask16_reference" in names
    isas = {k["isa"] for k in bitmask_kernels()} - {"reference"}
    assert "scalar" in isas
    for isa in isas:  # every ISA has both families
        assert {f"f32_spmv_bitmask16_{isa}", f"f32_spmm_bitmask16_{isa}"} <= names
    assert native().select_bitmask_kernel(1).startswith("f32_spmv_bitmask16_")
    assert native().select_bitmask_kernel(64).startswith("f32_spmm_bitmask16_")


CASES = [  # rows, cols, density, tokens
    (1, 1, 1.0, 1), (5, 16, 0.5, 1), (7, 17, 0.5, 3), (13, 31, 0.3, 2), (33, 65, 0.5, 1),
    (33, 65, 0.5, 9), (64, 64, 0.7, 16), (19, 130, 0.5, 17), (40, 200, 0.4, 70), (70, 129, 0.5, 130),
    (37, 300, 1.0, 5), (37, 300, 0.0, 5), (6, 1000, 0.05, 33),
]


@pytest.mark.parametrize("kernel", RUNNABLE)
@pytest.mark.parametrize("rows, cols, density, tokens", CASES)
def test_kernel_matches_torch(kernel, rows, cols, density, tokens):
    gen = torch.Generator().manual_seed(rows * 1000 + cols + tokens)
    w = random_weight(rows, cols, density, gen)
    if rows > 3:
        w[rows // 2] = 0  # an empty row in the middle
        w[-1] = 0  # and at the end
    fmt = Bitmask.from_dense(w)
    x = torch.randn(tokens, cols, generator=gen)
    bias = torch.randn(rows, generator=gen)
    for b, act in ((None, None), (bias, "relu"), (bias, None)):
        for threads in (1, 2):
            y = linear_bitmask(x, fmt, b, act, kernel=kernel, num_threads=threads)
            assert_close(y, expected(x, w, b, act), f"{kernel} {rows}x{cols} d={density} T={tokens} "
                                                    f"bias={b is not None} act={act} threads={threads}")


SPMV = [k["name"] for k in bitmask_kernels() if k["supported"] and k["kind"] == "spmv"]


@pytest.mark.parametrize("kernel", SPMV)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 13])
@pytest.mark.parametrize("cols", [1, 8, 15, 16, 17, 40, 129])
def test_spmv_row_tails_and_thread_splits(kernel, rows, cols):
    """The decode kernels run rows in blocks of 4 plus a tail, over each thread's own row range,
    walking 8-column halves of the masks: every row count mod 4, columns around 8 and 16, densities
    from empty to dense (a full mask byte reads 8 values), and 1-3 threads (ranges that start
    mid-block)."""
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    for density in (0.0, 0.3, 0.5, 0.7, 1.0):
        w = random_weight(rows, cols, density, gen)
        if rows > 2:
            w[1] = torch.randn(cols, generator=gen)  # one dense row among sparse ones
        fmt = Bitmask.from_dense(w)
        bias = torch.randn(rows, generator=gen)
        for tokens in (1, 2):
            x = torch.randn(tokens, cols, generator=gen)
            for threads in (1, 2, 3):
                for b, act in ((None, None), (bias, "relu")):
                    y = linear_bitmask(x, fmt, b, act, kernel=kernel, num_threads=threads)
                    assert_close(y, expected(x, w, b, act), f"{kernel} {rows}x{cols} d={density} T={tokens} "
                                                            f"threads={threads} bias={b is not None} act={act}")


@pytest.mark.parametrize("kernel", SPMV)
def test_spmv_decode_shapes_against_float64(kernel):
    """The benchmark's decode shapes (768->3072, 3072->768) at 50% and 70%, 2 threads: long rows
    whose value pointers run through many groups."""
    gen = torch.Generator().manual_seed(13)
    for rows, cols in ((3072, 768), (768, 3072)):
        for density in (0.5, 0.3):
            w = random_weight(rows, cols, density, gen)
            fmt = Bitmask.from_dense(w)
            x = torch.randn(1, cols, generator=gen)
            y = linear_bitmask(x, fmt, kernel=kernel, num_threads=2)
            assert_close(y, expected(x, w, None, None), f"{kernel} {rows}x{cols} d={density}")


def test_spmv_check_can_fail():
    """The decode check above catches a wrong weight: a value changed after packing."""
    gen = torch.Generator().manual_seed(5)
    w = random_weight(9, 40, 0.5, gen)
    fmt = Bitmask.from_dense(w)
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    values = values.clone()
    values[int(offsets[4])] += 1.0  # row 4's first stored weight
    x = torch.randn(1, 40, generator=gen)
    for kernel in SPMV:
        y = linear_bitmask_cpu(x, masks, offsets, values, 9, None, 0, 1, kernel)
        with pytest.raises(AssertionError):
            assert_close(y, expected(x, w, None, None), kernel)


@pytest.mark.parametrize("kernel", RUNNABLE)
def test_kernel_reads_strided_x_and_leading_dims(kernel):
    gen = torch.Generator().manual_seed(7)
    w = random_weight(21, 45, 0.5, gen)
    fmt = Bitmask.from_dense(w)
    big = torch.randn(11, 60, generator=gen)
    x = big[:, 5:50]  # rows 60 floats apart
    assert_close(linear_bitmask(x, fmt, kernel=kernel), expected(x, w, None, None), f"{kernel} strided")
    x3 = torch.randn(2, 3, 45, generator=gen)
    y3 = linear_bitmask(x3, fmt, kernel=kernel)
    assert y3.shape == (2, 3, 21)
    assert_close(y3.reshape(6, 21), expected(x3.reshape(6, 45), w, None, None), f"{kernel} 3-d x")


def test_zero_tokens_and_bad_inputs():
    fmt = Bitmask.from_dense(torch.eye(4, 20))
    assert linear_bitmask(torch.zeros(0, 20), fmt).shape == (0, 4)
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(torch.zeros(2, 19), fmt)
    with pytest.raises(ValueError, match="bias"):
        linear_bitmask(torch.zeros(2, 20), fmt, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown sparsert bitmask kernel"):
        linear_bitmask(torch.zeros(2, 20), fmt, kernel="f32_spmm_bitmask16_nope")


def test_binding_checks_lengths():
    fmt = Bitmask.from_dense(torch.eye(4, 20))
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    x, y = torch.zeros(1, 20), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="padding"):
        native().spmm_bitmask(4, 20, masks.data_ptr(), masks.numel(), offsets.data_ptr(), offsets.numel(),
                              values.data_ptr(), values.numel() - 1, x.data_ptr(), 1, 20, y.data_ptr(), 4,
                              0, 0, 1, "")
    with pytest.raises(ValueError, match="masks has"):
        native().spmm_bitmask(4, 20, masks.data_ptr(), masks.numel() - 1, offsets.data_ptr(), offsets.numel(),
                              values.data_ptr(), values.numel(), x.data_ptr(), 1, 20, y.data_ptr(), 4, 0, 0, 1, "")


def test_from_dense_rejects_non_finite_weights():
    w = torch.ones(3, 20)
    w[1, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinity"):
        Bitmask.from_dense(w)


def test_native_randomized_test_passes():
    """The torch-free C++ test (tests/native/spmm_bitmask_test.cc) over every kernel this CPU runs."""
    build = Path(__file__).resolve().parents[1] / "build"
    if not (build / "CMakeCache.txt").exists():
        pytest.skip("no CMake build folder (installed from a wheel)")
    subprocess.run(["cmake", "--build", str(build), "--target", "spmm_bitmask_test"], check=True, capture_output=True)
    result = subprocess.run([str(build / "spmm_bitmask_test")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


# -- the op, the registry, the layers, files ---------------------------------

def test_registry_pack_and_parse_kind():
    from sparsert.formats import format_class, pack, parse_kind
    assert parse_kind("BITMASK16") == ("bitmask",)
    assert format_class("bitmask16") == (Bitmask, ())
    w = random_weight(9, 40, 0.5, torch.Generator().manual_seed(2))
    fmt = pack(w, "bitmask16")
    assert isinstance(fmt, Bitmask) and fmt.kind == "bitmask16" and torch.equal(fmt.to_dense(), w)


@pytest.mark.parametrize("act", [0, 1, 2, 3])
def test_opcheck(act):
    fmt = Bitmask.from_dense(random_weight(12, 35, 0.5, torch.Generator().manual_seed(3)))
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    for x, bias in [(torch.randn(5, 35), torch.randn(12)), (torch.randn(2, 3, 35), None), (torch.randn(1, 35), None)]:
        torch.library.opcheck(torch.ops.sparsert.linear_bitmask.default,
                              (x, masks, offsets, values, 12, bias, act, 0))


def test_op_rejects_malformed_arrays():
    fmt = Bitmask.from_dense(random_weight(6, 40, 0.5, torch.Generator().manual_seed(4)))
    masks, offsets, values, _, _ = fmt.kernel_arrays()
    x = torch.randn(2, 40)
    op = torch.ops.sparsert.linear_bitmask.default
    bad_offsets = offsets.clone()
    bad_offsets[3] += 1
    with pytest.raises(ValueError, match="running popcount"):
        op(x, masks, bad_offsets, values, 6, None, 0, 0)
    with pytest.raises(ValueError, match="padding"):
        op(x, masks, offsets, values[:-1].contiguous(), 6, None, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        op(torch.randn(2, 30), masks, offsets, values, 6, None, 0, 0)
    with pytest.raises(ValueError, match="int16"):
        op(x, masks.to(torch.int32), offsets, values, 6, None, 0, 0)


def test_sparse_linear_file_round_trip_and_conv_refuses(tmp_path):
    import sparsert
    from sparsert.nn import SparseConv2d, SparseLinear
    lin = torch.nn.Linear(40, 10)
    with torch.no_grad():
        lin.weight.copy_(random_weight(10, 40, 0.4, torch.Generator().manual_seed(5)))
    model = torch.nn.Sequential(SparseLinear.from_dense(lin, "bitmask16", activation="relu6"))
    assert model[0].format == "bitmask16"
    sparsert.save(model, tmp_path / "b.sparsert")
    loaded = sparsert.load(tmp_path / "b.sparsert", torch.nn.Sequential(torch.nn.Linear(40, 10)))
    assert isinstance(loaded[0], SparseLinear) and loaded[0].format == "bitmask16"
    x = torch.randn(7, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), torch.nn.functional.relu6(lin(x)), rtol=1e-5, atol=1e-5)
        # .half() leaves the kernel's float32 arrays alone (the padded copy included)
        torch.testing.assert_close(loaded.half()(x.half()).float(), torch.nn.functional.relu6(lin(x)),
                                   rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="Linear layers only"):
        SparseConv2d.from_dense(torch.nn.Conv2d(4, 4, 2), "bitmask16")


def test_auto_candidates_include_bitmask_for_moderate_linear_weights():
    from sparsert.convert.plan import candidate_formats
    w = random_weight(32, 64, 0.5, torch.Generator().manual_seed(6))
    assert "bitmask16" in candidate_formats(w)
    assert "bitmask16" not in candidate_formats(w, linear=False)
    assert "bitmask16" not in candidate_formats(random_weight(32, 64, 0.05, torch.Generator().manual_seed(6)))
