"""Formats: round trips, sizes, and validation of raw arrays (nothing malformed gets through)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsert import ops
from sparsert.formats import BSR, CSR, NM, pack, parse_kind


def sparse(rows, cols, density):
    return torch.randn(rows, cols) * (torch.rand(rows, cols) < density)


@pytest.mark.parametrize("block", [(1, 4), (4, 1), (8, 1), (4, 4), (16, 1), (3, 5)])
@pytest.mark.parametrize("shape", [(37, 53), (16, 16), (1, 1), (0, 5), (5, 0)])
def test_bsr_round_trip_any_shape(block, shape):
    w = sparse(*shape, 0.2)
    fmt = BSR.from_dense(w, block)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.shape == shape and fmt.block == block
    assert fmt.nnz == fmt.nblocks * block[0] * block[1]
    # rebuild from its own arrays through full validation
    again = BSR.from_arrays(fmt.row_ptr, fmt.col_indices, fmt.blocks, shape, block)
    assert torch.equal(again.to_dense(), w)


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (0, 3), (4, 0)])
def test_csr_round_trip_and_sizes(shape):
    w = sparse(*shape, 0.3)
    fmt = CSR.from_dense(w)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.nnz == int((w != 0).sum())
    assert fmt.col_indices.dtype == torch.int16
    expected_bytes = fmt.nnz * (4 + 2) + (shape[0] + 1) * 4
    assert fmt.nbytes == expected_bytes
    total = shape[0] * shape[1]
    assert fmt.density == pytest.approx(fmt.nnz / total if total else 0.0)


def test_sixteen_bit_indices_cover_the_full_uint16_range():
    w = torch.zeros(2, 65536)
    w[0, 65535] = 3.0
    w[1, 40000] = -1.0
    fmt = CSR.from_dense(w)
    assert fmt.col_indices.dtype == torch.int16
    assert torch.equal(fmt.to_dense(), w)
    x = torch.randn(3, 65536)
    torch.testing.assert_close(ops.linear(x, fmt), x @ w.t())
    again = CSR.from_arrays(fmt.row_ptr, fmt.col_indices, fmt.values, fmt.shape)  # own compact layout
    assert torch.equal(again.to_dense(), w)
    wide = torch.zeros(1, 65537)
    wide[0, 65536] = 1.0
    assert CSR.from_dense(wide).col_indices.dtype == torch.int32


@pytest.mark.filterwarnings("ignore:Sparse (CSR|BSR) tensor support is in beta state:UserWarning")
def test_torch_layouts_are_accepted_by_from_arrays():
    w = sparse(12, 20, 0.3)
    t = w.to_sparse_csr()
    fmt = CSR.from_arrays(t.crow_indices(), t.col_indices(), t.values(), w.shape)
    assert torch.equal(fmt.to_dense(), w)
    wb = torch.zeros(8, 8)
    wb[4:8, 0:2] = torch.randn(4, 2)
    tb = wb.to_sparse_bsr((4, 2))
    fmt = BSR.from_arrays(tb.crow_indices(), tb.col_indices(), tb.values(), wb.shape, (4, 2))
    assert torch.equal(fmt.to_dense(), wb)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("cols", [16, 18, 3])
def test_nm_round_trip_and_pattern_check(n, m, cols):
    w = torch.randn(9, cols)
    groups = -(-cols // m)
    padded = torch.nn.functional.pad(w, (0, groups * m - cols)).reshape(9, groups, m)
    keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, padded.abs().topk(n, -1).indices, True)
    pruned = (padded * keep).reshape(9, groups * m)[:, :cols]
    fmt = NM.from_dense(pruned, n, m)
    assert torch.equal(fmt.to_dense(), pruned)
    assert fmt.values.shape == (9, groups * n)
    assert int(fmt.col_indices.max()) < cols
    if n < m and cols >= m:
        with pytest.raises(ValueError, match=f"not {n}:{m} sparse"):
            NM.from_dense(torch.ones(9, cols), n, m)


def test_pack_and_parse_kind():
    w = sparse(8, 8, 0.5)
    assert parse_kind("bsr4x1") == ("bsr", 4, 1) and parse_kind("nm2:4") == ("nm", 2, 4)
    assert torch.equal(pack(w, "csr").to_dense(), w)
    assert pack(w, "bsr8x1").kind == "bsr8x1"
    with pytest.raises(ValueError, match="unknown format"):
        pack(w, "coo")


def _csr_arrays():
    w = torch.tensor([[1.0, 0, 2], [0, 0, 0], [0, 3, 0]])
    t = w.to_sparse_csr()
    return t.crow_indices().clone(), t.col_indices().clone(), t.values().clone(), (3, 3)


@pytest.mark.parametrize("mutate, match", [
    (lambda rp, ci, v, s: (rp[:-1], ci, v, s), "row_ptr must have 4 entries"),
    (lambda rp, ci, v, s: (rp + 1, ci, v, s), r"row_ptr\[0\] must be 0"),
    (lambda rp, ci, v, s: (torch.tensor([0, 2, 1, 3]), ci, v, s), "non-decreasing"),
    (lambda rp, ci, v, s: (torch.tensor([0, 2, 2, 2]), ci, v, s), r"row_ptr\[-1\] must equal"),
    (lambda rp, ci, v, s: (rp, torch.tensor([0, 3, 1]), v, s), r"must lie in \[0, 3\)"),
    (lambda rp, ci, v, s: (rp, torch.tensor([0, -1, 1]), v, s), r"must lie in \[0, 3\)"),
    (lambda rp, ci, v, s: (rp, ci[:2], v, s), "col_indices has 2 entries"),
    (lambda rp, ci, v, s: (rp, ci, torch.tensor([1.0, float("nan"), 2.0]), s), "NaN or infinity"),
    (lambda rp, ci, v, s: (rp, ci.float(), v, s), "integer dtype"),
    (lambda rp, ci, v, s: (rp, ci, v.long(), s), "floating dtype"),
    (lambda rp, ci, v, s: (rp.reshape(2, 2), ci, v, s), "1 dimension"),
    (lambda rp, ci, v, s: (rp[:1].expand(4), ci, v, s), r"row_ptr\[-1\] must equal"),
    (lambda rp, ci, v, s: (rp, ci, v, (3, -1)), "non-negative"),
    (lambda rp, ci, v, s: (rp, ci, v, (3,)), "two integers"),
    (lambda rp, ci, v, s: ([0, 2, 2, 3], ci, v, s), "must be a torch.Tensor"),
])
def test_csr_from_arrays_rejects_malformed_input(mutate, match):
    with pytest.raises(ValueError, match=match):
        CSR.from_arrays(*mutate(*_csr_arrays()))


def test_bsr_from_arrays_rejects_malformed_input():
    w = torch.zeros(6, 6)
    w[0:4, 0:1] = 1.0
    good = BSR.from_dense(w, (4, 1))
    rp, ci, b = good.row_ptr, good.col_indices, good.blocks
    with pytest.raises(ValueError, match=r"blocks must have shape \(nblocks, 4, 1\)"):
        BSR.from_arrays(rp, ci, b.reshape(-1, 1, 4), (6, 6), (4, 1))
    with pytest.raises(ValueError, match="must lie in"):
        BSR.from_arrays(rp, torch.full_like(ci, 6), b, (6, 6), (4, 1))
    with pytest.raises(ValueError, match="row_ptr must have 3 entries"):
        BSR.from_arrays(rp[:-1], ci, b, (6, 6), (4, 1))
    # a nonzero in the padding rows of the edge block (rows 6..7 of a 6-row matrix)
    edge = BSR.from_dense(torch.ones(6, 1), (4, 1))
    blocks = edge.blocks.clone()
    blocks[-1, -1, 0] = 5.0
    with pytest.raises(ValueError, match="outside the matrix"):
        BSR.from_arrays(edge.row_ptr, edge.col_indices, blocks, (6, 1), (4, 1))
    with pytest.raises(ValueError, match="block dimensions must be positive"):
        BSR.from_dense(w, (0, 1))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_from_arrays_never_crashes_and_never_accepts_invalid(data):
    """Random (often malformed) arrays: either a ValueError, or a format that computes x @ W.T
    exactly like its own dense reconstruction (so nothing out of bounds was accepted)."""
    rows = data.draw(st.integers(0, 6))
    cols = data.draw(st.integers(0, 6))
    nnz = data.draw(st.integers(0, 8))
    ints = st.integers(-3, 9)
    row_ptr = torch.tensor(data.draw(st.lists(ints, min_size=0, max_size=rows + 2)), dtype=torch.int64)
    col = torch.tensor(data.draw(st.lists(ints, min_size=nnz, max_size=nnz)), dtype=torch.int64)
    values = torch.randn(nnz)
    try:
        fmt = CSR.from_arrays(row_ptr, col, values, (rows, cols))
    except ValueError:
        return
    assert fmt.row_ptr.numel() == rows + 1 and int(fmt.row_ptr[-1]) == nnz
    x = torch.randn(3, cols)
    torch.testing.assert_close(ops.linear(x, fmt), x @ fmt.to_dense().t(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the registry
def test_every_registered_format_describes_itself_consistently():
    """A format registers its kind grammar, arrays and file layout; the generic code
    (pack, parse_kind, files) relies on them agreeing with what the format holds."""
    from sparsert.formats import format_class, formats, kind_name, parse_kind

    kinds = {"csr": ["csr"], "bsr": ["bsr4x1", "bsr2x3"], "nm": ["nm2:4", "nm1:8"], "bitmask": ["bitmask16"],
             "rowgroup": ["rowgroup4", "rowgroup4k8"]}
    assert set(formats()) >= set(kinds)
    g = torch.Generator().manual_seed(3)
    for family, cls in formats().items():
        for kind in kinds.get(family, []):
            parsed = parse_kind(kind.upper())
            assert parsed[0] == family and kind_name(*parsed) == kind
            assert format_class(kind) == (cls, tuple(parsed[1:]))
            w = torch.randn(9, 16, generator=g)
            if family == "nm":
                n, m = parsed[1:]
                w = w.reshape(9, -1, m)
                w = (w * (torch.rand(w.shape, generator=g).argsort(-1).argsort(-1) < n)).reshape(9, 16)
            else:
                w = w * (torch.rand(9, 16, generator=g) < 0.4)
            fmt = pack(w, kind)
            assert type(fmt) is cls and fmt.kind == kind
            assert torch.equal(fmt.to_dense(), w)
            assert list(fmt.tensors()) == list(cls.ARRAYS)
            assert all(t.dtype in cls.ARRAYS[name] for name, t in fmt.tensors().items())
            back = cls.from_saved(dict(fmt.tensors()), fmt.shape, tuple(parsed[1:]))
            assert torch.equal(back.to_dense(), w) and back.kind == kind
    with pytest.raises(ValueError, match="not a sparse format"):
        format_class("dense")
    with pytest.raises(ValueError, match="unknown format family"):
        kind_name("coo")


def test_modules_keep_derived_arrays_in_sync_without_touching_format_internals():
    """N:M's kernel row pointer is a derived array: a module stores it as a non-persistent
    buffer and hands it back through the format's public set_tensors."""
    from sparsert.nn import SparseLinear

    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]] * 3)
    layer = SparseLinear(pack(w, "nm2:4"))
    assert "packed_kernel_row_ptr" not in layer.state_dict()
    moved = layer.double()
    assert torch.equal(moved.packed.kernel_arrays()[0], layer.packed_kernel_row_ptr)
    assert torch.equal(moved.packed.to_dense(), w)
