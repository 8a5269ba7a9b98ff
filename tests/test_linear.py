"""Every kernel in the registry and the linear op, against torch in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import sparsert
from sparsert import ops
from sparsert._ext import native
from sparsert.formats import BSR, CSR, NM, pack
from sparsert.ops.backends.cpu import linear_bsr_cpu

KERNELS = [k for k in native().kernels() if k["supported"]]
TILES = sorted({k["block"] for k in KERNELS if k["block"] != (0, 0)})


def random_sparse(rows, cols, density, block=(1, 1), *, empty_rows=(), dtype=torch.float32):
    """A rows x cols weight whose nonzeros come in whole R x C blocks."""
    r, c = block
    nbr, nbc = -(-rows // r), -(-cols // c)
    keep = torch.rand(nbr, nbc) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    w = torch.randn(rows, cols, dtype=dtype) * mask
    for row in empty_rows:
        w[row] = 0
    return w


def reference(x, w, bias=None, activation=None):
    y = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def assert_close(actual, expected, *, k):
    # fp32 accumulation over k terms of O(1) products.
    tol = 1e-5 * max(1.0, k ** 0.5) * 4
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def run_kernel(name, fmt, x, bias=None, activation=0, threads=2):
    row_ptr, col_idx, values, r, c = fmt.kernel_arrays()
    return linear_bsr_cpu(x, row_ptr, col_idx, values, fmt.shape[0], r, c, bias, activation, threads,
                          kernel=name)


def test_registry_has_every_tile_for_every_isa():
    names = {k["name"] for k in native().kernels()}
    assert "f32_spmm_bsr_reference" in names
    for isa in {k["isa"] for k in native().kernels()} - {"reference"}:
        for (r, c) in [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4)]:
            tile = "csr" if (r, c) == (1, 1) else f"bsr{r}x{c}"
            assert f"f32_spmm_{tile}_{isa}" in names
            assert f"f32_spmv_{tile}_{isa}" in names


def _format_for(kernel, w):
    r, c = kernel["block"]
    if (r, c) == (0, 0):
        return CSR.from_dense(w)
    return CSR.from_dense(w) if (r, c) == (1, 1) else BSR.from_dense(w, (r, c))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k["name"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 9, 17, 64, 130])
def test_kernel_matches_torch(kernel, tokens):
    rows, cols = 37, 53  # multiples of no tile
    block = kernel["block"] if kernel["block"] != (0, 0) else (1, 1)
    w = random_sparse(rows, cols, 0.3, block, empty_rows=(0, 5, 6, 7, 36))
    fmt = _format_for(kernel, w)
    x = torch.randn(tokens, cols)
    bias = torch.randn(rows)
    for b, act in [(None, 0), (bias, 0), (bias, 1)]:
        y = run_kernel(kernel["name"], fmt, x, b, act)
        assert_close(y, reference(x, w, b, "relu" if act else None), k=cols)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k["name"])
@pytest.mark.parametrize("case", ["all_zero", "dense", "one_row", "one_col", "wide_int32"])
def test_kernel_edge_matrices(kernel, case):
    block = kernel["block"] if kernel["block"] != (0, 0) else (1, 1)
    rows, cols, density = {"all_zero": (19, 23, 0.0), "dense": (19, 23, 1.0), "one_row": (1, 40, 0.5),
                           "one_col": (33, 1, 0.7), "wide_int32": (3, 70_000 * block[1], 0.001)}[case]
    w = random_sparse(rows, cols, density, block)
    fmt = _format_for(kernel, w)
    if case == "wide_int32":
        assert fmt.col_indices.dtype == torch.int32  # too wide for 16-bit indices
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, cols)
        bias = torch.randn(rows)
        assert_close(run_kernel(kernel["name"], fmt, x, bias), reference(x, w, bias), k=cols)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k["kind"] == "spmm"], ids=lambda k: k["name"])
def test_kernel_many_tokens(kernel):
    w = random_sparse(45, 70, 0.2, kernel["block"] if kernel["block"] != (0, 0) else (1, 1))
    fmt = _format_for(kernel, w)
    x = torch.randn(4099, 70)
    assert_close(run_kernel(kernel["name"], fmt, x), reference(x, w), k=70)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k["kind"] == "spmm" and k["block"] == (1, 1)],
                         ids=lambda k: k["name"])
@pytest.mark.parametrize("cols", [700, 1500, 3001])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_csr_panel_width_cap_for_wide_inputs(kernel, cols, density):
    # Sparse CSR over wide inputs packs narrower token panels (to stay in
    # L2): 1, 2 or 4 vectors by width; denser keeps the widest. All must agree.
    w = random_sparse(67, cols, density, empty_rows=(3,))
    fmt = CSR.from_dense(w)
    x = torch.randn(130, cols)
    bias = torch.randn(67)
    for threads in (1, 2, 3):
        y = run_kernel(kernel["name"], fmt, x, bias, 1, threads=threads)
        assert_close(y, reference(x, w, bias, "relu"), k=cols)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_thread_counts_partition_rows_correctly(threads):
    w = random_sparse(101, 64, 0.2, empty_rows=range(0, 40))  # skewed rows
    fmt = CSR.from_dense(w)
    x = torch.randn(40, 64)
    assert_close(ops.linear(x, fmt, num_threads=threads), reference(x, w), k=64)
    with ops.num_threads(threads):
        assert ops.get_num_threads() == threads
        assert_close(ops.linear(x, fmt), reference(x, w), k=64)
    assert ops.get_num_threads() == torch.get_num_threads()


def test_forcing_unsupported_or_mismatched_kernel_is_an_error():
    w = random_sparse(8, 8, 0.5)
    with pytest.raises(ValueError, match="does not handle"):
        run_kernel(next(k["name"] for k in KERNELS if k["block"] == (4, 1)), CSR.from_dense(w), torch.randn(2, 8))
    with pytest.raises(ValueError, match="unknown sparsert kernel"):
        run_kernel("f32_spmm_nope", CSR.from_dense(w), torch.randn(2, 8))


FORMATS = ["dense", "csr", "bsr1x4", "bsr4x1", "bsr8x1", "bsr16x1", "bsr4x4", "nm2:4", "nm1:4"]


def _pruned_for(kind, rows, cols, density=0.25):
    if kind.startswith("nm"):
        n, m = (int(v) for v in kind[2:].split(":"))
        w = torch.randn(rows, cols)
        groups = -(-cols // m)
        padded = F.pad(w, (0, groups * m - cols)).reshape(rows, groups, m)
        keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, padded.abs().topk(n, -1).indices, True)
        return (padded * keep).reshape(rows, groups * m)[:, :cols].contiguous()
    if kind.startswith("bsr"):
        r, c = (int(v) for v in kind[3:].split("x"))
        return random_sparse(rows, cols, density, (r, c))
    return random_sparse(rows, cols, density)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("shape", [(1, 50, 30), (2, 7, 50), (130,)], ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_linear_op_matches_torch(kind, shape, activation):
    rows, cols = 30, 50
    if len(shape) == 1:
        x = torch.randn(shape[0], cols)
    else:
        x = torch.randn(*shape[:-1], cols)
    w = _pruned_for(kind, rows, cols)
    fmt = pack(w, kind)
    bias = torch.randn(rows)
    y = ops.linear(x, fmt, bias, activation)
    assert y.shape == (*x.shape[:-1], rows) and y.dtype == torch.float32
    assert_close(y, reference(x, w, bias, activation), k=cols)


def test_linear_non_contiguous_and_strided_inputs():
    w = random_sparse(24, 40, 0.3)
    fmt = CSR.from_dense(w)
    base = torch.randn(40, 64)
    x_t = base.t()                      # (64, 40), column-major
    assert_close(ops.linear(x_t, fmt), reference(x_t, w), k=40)
    x_rows = torch.randn(64, 80)[:, ::2]  # strided last dim
    assert_close(ops.linear(x_rows, fmt), reference(x_rows, w), k=40)
    x_slice = torch.randn(64, 100)[:, 10:50]  # row stride != in_features
    assert_close(ops.linear(x_slice, fmt), reference(x_slice, w), k=40)
    x_expand = torch.randn(1, 40).expand(9, 40)  # zero row stride
    assert_close(ops.linear(x_expand, fmt), reference(x_expand, w), k=40)


def test_linear_bf16_input_returns_bf16():
    w = random_sparse(16, 32, 0.5)
    x = torch.randn(5, 32).to(torch.bfloat16)
    y = ops.linear(x, CSR.from_dense(w))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(x.float(), w), rtol=2e-2, atol=2e-2)


def test_zero_tokens_and_dense_weight_passthrough():
    w = random_sparse(6, 10, 0.5)
    assert ops.linear(torch.randn(0, 10), CSR.from_dense(w)).shape == (0, 6)
    x = torch.randn(3, 10)
    assert_close(ops.linear(x, w), reference(x, w), k=10)


@pytest.mark.parametrize("bad, match", [
    (lambda fmt: ops.linear(torch.randn(3, 11), fmt), "in_features=10"),
    (lambda fmt: ops.linear(torch.randn(3, 10), fmt, torch.randn(5)), "bias must have shape"),
    (lambda fmt: ops.linear(torch.randn(3, 10), fmt, activation="tanh"), "activation must be"),
    (lambda fmt: ops.linear(torch.randn(3, 10), fmt, num_threads=0), "num_threads"),
    (lambda fmt: ops.linear(torch.randint(0, 3, (3, 10)), fmt), "floating point"),
])
def test_linear_bad_arguments(bad, match):
    fmt = CSR.from_dense(random_sparse(6, 10, 0.5))
    with pytest.raises(ValueError, match=match):
        bad(fmt)
    with pytest.raises(TypeError, match="sparsert format"):
        ops.linear(torch.randn(3, 10), "csr")


def _raw_csr_arrays():
    fmt = CSR.from_dense(random_sparse(6, 10, 0.5))
    row_ptr, col, values, _, _ = fmt.kernel_arrays()
    return row_ptr.clone(), col.clone(), values.clone()


@pytest.mark.parametrize("corrupt, match", [
    (lambda rp, ci, v: rp.copy_(torch.tensor([0, 9, 1, 2, 3, 4, int(rp[-1])], dtype=torch.int32)),
     "non-decreasing"),
    (lambda rp, ci, v: ci.__setitem__(0, 10), r"column indices must lie in \[0, 10\)"),
    (lambda rp, ci, v: ci.__setitem__(0, -1), "column indices"),
])
def test_malformed_arrays_never_reach_the_kernel(corrupt, match):
    """The op is public (torch.ops.sparsert.linear_bsr): arrays that would make
    the kernel read out of bounds raise, also when they were valid on an
    earlier call and were then changed in place."""
    row_ptr, col, values = _raw_csr_arrays()
    x = torch.randn(3, 10)
    torch.ops.sparsert.linear_bsr(x, row_ptr, col, values, 6, 1, 1, None, 0, 0)  # valid: passes, cached
    corrupt(row_ptr, col, values)
    with pytest.raises(ValueError, match=match):
        torch.ops.sparsert.linear_bsr(x, row_ptr, col, values, 6, 1, 1, None, 0, 0)
    with pytest.raises(ValueError, match=match):
        linear_bsr_cpu(x, row_ptr, col, values, 6, 1, 1, None, 0, 0)


def test_validation_is_remembered_per_tensor_and_forgotten_with_it():
    from sparsert.ops.backends import cpu as _checks
    row_ptr, col, values = _raw_csr_arrays()
    x = torch.randn(3, 10)
    linear_bsr_cpu(x, row_ptr, col, values, 6, 1, 1, None, 0, 0)
    assert id(values) in _checks._validated
    # The same arrays under another shape are checked again (and rejected).
    with pytest.raises(ValueError, match="row_ptr has"):
        linear_bsr_cpu(x, row_ptr, col, values, 7, 1, 1, None, 0, 0)
    key = id(values)
    del values
    assert key not in _checks._validated


@pytest.mark.parametrize("kind", ["csr", "bsr4x1", "nm2:4"])
def test_every_format_hands_the_kernel_the_same_arrays_each_call(kind):
    """Validation is remembered by tensor identity; a format that built new
    views per call would be validated in full (O(nnz)) on every call."""
    from sparsert.nn import SparseLinear
    fmt = pack(_pruned_for(kind, 12, 16), kind)
    first, again = fmt.kernel_arrays(), fmt.kernel_arrays()
    assert all(a is b for a, b in zip(first[:3], again[:3]))
    layer = torch.nn.Linear(16, 12)
    layer.weight.data = fmt.to_dense()
    module = SparseLinear.from_dense(layer, kind)
    assert all(a is b for a, b in zip(module._kernel_arrays(), module._kernel_arrays()))
    with torch.inference_mode():  # inference tensors have no version counter
        copy = __import__("copy").deepcopy(module)
        x = torch.randn(3, 16)
        assert_close(copy(x), reference(x, fmt.to_dense().double(), layer.bias.detach().double()), k=16)


@pytest.mark.parametrize("kind", ["csr", "bsr4x1", "nm2:4"])
def test_opcheck(kind):
    w = _pruned_for(kind, 12, 16)
    fmt = pack(w, kind)
    row_ptr, col, values, r, c = fmt.kernel_arrays()
    for x, bias, act in [(torch.randn(5, 16), torch.randn(12), 0), (torch.randn(2, 3, 16), None, 1),
                         (torch.randn(1, 16), None, 2)]:
        torch.library.opcheck(torch.ops.sparsert.linear_bsr.default,
                              (x, row_ptr, col, values, 12, r, c, bias, act, 0))


def test_torch_compile_fullgraph_and_export():
    w = random_sparse(12, 16, 0.4, (4, 1))
    fmt = BSR.from_dense(w, (4, 1))
    bias = torch.randn(12)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return ops.linear(x, fmt, bias, "relu")

    x = torch.randn(3, 16)
    expected = reference(x, w, bias, "relu")
    compiled = torch.compile(Layer(), fullgraph=True, backend="eager")
    assert_close(compiled(x), expected, k=16)
    program = torch.export.export(Layer(), (x,))
    assert any("sparsert.linear_bsr" in str(n.target) for n in program.graph.nodes)
    assert_close(program.module()(x), expected, k=16)


@pytest.mark.parametrize("activation", [0, 1, 2])
def test_pure_torch_default_matches(activation):
    """The device-agnostic default (used off-CPU until a native kernel exists)."""
    from sparsert.ops.schema import linear_bsr_torch
    w = random_sparse(20, 30, 0.3, (4, 1))
    fmt = BSR.from_dense(w, (4, 1))
    row_ptr, col, values, r, c = fmt.kernel_arrays()
    x, bias = torch.randn(4, 30), torch.randn(20)
    y = linear_bsr_torch(x, row_ptr, col, values, 20, r, c, bias, activation)
    assert_close(y, reference(x, w, bias, [None, "relu", "gelu"][activation]), k=30)


@pytest.mark.parametrize("isa", sorted({k["isa"] for k in KERNELS} - {"reference"}))
def test_select_kernel_picks_spmv_for_one_token_and_spmm_for_many(isa):
    assert native().select_kernel(4, 1, 1, isa) == f"f32_spmv_bsr4x1_{isa}"
    assert native().select_kernel(4, 1, 128, isa) == f"f32_spmm_bsr4x1_{isa}"
    # a tile without its own kernel gets the ISA's any-shape micro-kernel
    assert native().select_kernel(3, 5, 128, isa) == f"f32_spmm_bsr_any_{isa}"
    assert native().select_kernel(16, 16, 1, isa) == f"f32_spmv_bsr_any_{isa}"
    assert native().select_kernel(4, 1, 128, "no-such-isa") == "f32_spmm_bsr_reference"


ANY_SHAPE_KERNELS = [k for k in KERNELS if "_bsr_any_" in k["name"]]
# Shapes with no kernel of their own: wide (C >= a vector), narrow, tall
# columns (R x 1), odd, and 1x1 (CSR arrays through the any-shape path).
ANY_BLOCKS = [(1, 1), (2, 2), (3, 5), (5, 17), (7, 8), (8, 8), (1, 9), (9, 1), (32, 1), (16, 16), (1, 32)]


def test_every_isa_has_an_any_shape_kernel_of_each_kind():
    for isa in {k["isa"] for k in native().kernels()} - {"reference"}:
        names = {k["name"] for k in native().kernels() if k["isa"] == isa}
        assert {f"f32_spmm_bsr_any_{isa}", f"f32_spmv_bsr_any_{isa}"} <= names


@pytest.mark.parametrize("kernel", ANY_SHAPE_KERNELS, ids=lambda k: k["name"])
@pytest.mark.parametrize("block", ANY_BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("tokens", [1, 2, 7, 33, 130, 1000])  # 1000: panels split between threads
def test_any_shape_kernel_matches_torch(kernel, block, tokens):
    rows, cols = 37, 53  # multiples of no block: padded edge blocks in both directions
    w = random_sparse(rows, cols, 0.35, block, empty_rows=(0, 36))
    fmt = BSR.from_dense(w, block)
    x = torch.randn(tokens, cols)
    bias = torch.randn(rows)
    for b, act in [(None, 0), (bias, 1)]:
        y = run_kernel(kernel["name"], fmt, x, b, act)
        assert_close(y, reference(x, w, b, "relu" if act else None), k=cols)


@pytest.mark.parametrize("kernel", ANY_SHAPE_KERNELS, ids=lambda k: k["name"])
@pytest.mark.parametrize("block", [(16, 16), (32, 1), (3, 5)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("case", ["all_zero", "dense", "empty_block_rows", "wide_int32"])
def test_any_shape_kernel_edge_matrices(kernel, block, case):
    r, c = block
    rows, cols, density = {"all_zero": (40, 50, 0.0), "dense": (40, 50, 1.0),
                           "empty_block_rows": (70, 50, 0.5), "wide_int32": (r + 1, 70_000 * c, 0.0005)}[case]
    w = random_sparse(rows, cols, density, block)
    if case == "empty_block_rows":
        w[: 2 * r] = 0  # the first two block rows hold no block
        w[-r:] = 0
    fmt = BSR.from_dense(w, block)
    if case == "wide_int32":
        assert fmt.col_indices.dtype == torch.int32
    for tokens in (1, 5) if case == "wide_int32" else (1, 5, 33):
        x = torch.randn(tokens, cols)
        bias = torch.randn(rows)
        for threads in (1, 3):
            y = run_kernel(kernel["name"], fmt, x, bias, 1, threads=threads)
            assert_close(y, reference(x, w, bias, "relu"), k=cols)


@pytest.mark.parametrize("block", [(16, 16), (8, 8), (32, 1), (2, 2)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_linear_op_on_blocks_without_their_own_kernel(block):
    # the op's default selection (any-shape kernels), many tokens and one
    w = random_sparse(96, 80, 0.3, block)
    fmt = BSR.from_dense(w, block)
    for tokens in (1, 300):
        x = torch.randn(tokens, 80)
        assert_close(ops.linear(x, fmt), reference(x, w), k=80)


def test_raw_op_rejects_inconsistent_arrays_without_crashing():
    """The op can be called with raw tensors; sizes and row pointers are checked in C++."""
    fmt = CSR.from_dense(random_sparse(10, 12, 0.5))
    rp, ci, v, r, c = fmt.kernel_arrays()
    x = torch.randn(3, 12)
    op = torch.ops.sparsert.linear_bsr
    bad_rp = rp.clone()
    bad_rp[3] = 10_000
    cases = [
        (rp[:-1], ci, v), (rp, ci[:-1], v), (rp, ci, v[:-1]), (bad_rp, ci, v),
        (rp.flip(0).contiguous(), ci, v), (rp.long(), ci, v), (rp, ci, v.double()),
    ]
    for row_ptr, col, values in cases:
        with pytest.raises((ValueError, RuntimeError)):
            op(x, row_ptr, col, values, 10, 1, 1, None, 0, 0)


def test_eager_fast_path_and_dispatcher_path_agree():
    """ops.linear skips the dispatcher in plain eager CPU calls; traced/fake calls use the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = random_sparse(20, 24, 0.3)
    fmt = CSR.from_dense(w)
    x, bias = torch.randn(5, 24), torch.randn(20)
    row_ptr, col, values, r, c = fmt.kernel_arrays()
    through_op = torch.ops.sparsert.linear_bsr(x, row_ptr, col, values, 20, r, c, bias, 1, 0)
    assert torch.equal(ops.linear(x, fmt, bias, "relu"), through_op)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.linear(mode.from_tensor(x), fmt, bias)
        assert fake.shape == (5, 20) and type(fake).__name__ == "FakeTensor"
    x.requires_grad_(True)
    ops.linear(x, fmt).sum().backward()  # the input's autograd formula: dx = dy . W
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 24))


def test_eager_cpu_call_predicate():
    """The one rule every op and module uses to decide whether to skip the dispatcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sparsert.ops.backends.cpu import eager_cpu_call

    x, bias = torch.randn(3, 4), torch.nn.Parameter(torch.randn(4), requires_grad=False)
    assert eager_cpu_call(x, bias, None)
    assert not eager_cpu_call(x.requires_grad_())
    with torch.no_grad():
        assert eager_cpu_call(x)
    assert not eager_cpu_call(torch.randn(2, 2), torch.nn.Parameter(torch.randn(2)))  # bias needs grad
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert not eager_cpu_call(mode.from_tensor(torch.randn(2)))
    assert not eager_cpu_call(torch.randn(2, device="meta"))
