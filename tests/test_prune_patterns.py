"""Every pattern's structure, on shapes that are and are not multiples of the block."""

import pytest
import torch
from torch import nn

from sparsert.prune import Pattern, Pruner, parse_pattern

SHAPES = [(16, 12), (18, 13), (9, 33)]  # divisible, partial edge blocks both ways, odd


def _linear(out_f, in_f, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


@pytest.mark.parametrize("text,kind,a,b", [
    ("unstructured", "block", 1, 1), ("1x1", "block", 1, 1), ("4x1", "block", 4, 1),
    ("8x1", "block", 8, 1), ("16x1", "block", 16, 1), ("4x4", "block", 4, 4),
    ("1x4", "block", 1, 4), ("2:4", "nm", 2, 4), ("1:8", "nm", 1, 8), ("channel", "channel", 1, 1),
])
def test_parse(text, kind, a, b):
    p = parse_pattern(text)
    assert (p.kind, p.a, p.b) == (kind, a, b)
    assert parse_pattern(str(p)) == p


@pytest.mark.parametrize("bad", ["4x0", "0x4", "4:4", "0:4", "5:4", "blocks", "4*1", ""])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_pattern(bad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pattern", ["4x1", "8x1", "4x4", "1x4", "2x3"])
def test_blocks_are_all_zero_or_whole(shape, pattern):
    model = _linear(*shape)
    Pruner(model, pattern=pattern, sparsity=0.6).step()
    w = model[0].weight.detach()
    r, c = parse_pattern(pattern).block_shape(*w.shape)
    rows, cols = w.shape
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            blk = w[i : i + r, j : j + c]
            nz = int((blk != 0).sum())
            assert nz in (0, blk.numel()), f"block at ({i},{j}) of {pattern} has {nz}/{blk.numel()} nonzeros"
    assert parse_pattern(pattern).conforms(w != 0)
    sparsity = (w == 0).float().mean().item()
    assert 0.45 <= sparsity <= 0.6 + 1e-6


def test_block_scores_are_member_means_including_partial_edges():
    p = parse_pattern("4x1")
    s = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)
    gs, size = p.group_scores(s)
    assert gs.shape == (2, 2)
    torch.testing.assert_close(size, torch.tensor([[4.0, 4.0], [2.0, 2.0]]))
    torch.testing.assert_close(gs, torch.tensor([[3.0, 4.0], [9.0, 10.0]]))


def test_4x1_prunes_the_lowest_mean_block():
    model = _linear(8, 2)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 9], [1, 9], [1, 9], [1, 9], [5, 2], [5, 2], [5, 2], [5, 2]]))
    Pruner(model, pattern="4x1", sparsity=0.25).step()
    w = model[0].weight.detach()
    assert torch.equal(w[:4, 0], torch.zeros(4)) and (w[:, 1] != 0).all() and (w[4:, 0] != 0).all()


@pytest.mark.parametrize("shape", [(8, 16), (5, 24)])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_nm_groups_keep_at_most_n(shape, nm):
    model = _linear(*shape)
    Pruner(model, pattern=nm, sparsity=0.0).step()
    w = model[0].weight.detach()
    n, m = parse_pattern(nm).a, parse_pattern(nm).b
    counts = (w != 0).reshape(shape[0], shape[1] // m, m).sum(-1)
    assert (counts == n).all()  # random weights: exactly N survive, at most N is the contract
    assert parse_pattern(nm).conforms(w != 0)


def test_nm_keeps_the_largest_per_group():
    model = _linear(1, 8)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -5, 3, 0.2, 1, 2, -3, 4]]))
    Pruner(model, pattern="2:4").step()
    assert torch.equal(model[0].weight.detach(), torch.tensor([[0.0, -5, 3, 0, 0, 0, -3, 4]]))


def test_channel_removes_whole_rows_and_conv_filters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.Flatten(), nn.Linear(10 * 4 * 4, 6))
    Pruner(model, pattern="channel", sparsity=0.5).step()
    conv = model[0].weight.detach().reshape(10, -1)
    lin = model[2].weight.detach()
    for w in (conv, lin):
        row_nz = (w != 0).sum(1)
        assert ((row_nz == 0) | (row_nz == w.shape[1])).all()
        assert int((row_nz == 0).sum()) == w.shape[0] // 2


def test_conv_blocks_use_flattened_view():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    Pruner(model, pattern="4x1", sparsity=0.5).step()
    w2 = model[0].weight.detach().reshape(8, 36)
    assert parse_pattern("4x1").conforms(w2 != 0)
    assert (w2 == 0).float().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("pattern,shape,msg", [
    ("2:4", (8, 10), "not a multiple"),
    ("16x1", (8, 32), "does not fit"),
    ("1x64", (8, 32), "does not fit"),
])
def test_pattern_that_cannot_fit_raises_before_modifying(pattern, shape, msg):
    model = _linear(*shape)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=msg):
        Pruner(model, pattern=pattern, sparsity=0.5)
    assert torch.equal(model[0].weight.detach(), before)


def test_conforms_detects_violations():
    m = torch.ones(4, 4, dtype=torch.bool)
    m[0, 0] = False
    assert not Pattern("block", 4, 1).conforms(m)
    assert Pattern("block", 1, 1).conforms(m)
    assert not Pattern("nm", 2, 4).conforms(m)
