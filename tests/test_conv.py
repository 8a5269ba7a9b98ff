"""Every conv kernel in the registry and the conv2d op, against F.conv2d in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsert import ops
from sparsert._ext import native
from sparsert.formats import BSR, CSR, pack
from sparsert.formats._common import decode_indices
from sparsert.ops.backends.cpu import conv2d_bsr_cpu
from sparsert.ops.conv import ConvWeight
from sparsert.ops.schema import conv2d_bsr_torch

CONV_KERNELS = [k for k in native().conv_kernels() if k["supported"]]
FAST = [k for k in CONV_KERNELS if k["kind"] != "reference"]
REFERENCE = "f32_conv_bsr_reference"
TILES = [(1, 1), (1, 4), (4, 1), (8, 1), (16, 1), (4, 4)]


def kid(k):
    return k["name"]


def pruned_weight(cout, cin_g, kh, kw, density, block=(1, 1), *, empty_rows=()):
    """A 4-D weight whose flattened matrix has nonzeros in whole R x C blocks."""
    r, c = block
    cols = cin_g * kh * kw
    keep = torch.rand(-(-cout // r), -(-cols // c)) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:cout, :cols]
    w = torch.randn(cout, cols) * mask
    for row in empty_rows:
        w[row] = 0
    return w.reshape(cout, cin_g, kh, kw)


def pack4(w4, block):
    w2 = w4.reshape(w4.shape[0], -1)
    return CSR.from_dense(w2) if tuple(block) == (1, 1) else BSR.from_dense(w2, tuple(block))


def reference(x, w4, bias, stride, padding, dilation, groups, activation=0):
    y = F.conv2d(x.double(), w4.double(), None if bias is None else bias.double(), stride, padding, dilation, groups)
    if activation in (1, 3):
        y = torch.relu(y)
    if activation == 3:
        y = y.clamp_max(6.0)
    if activation == 2:
        y = F.gelu(y)
    return y


def assert_close(actual, expected, *, k):
    # fp32 accumulation over k terms of O(1) products.
    tol = 4e-5 * max(1.0, k ** 0.5)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


def run(name, fmt, x, ks, stride, padding, dilation, groups, bias=None, activation=0, threads=2, col=None):
    row_ptr, col_idx, values, r, c = fmt.kernel_arrays()
    return conv2d_bsr_cpu(x, row_ptr, col_idx if col is None else col, values, fmt.shape[0], list(ks), r, c,
                          bias, list(stride), list(padding), list(dilation), groups, activation, threads,
                          kernel=name)


# (batch, cin, cout, H, W, kernel, stride, padding, dilation, groups): every cout/groups is a
# multiple of 16 so every tile runs every case.
GENERAL = [
    (1, 8, 16, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 3x3 same, odd sizes
    (2, 6, 16, 7, 5, (3, 3), (2, 2), (1, 1), (1, 1), 1),      # stride 2
    (1, 8, 32, 13, 10, (3, 3), (2, 1), (0, 2), (2, 1), 1),    # mixed stride/padding/dilation
    (1, 12, 16, 8, 9, (1, 1), (2, 2), (0, 0), (1, 1), 1),     # strided 1x1 (ResNet downsample)
    (1, 5, 16, 6, 7, (1, 1), (1, 1), (1, 2), (1, 1), 1),      # padded 1x1
    (1, 8, 32, 10, 10, (3, 3), (1, 1), (1, 1), (1, 1), 2),    # groups 2
    (1, 8, 64, 9, 6, (3, 3), (2, 2), (1, 1), (1, 1), 4),      # groups 4, stride 2
    (8, 4, 16, 6, 6, (5, 5), (1, 1), (2, 2), (1, 1), 1),      # batch 8, 5x5
    (1, 3, 16, 17, 15, (3, 3), (3, 3), (2, 1), (2, 2), 1),    # stride 3, dilation 2
    (1, 4, 16, 5, 5, (5, 5), (1, 1), (0, 0), (1, 1), 1),      # kernel = image: one output pixel
    (1, 6, 16, 3, 20, (1, 3), (1, 2), (0, 1), (1, 3), 1),     # rectangular kernel
    (1, 3, 16, 40, 37, (3, 3), (2, 2), (1, 1), (1, 1), 1),    # many tiles (stem-like)
]
# (batch, cin, cout, H, W, groups): H*W below, at and above the tile, not multiples of the vector.
POINTWISE = [
    (1, 8, 16, 1, 1, 1), (1, 7, 16, 5, 7, 1), (2, 16, 32, 8, 8, 1), (1, 9, 16, 9, 15, 1),
    (1, 24, 48, 16, 16, 1), (8, 5, 16, 17, 19, 1), (1, 8, 32, 7, 7, 2), (2, 12, 48, 11, 3, 3),
]


def general_case_id(case):
    b, cin, cout, h, w, k, s, p, d, g = case
    return f"n{b}c{cin}o{cout}_{h}x{w}_k{k[0]}x{k[1]}_s{s[0]}{s[1]}_p{p[0]}{p[1]}_d{d[0]}{d[1]}_g{g}"


def test_registry_has_every_tile_for_every_isa():
    names = {k["name"] for k in native().conv_kernels()}
    assert REFERENCE in names
    isas = {k["isa"] for k in native().conv_kernels()} - {"reference"}
    assert "scalar" in isas
    for isa in isas:
        for (r, c) in TILES:
            tile = "csr" if (r, c) == (1, 1) else f"bsr{r}x{c}"
            assert f"f32_conv1x1_{tile}_{isa}" in names
            assert f"f32_conv_{tile}_{isa}" in names


@pytest.mark.parametrize("case", GENERAL, ids=general_case_id)
def test_reference_kernel_matches_torch(case):
    b, cin, cout, h, w, k, s, p, d, g = case
    w4 = pruned_weight(cout, cin // g, *k, 0.4, (4, 1))
    x, bias = torch.randn(b, cin, h, w), torch.randn(cout)
    y = run(REFERENCE, pack4(w4, (4, 1)), x, k, s, p, d, g, bias)
    assert_close(y, reference(x, w4, bias, s, p, d, g), k=w4[0].numel())


@pytest.mark.parametrize("kernel", [k for k in FAST if k["kind"] == "conv"], ids=kid)
@pytest.mark.parametrize("case", GENERAL, ids=general_case_id)
def test_conv_kernel_matches_torch_and_reference(kernel, case):
    b, cin, cout, h, w, k, s, p, d, g = case
    block = kernel["block"]
    w4 = pruned_weight(cout, cin // g, *k, 0.35, block, empty_rows=(1,))
    x, bias = torch.randn(b, cin, h, w), torch.randn(cout)
    fmt = pack4(w4, block)
    y = run(kernel["name"], fmt, x, k, s, p, d, g, bias)
    assert_close(y, reference(x, w4, bias, s, p, d, g), k=w4[0].numel())
    y_ref = run(REFERENCE, fmt, x, k, s, p, d, g, bias)
    assert_close(y, y_ref.double(), k=w4[0].numel())


@pytest.mark.parametrize("kernel", [k for k in FAST if k["kind"] == "conv" and k["block"][0] == 1], ids=kid)
@pytest.mark.parametrize("case", GENERAL, ids=general_case_id)
def test_single_row_blocks_in_place_and_through_the_im2col_slab(kernel, case):
    # Single-row blocks read the input in place when each element would feed
    # few FMAs (density 0.1: at most 6.4 per element here), else through a
    # per-tile im2col slab (density 0.9: at least 14.4). Both must agree.
    b, cin, cout, h, w, k, s, p, d, g = case
    x, bias = torch.randn(b, cin, h, w), torch.randn(cout)
    for density in (0.1, 0.9):
        w4 = pruned_weight(cout, cin // g, *k, density, kernel["block"], empty_rows=(2,))
        fmt = pack4(w4, kernel["block"])
        for threads in (1, 3):
            y = run(kernel["name"], fmt, x, k, s, p, d, g, bias, activation=1, threads=threads)
            assert_close(y, reference(x, w4, bias, s, p, d, g, 1), k=w4[0].numel())


@pytest.mark.parametrize("kernel", [k for k in FAST if k["kind"] == "pointwise"], ids=kid)
@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: f"n{c[0]}c{c[1]}o{c[2]}_{c[3]}x{c[4]}_g{c[5]}")
def test_pointwise_kernel_matches_torch_and_reference(kernel, case):
    b, cin, cout, h, w, g = case
    block = kernel["block"]
    w4 = pruned_weight(cout, cin // g, 1, 1, 0.4, block, empty_rows=(0, cout - 1))
    x, bias = torch.randn(b, cin, h, w), torch.randn(cout)
    fmt = pack4(w4, block)
    one = (1, 1)
    y = run(kernel["name"], fmt, x, one, one, (0, 0), one, g, bias)
    assert_close(y, reference(x, w4, bias, one, (0, 0), one, g), k=cin // g)
    assert_close(y, run(REFERENCE, fmt, x, one, one, (0, 0), one, g, bias).double(), k=cin // g)


EDGE_WEIGHTS = {
    "all_zero": lambda cout, cin, kh, kw: torch.zeros(cout, cin, kh, kw),
    "dense": lambda cout, cin, kh, kw: torch.randn(cout, cin, kh, kw),
    "empty_filters": lambda cout, cin, kh, kw: pruned_weight(cout, cin, kh, kw, 0.5, empty_rows=range(0, cout, 3)),
    "one_nonzero": lambda cout, cin, kh, kw: torch.zeros(cout, cin, kh, kw).index_put_(
        (torch.tensor([cout - 1]), torch.tensor([cin - 1]), torch.tensor([kh - 1]), torch.tensor([kw - 1])),
        torch.tensor([1.5])),
}


@pytest.mark.parametrize("kernel", FAST, ids=kid)
@pytest.mark.parametrize("edge", sorted(EDGE_WEIGHTS))
def test_kernel_edge_weights(kernel, edge):
    pointwise = kernel["kind"] == "pointwise"
    k, s, p = ((1, 1), (1, 1), (0, 0)) if pointwise else ((3, 3), (2, 2), (1, 1))
    cout, cin = 35, 13  # cout not a multiple of any block: the last block row sticks out
    w4 = EDGE_WEIGHTS[edge](cout, cin, *k)
    block = kernel["block"]
    if block != (1, 1):  # make the weight block-aligned (whole blocks kept or dropped)
        w2 = w4.reshape(cout, -1)
        r, c = block
        grid = F.pad(w2, (0, (-w2.shape[1]) % c, 0, (-cout) % r)).abs()
        keep = grid.reshape(grid.shape[0] // r, r, -1, c).sum((1, 3)) > 0
        mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:cout, :w2.shape[1]]
        w4 = torch.where(mask, torch.where(w2 == 0, torch.randn_like(w2), w2), 0.0).reshape(w4.shape)
        if edge == "all_zero":
            w4 = torch.zeros_like(w4)
    x, bias = torch.randn(2, cin, 11, 9), torch.randn(cout)
    fmt = pack4(w4, block)
    for b in (None, bias):
        for act in (0, 1):
            y = run(kernel["name"], fmt, x, k, s, p, (1, 1), 1, b, act)
            assert_close(y, reference(x, w4, b, s, p, (1, 1), 1, act), k=w4[0].numel())


@pytest.mark.parametrize("kernel", [k for k in FAST if k["block"] == (4, 1)], ids=kid)
def test_32bit_indices(kernel):
    k, s, p = ((1, 1), (1, 1), (0, 0)) if kernel["kind"] == "pointwise" else ((3, 3), (1, 1), (1, 1))
    w4 = pruned_weight(16, 6, *k, 0.5, (4, 1))
    fmt = pack4(w4, (4, 1))
    col32 = decode_indices(fmt.kernel_arrays()[1]).to(torch.int32).contiguous()
    x = torch.randn(1, 6, 10, 7)
    y = run(kernel["name"], fmt, x, k, s, p, (1, 1), 1, col=col32)
    assert_close(y, reference(x, w4, None, s, p, (1, 1), 1), k=w4[0].numel())


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("hw", [5, 40])
def test_thread_counts_partition_work_correctly(threads, hw):
    w4 = pruned_weight(48, 16, 3, 3, 0.3, (4, 1), empty_rows=range(0, 20))
    x = torch.randn(2, 16, hw, hw)
    fmt = pack4(w4, (4, 1))
    for pointwise in (False, True):
        ww = w4[:, :, :1, :1].contiguous() if pointwise else w4
        f = pack4(ww, (4, 1))
        p = (0, 0) if pointwise else (1, 1)
        y = ops.conv2d(x, ConvWeight(f, ww.shape[2:]), padding=p, num_threads=threads)
        assert_close(y, reference(x, ww, None, (1, 1), p, (1, 1), 1), k=ww[0].numel())
    assert fmt.nnz > 0


@pytest.mark.parametrize("activation", [None, "relu", "relu6", "gelu"])
@pytest.mark.parametrize("kind", ["csr", "bsr4x1", "bsr8x1", "nm2:4"])
def test_conv2d_op_matches_torch(kind, activation):
    w4 = torch.randn(16, 12, 3, 3) * 4
    w2 = w4.reshape(16, -1)
    if kind == "nm2:4":  # keep the 2 largest of every 4
        groups = w2.reshape(16, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
        fmt = pack((groups * keep).reshape(16, -1), kind)
    else:
        fmt = pack(w2 * (torch.rand_like(w2) < 0.5), kind)
    dense = fmt.to_dense().reshape(16, 12, 3, 3)
    x, bias = torch.randn(2, 12, 15, 14), torch.randn(16)
    code = {None: 0, "relu": 1, "gelu": 2, "relu6": 3}[activation]
    y = ops.conv2d(x, ConvWeight(fmt, (3, 3)), bias, stride=2, padding=1, activation=activation)
    assert_close(y, reference(x, dense, bias, (2, 2), (1, 1), (1, 1), 1, code), k=108)
    y2 = ops.conv2d(x, fmt, bias, stride=2, padding=1, activation=activation, kernel_size=3)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def test_conv2d_input_layouts_dtypes_and_unbatched():
    w4 = pruned_weight(16, 8, 3, 3, 0.5)
    cw = ConvWeight(pack4(w4, (1, 1)), (3, 3))
    x = torch.randn(2, 8, 12, 12)
    expected = reference(x, w4, None, (1, 1), (1, 1), (1, 1), 1)
    assert_close(ops.conv2d(x.to(memory_format=torch.channels_last), cw, padding=1), expected, k=72)
    xs = torch.randn(2, 8, 12, 24)[..., ::2]  # non-contiguous
    assert_close(ops.conv2d(xs, cw, padding="same"), reference(xs, w4, None, (1, 1), (1, 1), (1, 1), 1), k=72)
    y64 = ops.conv2d(x.double(), cw, padding=1)
    assert y64.dtype == torch.float64
    assert_close(y64, expected, k=72)
    y3 = ops.conv2d(x[0], cw, padding=1)
    assert y3.shape == expected.shape[1:]
    assert_close(y3, expected[0], k=72)
    # a 1x1 weight needs no kernel_size
    w1 = pruned_weight(16, 8, 1, 1, 0.5)
    assert_close(ops.conv2d(x, pack4(w1, (1, 1))), reference(x, w1, None, 1, 0, 1, 1), k=8)
    # a dense 4-D weight is F.conv2d
    torch.testing.assert_close(ops.conv2d(x, w4, padding=1, activation="relu"),
                               torch.relu(F.conv2d(x, w4, None, 1, 1)))
    # batch 0
    assert ops.conv2d(torch.randn(0, 8, 12, 12), cw, padding=1).shape == (0, 16, 12, 12)


def test_conv_weight():
    w4 = pruned_weight(16, 8, 3, 2, 0.5)
    cw = ConvWeight.from_dense(w4, "bsr4x1")
    assert cw.kernel_size == (3, 2) and cw.out_channels == 16
    torch.testing.assert_close(cw.to_dense(), w4)
    with pytest.raises(ValueError, match="does not divide"):
        ConvWeight(cw.format, (5, 5))
    with pytest.raises(TypeError, match="sparsert format"):
        ConvWeight(w4, (3, 2))
    with pytest.raises(ValueError, match="4-D"):
        ConvWeight.from_dense(w4[0], "csr")


@pytest.mark.parametrize("bad, match", [
    (lambda x, f: ops.conv2d(x, f), "kernel_size"),                                  # 3x3 not inferred
    (lambda x, f: ops.conv2d(x, ConvWeight(f, (3, 3)), kernel_size=(1, 9)), "disagrees"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=5), "columns"),
    (lambda x, f: ops.conv2d(x[:, :4], f, kernel_size=3), "columns"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, groups=3), "groups"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, activation="tanh"), "activation"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, stride=0), "stride"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, padding=-1), "padding"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, padding="full"), "padding"),
    (lambda x, f: ops.conv2d(x, f, kernel_size=3, num_threads=0), "num_threads"),
    (lambda x, f: ops.conv2d(x[..., :2, :2], f, kernel_size=3), "smaller"),
    (lambda x, f: ops.conv2d(x[0, 0], f, kernel_size=3), "N, C, H, W"),
    (lambda x, f: ops.conv2d(x.int(), f, kernel_size=3), "floating"),
    (lambda x, f: ops.conv2d(x, f, torch.randn(3), kernel_size=3), "bias"),
])
def test_conv2d_bad_arguments(bad, match):
    x = torch.randn(1, 8, 6, 6)
    fmt = pack4(pruned_weight(16, 8, 3, 3, 0.5), (1, 1))
    with pytest.raises(ValueError, match=match):
        bad(x, fmt)
    with pytest.raises(TypeError, match="sparsert format"):
        ops.conv2d(x, "csr", kernel_size=3)


def test_malformed_arrays_never_reach_the_conv_kernel():
    """torch.ops.sparsert.conv2d_bsr is public: a row pointer that is not
    monotone (or a column index past the patch) raises instead of reading
    out of bounds, also after an earlier valid call with the same tensors."""
    fmt = pack4(pruned_weight(16, 8, 3, 3, 0.5), (1, 1))
    row_ptr, col, values, _, _ = fmt.kernel_arrays()
    row_ptr, col, values = row_ptr.clone(), col.clone(), values.clone()
    x = torch.randn(1, 8, 6, 6)
    args = (16, [3, 3], 1, 1, None, [1, 1], [1, 1], [1, 1], 1, 0, 0)
    torch.ops.sparsert.conv2d_bsr(x, row_ptr, col, values, *args)
    row_ptr[1] = row_ptr[-1]  # rows 1.. now start past their end
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.sparsert.conv2d_bsr(x, row_ptr, col, values, *args)
    row_ptr[1] = 0
    torch.ops.sparsert.conv2d_bsr(x, row_ptr, col, values, *args)  # valid again (row 0 empty)
    col[0] = 8 * 9
    with pytest.raises(ValueError, match="column indices"):
        torch.ops.sparsert.conv2d_bsr(x, row_ptr, col, values, *args)


def test_block_rows_must_not_straddle_groups():
    w4 = pruned_weight(12, 4, 3, 3, 0.5, (4, 1))  # 12 / 2 groups = 6 rows per group: not a multiple of 4
    with pytest.raises(ValueError, match="multiple of the format's block rows"):
        ops.conv2d(torch.randn(1, 8, 6, 6), ConvWeight(pack4(w4, (4, 1)), (3, 3)), groups=2, padding=1)
    fmt = pack4(w4, (4, 1))
    with pytest.raises(ValueError, match="multiple of the block rows"):  # the native check, below the op
        run("", fmt, torch.randn(1, 8, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 2)


def test_forcing_unknown_unsupported_or_mismatched_kernel_is_an_error():
    w4 = pruned_weight(16, 8, 3, 3, 0.5, (4, 1))
    fmt, x = pack4(w4, (4, 1)), torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match="unknown"):
        run("f32_conv_nope", fmt, x, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="does not handle 4x1"):
        run(f"f32_conv_csr_{FAST[0]['isa']}", fmt, x, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="only 1x1"):
        run(f"f32_conv1x1_bsr4x1_{FAST[0]['isa']}", fmt, x, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    unsupported = [k for k in native().conv_kernels() if not k["supported"]]
    for k in unsupported[:1]:
        with pytest.raises(ValueError, match="which this CPU lacks"):
            run(k["name"], fmt, x, (3, 3), (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.parametrize("kind", ["csr", "bsr4x1"])
def test_opcheck(kind):
    w4 = pruned_weight(8, 6, 3, 3, 0.5, (4, 1) if kind == "bsr4x1" else (1, 1))
    fmt = pack4(w4, (4, 1) if kind == "bsr4x1" else (1, 1))
    rp, col, values, r, c = fmt.kernel_arrays()
    for x, bias, s, p, act in [(torch.randn(2, 6, 7, 9), torch.randn(8), [1, 1], [1, 1], 0),
                               (torch.randn(1, 6, 8, 8), None, [2, 1], [0, 1], 1),
                               (torch.randn(1, 6, 5, 5), None, [1, 1], [0, 0], 3)]:
        torch.library.opcheck(torch.ops.sparsert.conv2d_bsr.default,
                              (x, rp, col, values, 8, [3, 3], r, c, bias, s, p, [1, 1], 1, act, 0))


def test_torch_compile_fullgraph_and_export():
    w4 = pruned_weight(16, 8, 3, 3, 0.4, (4, 1))
    cw = ConvWeight(pack4(w4, (4, 1)), (3, 3))
    bias = torch.randn(16)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return ops.conv2d(x, cw, bias, stride=2, padding=1, activation="relu")

    x = torch.randn(2, 8, 11, 11)
    expected = reference(x, w4, bias, (2, 2), (1, 1), (1, 1), 1, 1)
    compiled = torch.compile(Layer(), fullgraph=True, backend="eager")
    assert_close(compiled(x), expected, k=72)
    program = torch.export.export(Layer(), (x,))
    assert any("sparsert.conv2d_bsr" in str(n.target) for n in program.graph.nodes)
    assert_close(program.module()(x), expected, k=72)


@pytest.mark.parametrize("activation", [0, 1, 2, 3])
def test_pure_torch_default_matches(activation):
    """The device-agnostic default (used off-CPU until a native kernel exists)."""
    w4 = pruned_weight(16, 4, 3, 3, 0.4, (4, 1))
    fmt = pack4(w4, (4, 1))
    rp, col, values, r, c = fmt.kernel_arrays()
    x, bias = torch.randn(2, 8, 9, 9), torch.randn(16)
    y = conv2d_bsr_torch(x, rp, col, values, 16, [3, 3], r, c, bias, [2, 2], [1, 1], [1, 1], 2, activation)
    assert_close(y, reference(x, w4, bias, (2, 2), (1, 1), (1, 1), 2, activation), k=36)


def test_eager_fast_path_equals_the_op():
    """conv2d skips the custom-op dispatch in plain eager CPU calls; same numbers either way."""
    from sparsert.ops.backends.cpu import eager_cpu_call as _eager_cpu
    w4 = pruned_weight(16, 8, 3, 3, 0.4, (4, 1))
    fmt = pack4(w4, (4, 1))
    rp, col, values, r, c = fmt.kernel_arrays()
    x, bias = torch.randn(2, 8, 9, 9), torch.randn(16)
    assert _eager_cpu(x, bias)
    assert not _eager_cpu(x.requires_grad_(), bias)
    with torch.no_grad():
        assert _eager_cpu(x, bias)
        fast = ops.conv2d(x, ConvWeight(fmt, (3, 3)), bias, stride=2, padding=1, activation="relu6")
    via_op = torch.ops.sparsert.conv2d_bsr.default(x.detach(), rp, col, values, 16, [3, 3], r, c, bias, [2, 2],
                                                   [1, 1], [1, 1], 1, 3, 0)
    torch.testing.assert_close(fast, via_op, rtol=0, atol=0)
    assert_close(fast, reference(x.detach(), w4, bias, (2, 2), (1, 1), (1, 1), 1, 3), k=72)
