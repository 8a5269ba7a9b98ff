"""The rowgroup4 format and every row-group kernel in the registry, against torch in float64."""

from __future__ import annotations

import pytest
import torch

from sparsert import nn as snn
from sparsert import ops
from sparsert._ext import native
from sparsert.formats import pack
from sparsert.formats.rowgroup import GROUP_ROWS, KBLOCK, PATTERNS, RowGroup, pattern_counts, segment_multiples
from sparsert.ops import epilogue
from sparsert.ops.backends.cpu import linear_rowgroup_cpu, rowgroup_kernels
from sparsert.ops.schema import linear_rowgroup_torch

from kernel_util import assert_close, expected, random_weight

KERNELS = [k["name"] for k in rowgroup_kernels()]
RUNNABLE = [k["name"] for k in rowgroup_kernels() if k["supported"]]


def linear_rowgroup(x, fmt, bias=None, activation=None, *, kernel="", num_threads=0):
    """The CPU kernel of sparsert::linear_rowgroup, with a forced registry kernel."""
    seg_ptr, columns, values, _, _ = fmt.kernel_arrays()
    return linear_rowgroup_cpu(x, seg_ptr, columns, values, fmt.shape[0], bias, epilogue.code_of(activation),
                               num_threads, kernel)



# -- the format ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 16), (5, 17), (7, 33), (13, 100), (0, 5), (4, 0), (9, 1)])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_round_trip(shape, density):
    gen = torch.Generator().manual_seed(1)
    w = random_weight(*shape, density, gen)
    fmt = pack(w, "rowgroup4")
    assert isinstance(fmt, RowGroup) and fmt.kind == "rowgroup4"
    assert torch.equal(fmt.to_dense(), w)
    groups = -(-shape[0] // GROUP_ROWS)
    assert fmt.seg_ptr.numel() == groups * PATTERNS + 1 and fmt.kblocks == 1  # "rowgroup4": one column block
    counts = (fmt.seg_ptr[1:] - fmt.seg_ptr[:-1]).reshape(-1, PATTERNS)
    assert bool((counts % segment_multiples() == 0).all())
    # every nonzero stored once, plus the segments' zero padding
    assert int((fmt.values != 0).sum()) == int((w != 0).sum())
    again = RowGroup.from_arrays(fmt.seg_ptr, fmt.columns, fmt.values, fmt.shape)
    assert torch.equal(again.to_dense(), w)


@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (9, 100), (13, 257), (0, 5), (4, 0)])
@pytest.mark.parametrize("kblock", [0, 1, 7, 64])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_column_blocks(shape, kblock, density):
    # kblocks equal blocks of <= kblock columns, K-block major; each block's segments hold only its columns
    w = random_weight(*shape, density, torch.Generator().manual_seed(11))
    fmt = RowGroup.from_dense(w, kblock=kblock)
    rows, cols = shape
    groups = -(-rows // GROUP_ROWS)
    kblocks = max(1, -(-cols // kblock)) if kblock else 1
    width = -(-cols // kblocks) if cols else 1
    assert fmt.seg_ptr.numel() == kblocks * groups * PATTERNS + 1
    assert torch.equal(fmt.to_dense(), w)
    counts = (fmt.seg_ptr[1:] - fmt.seg_ptr[:-1]).to(torch.int64)
    assert bool((counts.reshape(-1, PATTERNS) % segment_multiples() == 0).all())
    block_of_entry = torch.repeat_interleave(torch.arange(counts.numel()), counts) // (groups * PATTERNS)
    assert torch.equal(fmt.columns.long() // width, block_of_entry)
    values_per_block = (counts.reshape(kblocks, -1, PATTERNS) * pattern_counts()).sum((1, 2))
    nonzeros_per_block = [int((w[:, k * width:(k + 1) * width] != 0).sum()) for k in range(kblocks)]
    assert all(int(v) >= n for v, n in zip(values_per_block, nonzeros_per_block))
    again = RowGroup.from_arrays(fmt.seg_ptr, fmt.columns, fmt.values, fmt.shape)
    assert torch.equal(again.to_dense(), w)


def test_blocked_kind_names_and_files(tmp_path):
    import sparsert
    from sparsert.formats import format_class, parse_kind

    assert parse_kind("rowgroup4") == ("rowgroup",) and parse_kind("RowGroup4k384") == ("rowgroup", 384)
    for bad in ("rowgroup4k0", "rowgroup4k", "rowgroup4k-3", "rowgroup8"):
        with pytest.raises(ValueError, match="unknown format"):
            parse_kind(bad)
    w = random_weight(10, 50, 0.5, torch.Generator().manual_seed(15))
    fmt = pack(w, "rowgroup4k16")
    assert fmt.kind == "rowgroup4k16" and fmt.kblock == 16 and fmt.kblocks == 4
    assert fmt.to("cpu").kind == "rowgroup4k16"
    cls, params = format_class("rowgroup4k16")
    arrays = dict(fmt.tensors())
    assert torch.equal(cls.from_saved(arrays, fmt.shape, params).to_dense(), w)
    # arrays whose number of column blocks disagrees with the kind are refused
    with pytest.raises(ValueError, match="column block"):
        cls.from_saved(arrays, fmt.shape, ())
    with pytest.raises(ValueError, match="column block"):
        cls.from_saved(dict(pack(w, "rowgroup4").tensors()), fmt.shape, params)
    # through a model file
    model = torch.nn.Sequential(torch.nn.Linear(50, 10))
    with torch.no_grad():
        model[0].weight.copy_(w)
    x = torch.randn(33, 50)
    sparse = sparsert.sparsify(model, format="rowgroup4k16")
    assert sparse[0].packed.kind == "rowgroup4k16"
    path = tmp_path / "k.sparsert"
    sparsert.save(sparse, path)
    loaded = sparsert.load(path, torch.nn.Sequential(torch.nn.Linear(50, 10)))
    assert loaded[0].packed.kind == "rowgroup4k16" and loaded[0].packed.kblocks == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_auto_times_the_blocked_layout_only_where_it_differs():
    from sparsert.convert.plan import candidate_formats

    gen = torch.Generator().manual_seed(16)
    wide = random_weight(8, KBLOCK + 1, 0.5, gen)
    narrow = random_weight(8, KBLOCK, 0.5, gen)
    assert {"rowgroup4", f"rowgroup4k{KBLOCK}"} <= set(candidate_formats(wide))
    assert "rowgroup4" in candidate_formats(narrow) and f"rowgroup4k{KBLOCK}" not in candidate_formats(narrow)


def test_rejects_negative_kblock():
    with pytest.raises(ValueError, match="kblock"):
        RowGroup.from_dense(torch.ones(4, 4), kblock=-1)


def test_columns_sorted_by_pattern():
    # rows 0 and 2 share column 1; row 3 alone has column 0: segments pattern 5 and 8
    w = torch.zeros(4, 3)
    w[0, 1], w[2, 1], w[3, 0] = 1.0, 2.0, 3.0
    fmt = RowGroup.from_dense(w)
    counts = (fmt.seg_ptr[1:] - fmt.seg_ptr[:-1]).tolist()
    assert [p + 1 for p, n in enumerate(counts) if n] == [5, 8]
    assert fmt.columns.tolist()[:1] == [1] and fmt.values.tolist()[:2] == [1.0, 2.0]


def good_arrays():
    w = random_weight(6, 10, 0.5, torch.Generator().manual_seed(2))
    fmt = RowGroup.from_dense(w)
    return fmt.seg_ptr.clone(), fmt.columns.clone(), fmt.values.clone()


@pytest.mark.parametrize("breakage, message", [
    (lambda s, c, v: (s[:-1], c, v), "entries"),
    (lambda s, c, v: (s.flip(0), c, v), "start at 0"),
    (lambda s, c, v: (s, c.index_fill(0, torch.tensor([0]), 10), v), r"\[0, 10\)"),
    (lambda s, c, v: (s, c.index_fill(0, torch.tensor([0]), -1), v), r"\[0, 10\)"),
    (lambda s, c, v: (s, c, v[:-1]), "values must hold"),
])
def test_from_arrays_rejects(breakage, message):
    s, c, v = breakage(*good_arrays())
    with pytest.raises(ValueError, match=message):
        RowGroup.from_arrays(s, c, v, (6, 10))


def test_rejects_decreasing_segments():
    seg = torch.zeros(PATTERNS + 1, dtype=torch.int32)
    seg[1], seg[2:] = 2, 1  # segment 1 would end before it starts
    with pytest.raises(ValueError, match="non-decreasing"):
        RowGroup.from_arrays(seg, torch.tensor([0], dtype=torch.int32), torch.ones(2), (4, 10))


def test_rejects_rows_past_the_end():
    # 6 rows: the second group has rows 4, 5 only; pattern 4 (its third row, row 6) is rejected
    seg = torch.zeros(2 * PATTERNS + 1, dtype=torch.int32)
    seg[PATTERNS + 4:] = 1  # segment PATTERNS + 3 = group 1, pattern 4
    with pytest.raises(ValueError, match="past the last row"):
        RowGroup.from_arrays(seg, torch.tensor([0], dtype=torch.int32), torch.ones(1), (6, 10))


def test_rejects_rows_past_the_end_in_a_later_column_block():
    # 2 column blocks of 2 groups (6 rows): block 1, group 1, pattern 4 is row 6
    seg = torch.zeros(2 * 2 * PATTERNS + 1, dtype=torch.int32)
    seg[3 * PATTERNS + 4:] = 1
    with pytest.raises(ValueError, match="past the last row"):
        RowGroup.from_arrays(seg, torch.tensor([0], dtype=torch.int32), torch.ones(1), (6, 10))
    seg = torch.zeros(2 * 2 * PATTERNS + 1, dtype=torch.int32)
    seg[2 * PATTERNS + 4:] = 1  # block 1, group 0, pattern 4: row 2, fine
    RowGroup.from_arrays(seg, torch.tensor([0], dtype=torch.int32), torch.ones(1), (6, 10))


@pytest.mark.parametrize("length", [2 * PATTERNS, 2 * PATTERNS + 2, 3 * PATTERNS + 1, 1])
def test_rejects_seg_ptr_not_whole_column_blocks(length):
    seg = torch.zeros(length, dtype=torch.int32)
    with pytest.raises(ValueError, match="entries"):
        RowGroup.from_arrays(seg, torch.zeros(0, dtype=torch.int32), torch.zeros(0), (8, 10))


# -- the kernels --------------------------------------------------------------

def test_registry_has_a_reference_and_portable_kernels():
    kinds = {(k["isa"], k["kind"]) for k in rowgroup_kernels()}
    assert {("reference", "reference"), ("scalar", "spmv"), ("scalar", "spmm")} <= kinds
    # one token runs per token, many in panels
    assert "spmv" in native().select_rowgroup_kernel(1) and "spmm" in native().select_rowgroup_kernel(16)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (7, 33), (33, 70), (130, 257)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 32, 40, 64])  # 32, 64: only full panels
def test_kernel_matches_torch(kernel, shape, density, tokens):
    if kernel not in RUNNABLE:
        pytest.skip(f"{kernel} needs an ISA this CPU lacks")
    gen = torch.Generator().manual_seed(hash((shape, density, tokens)) % 2**31)
    w = random_weight(*shape, density, gen)
    w[shape[0] // 2] = 0.0  # an empty row
    fmt = RowGroup.from_dense(w)
    x = torch.randn(tokens, shape[1], generator=gen)
    bias = torch.randn(shape[0], generator=gen)
    for b, act in ((None, None), (bias, "relu")):
        y = linear_rowgroup(x, fmt, b, act, kernel=kernel)
        assert_close(y, expected(x, w, b, act), f"{kernel} {shape} density {density} tokens {tokens}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_threads_and_many_panels(kernel, threads):
    if kernel not in RUNNABLE:
        pytest.skip(f"{kernel} needs an ISA this CPU lacks")
    gen = torch.Generator().manual_seed(3)
    w = random_weight(203, 1500, 0.3, gen)  # wide: more than one chunk of panels at 129 tokens
    fmt = RowGroup.from_dense(w)
    x = torch.randn(129, 1500, generator=gen)
    bias = torch.randn(203, generator=gen)
    y = linear_rowgroup(x, fmt, bias, kernel=kernel, num_threads=threads)
    assert_close(y, expected(x, w, bias, None), f"{kernel} {threads} threads")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(5, 17), (33, 70), (130, 257)])
@pytest.mark.parametrize("kblock", [7, 16])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_kernel_column_blocks_match_torch(kernel, shape, kblock, density):
    # K not a multiple of the block, rows not a multiple of 4, an empty group, tokens
    # not a multiple of the panel, bias and relu
    if kernel not in RUNNABLE:
        pytest.skip(f"{kernel} needs an ISA this CPU lacks")
    gen = torch.Generator().manual_seed(hash((shape, kblock, density)) % 2**31)
    w = random_weight(*shape, density, gen)
    w[:4] = 0.0  # an empty group
    fmt = RowGroup.from_dense(w, kblock=kblock)
    assert fmt.seg_ptr.numel() > -(-shape[0] // GROUP_ROWS) * PATTERNS + 1  # really blocked
    bias = torch.randn(shape[0], generator=gen)
    for tokens in (1, 2, 3, 17, 40):
        x = torch.randn(tokens, shape[1], generator=gen)
        for b, act in ((None, None), (bias, "relu")):
            y = linear_rowgroup(x, fmt, b, act, kernel=kernel)
            assert_close(y, expected(x, w, b, act), f"{kernel} {shape} kblock {kblock} tokens {tokens}")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kblock", [0, 100])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_column_blocks_threads(kernel, kblock, threads):
    if kernel not in RUNNABLE:
        pytest.skip(f"{kernel} needs an ISA this CPU lacks")
    gen = torch.Generator().manual_seed(12)
    w = random_weight(70, 1100, 0.4, gen)
    fmt = RowGroup.from_dense(w, kblock=kblock)
    x = torch.randn(77, 1100, generator=gen)
    bias = torch.randn(70, generator=gen)
    y = linear_rowgroup(x, fmt, bias, "relu", kernel=kernel, num_threads=threads)
    assert_close(y, expected(x, w, bias, "relu"), f"{kernel} kblock {kblock} {threads} threads")


def test_kernels_do_not_assume_which_columns_a_block_holds():
    # a K-block's segments may list any columns (the blocking is only for speed):
    # move every entry's column to another K-block's range and compare with torch
    gen = torch.Generator().manual_seed(13)
    w = random_weight(9, 40, 0.5, gen)
    fmt = RowGroup.from_dense(w, kblock=10)
    columns = (fmt.columns + 17) % 40
    moved = RowGroup.from_arrays(fmt.seg_ptr, columns, fmt.values, fmt.shape)
    dense = moved.to_dense()
    assert not torch.equal(dense, w)
    x = torch.randn(33, 40, generator=gen)
    for kernel in RUNNABLE:
        assert_close(linear_rowgroup(x, moved, kernel=kernel), expected(x, dense, None, None), kernel)


def test_unblocked_arrays_of_older_files_still_run():
    # files saved before column blocks: one block, every segment padded to 4 columns
    gen = torch.Generator().manual_seed(14)
    w = random_weight(11, 300, 0.5, gen)
    rows, cols = w.shape
    entries = []  # (segment, column, values of the pattern's rows)
    for g in range(-(-rows // GROUP_ROWS)):
        block = w[g * GROUP_ROWS:(g + 1) * GROUP_ROWS]
        for col in range(cols):
            pattern = sum(1 << r for r in range(block.shape[0]) if block[r, col] != 0)
            if pattern:
                entries.append((g * PATTERNS + pattern - 1, col,
                                [float(block[r, col]) for r in range(GROUP_ROWS) if pattern >> r & 1]))
    seg_ptr, columns, values = [0], [], []
    for s in range(-(-rows // GROUP_ROWS) * PATTERNS):
        mine = [e for e in entries if e[0] == s]
        while len(mine) % 4:
            mine.append((s, mine[-1][1], [0.0] * len(mine[-1][2])))
        for _, col, vals in mine:
            columns.append(col)
            values.extend(vals)
        seg_ptr.append(len(columns))
    old = RowGroup.from_arrays(torch.tensor(seg_ptr, dtype=torch.int32), torch.tensor(columns, dtype=torch.int32),
                               torch.tensor(values), (rows, cols))
    assert torch.equal(old.to_dense(), w)
    x = torch.randn(50, cols, generator=gen)
    for kernel in RUNNABLE:
        assert_close(linear_rowgroup(x, old, kernel=kernel), expected(x, w, None, None), kernel)
    assert_close(ops.linear(x, old), expected(x, w, None, None), "ops.linear")


def test_strided_tokens_and_dtypes():
    gen = torch.Generator().manual_seed(4)
    w = random_weight(12, 40, 0.5, gen)
    fmt = RowGroup.from_dense(w)
    x = torch.randn(2, 9, 80, generator=gen)[..., ::2]  # rows 80 floats apart, column stride 2
    assert_close(ops.linear(x, fmt).reshape(-1, 12), expected(x.reshape(-1, 40), w, None, None), "strided")
    y = ops.linear(x.double(), fmt)
    assert y.dtype == torch.float64
    assert_close(y.reshape(-1, 12), expected(x.reshape(-1, 40), w, None, None), "float64 input")


def test_duplicate_columns_add_up():
    # from_arrays accepts a column twice in a group (the padding does that): the kernels add both
    seg = torch.zeros(PATTERNS + 1, dtype=torch.int32)
    seg[1:] = 2  # pattern 1 (row 0): columns 3 and 3
    fmt = RowGroup.from_arrays(seg, torch.tensor([3, 3], dtype=torch.int32), torch.tensor([1.0, 2.0]), (1, 5))
    x = torch.randn(17, 5)
    for kernel in RUNNABLE:
        assert_close(linear_rowgroup(x, fmt, kernel=kernel), 3.0 * x[:, 3:4].double(), kernel)
    assert fmt.to_dense()[0, 3] == 3.0


def test_op_default_and_module():
    gen = torch.Generator().manual_seed(5)
    w = random_weight(10, 30, 0.5, gen)
    fmt = RowGroup.from_dense(w)
    x = torch.randn(4, 30, generator=gen)
    bias = torch.randn(10, generator=gen)
    seg_ptr, columns, values, _, _ = fmt.kernel_arrays()
    assert_close(linear_rowgroup_torch(x, seg_ptr, columns, values, 10, bias, 0), expected(x, w, bias, None),
                 "pure torch")
    torch.library.opcheck(torch.ops.sparsert.linear_rowgroup.default, (x, seg_ptr, columns, values, 10, bias, 0, 0))
    layer = torch.nn.Linear(30, 10)
    with torch.no_grad():
        layer.weight.copy_(w)
    sparse = snn.SparseLinear.from_dense(layer, "rowgroup4")
    assert_close(sparse(x), expected(x, w, layer.bias.detach(), None), "SparseLinear")


@pytest.mark.parametrize("tokens", [16, 32])
def test_one_panel_product_over_weights_past_the_cache(tokens):
    """Weights of ~25 MB (past half of a 32 MB L3) at one token panel take the kernels'
    prefetching variant (spmm_panels' `stream`): the same answer as the reference."""
    gen = torch.Generator().manual_seed(11)
    w = random_weight(4096, 2048, 0.5, gen)
    fmt = RowGroup.from_dense(w)
    x = torch.randn(tokens, 2048, generator=gen)
    assert_close(linear_rowgroup_cpu(x, fmt.seg_ptr, fmt.columns, fmt.values, 4096, None, 0, 2),
                 expected(x, w, None, None), f"{tokens} tokens")


def test_kernel_rejects_malformed_arrays():
    gen = torch.Generator().manual_seed(6)
    fmt = RowGroup.from_dense(random_weight(8, 20, 0.5, gen))
    x = torch.randn(3, 20)
    bad_columns = fmt.columns.clone()
    bad_columns[0] = 20
    with pytest.raises(ValueError):
        linear_rowgroup_cpu(x, fmt.seg_ptr, bad_columns, fmt.values, 8, None, 0, 1)
    with pytest.raises(ValueError):
        linear_rowgroup_cpu(x, fmt.seg_ptr.long(), fmt.columns, fmt.values, 8, None, 0, 1)
    with pytest.raises(ValueError):
        linear_rowgroup_cpu(x, fmt.seg_ptr, fmt.columns, fmt.values[:-1].clone(), 8, None, 0, 1)


def test_binding_checks_value_offsets_ends_and_checks_in_full_without_them():
    """The raw binding trusts the contents of the value offsets the validation derived (an
    O(segments) pass per call is what they save) but checks their length and ends; called
    without them it walks seg_ptr itself."""
    from sparsert.formats.rowgroup import value_offsets

    gen = torch.Generator().manual_seed(8)
    w = random_weight(10, 50, 0.5, gen)
    fmt = RowGroup.from_dense(w, kblock=16)  # 4 column blocks of 3 groups
    seg, col, val = fmt.seg_ptr, fmt.columns, fmt.values
    offsets = value_offsets(seg, 10)
    assert offsets.numel() == fmt.kblocks * 3 + 1 and int(offsets[-1]) == val.numel()
    x = torch.randn(5, 50, generator=gen)

    def call(seg_ptr, off, off_len):
        y = torch.empty(5, 10)
        native().spmm_rowgroup(10, 50, seg_ptr.data_ptr(), seg_ptr.numel(), col.data_ptr(), col.numel(),
                               val.data_ptr(), val.numel(), off, off_len, x.data_ptr(), 5, 50, y.data_ptr(), 10,
                               0, 0, 1, "")
        return y

    with_offsets = call(seg, offsets.data_ptr(), offsets.numel())
    assert_close(with_offsets, expected(x, w, None, None), "with offsets")
    assert torch.equal(call(seg, 0, 0), with_offsets)
    short = offsets[:-1].clone()
    with pytest.raises(ValueError, match="value_offsets"):
        call(seg, short.data_ptr(), short.numel())
    wrong_end = offsets.clone()
    wrong_end[-1] += 1
    with pytest.raises(ValueError, match="value_offsets"):
        call(seg, wrong_end.data_ptr(), wrong_end.numel())
    decreasing = seg.clone()
    decreasing[1], decreasing[2] = seg[2] + 1, seg[1]
    with pytest.raises(ValueError, match="non-decreasing"):
        call(decreasing, 0, 0)


def test_index_writes_behind_the_validation_do_not_reach_the_kernel():
    # like the other formats: the kernel reads private, validated copies of seg_ptr and columns
    gen = torch.Generator().manual_seed(7)
    w = random_weight(9, 40, 0.5, gen)
    fmt = RowGroup.from_dense(w)
    x = torch.randn(20, 40, generator=gen)
    y = ops.linear(x, fmt)
    fmt.columns.data.fill_(10**6)
    fmt.seg_ptr.data[1] = 10**6
    assert torch.equal(ops.linear(x, fmt), y)
    fresh = RowGroup(fmt.seg_ptr.clone(), fmt.columns.clone(), fmt.values, fmt.shape)
    with pytest.raises(ValueError):
        ops.linear(x, fresh)


def test_sparsify_save_and_load(tmp_path):
    import sparsert

    gen = torch.Generator().manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=gen) > 0.5)
    x = torch.randn(20, 40, generator=gen)
    with torch.no_grad():
        ref = model(x)
    sparse = sparsert.sparsify(model, format="rowgroup4")
    assert sparse[0].packed.kind == "rowgroup4"
    path = tmp_path / "m.sparsert"
    sparsert.save(sparse, path)
    skeleton = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    loaded = sparsert.load(path, skeleton)
    assert loaded[0].packed.kind == "rowgroup4"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-5)
