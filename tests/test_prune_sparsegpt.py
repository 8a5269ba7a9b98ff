"""SparseGPT: OBS updates from the layer-input Hessian, lazy blocks, patterns, the Pruner."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from sparsert.prune import Pruner, parse_pattern, sparsegpt_weight
from sparsert.prune.sparsegpt import layer_error
from sparsert.prune.sequential import sequential_grams


def _correlated(rows, features, n=4, seed=0, factors=5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(factors, features, generator=torch.Generator().manual_seed(99))
    return [torch.randn(rows, factors, generator=g) @ mix + 0.1 * torch.randn(rows, features, generator=g)
            for _ in range(n)]


def _gram(xs):
    x = torch.cat(xs).double()
    return x.T @ x


def _damped(h, damp):
    return h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _reference_obs(w, h, pattern, sparsity, blocksize, damp):
    """SparseGPT written the plain way: for column q, the OBS step over the columns
    still to come uses the explicit inverse of the trailing block of H (no Cholesky,
    no lazy batching); the mask is chosen from w^2 / [H_{q:,q:}^-1]_00 at each block
    start, as in the paper."""
    w = w.double().clone()
    h = _damped(h, damp)
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    pat = parse_pattern(pattern)
    total = int(round(sparsity * rows * cols))
    done = 0
    inv_diag = torch.stack([torch.linalg.inv(h[q:, q:])[0, 0] for q in range(cols)])
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        if pat.kind != "nm":
            k = int(round(total * b1 / cols)) - done
            score = w[:, b0:b1] ** 2 / inv_diag[b0:b1]
            gs, sz = pat.group_scores(score)
            order = torch.argsort(gs.reshape(-1), stable=True)
            keep = torch.ones(gs.numel(), dtype=torch.bool)
            keep[order[torch.cumsum(sz.reshape(-1)[order], 0) <= k]] = False
            pruned[:, b0:b1] = ~pat.expand(keep.reshape(gs.shape), rows, b1 - b0)
            done += int(pruned[:, b0:b1].sum())
        for q in range(b0, b1):
            if pat.kind == "nm" and (q - b0) % pat.b == 0:
                score = w[:, q:q + pat.b] ** 2 / inv_diag[q:q + pat.b]
                low = torch.topk(score, pat.b - pat.a, dim=1, largest=False).indices
                pruned[:, q:q + pat.b].scatter_(1, low, True)
            hinv = torch.linalg.inv(h[q:, q:])
            for r in range(rows):
                if pruned[r, q]:
                    w[r, q:] -= w[r, q] / hinv[0, 0] * hinv[0, :]
                    w[r, q] = 0.0
    return w, ~pruned


@pytest.mark.parametrize("pattern,sparsity,blocksize", [
    ("unstructured", 0.5, 4), ("unstructured", 0.7, 5), ("unstructured", 0.3, 128),
    ("2:4", 0.5, 8), ("1:4", 0.0, 4), ("2x2", 0.5, 4), ("1x3", 0.5, 6),
])
def test_matches_the_plain_obs_sequence(pattern, sparsity, blocksize):
    torch.manual_seed(0)
    w = torch.randn(6, 12, dtype=torch.float64)
    h = _gram(_correlated(40, 12))
    got, keep = sparsegpt_weight(w, h, pattern, sparsity, blocksize=blocksize, damp=0.01)
    ref, ref_keep = _reference_obs(w, h, pattern, sparsity, blocksize, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    assert torch.all(got[~keep] == 0)
    assert parse_pattern(pattern).conforms(keep)


def test_first_column_removal_is_the_exact_least_squares_optimum():
    # Removing a weight of the first column lets OBS move every other weight of
    # the row: the result must be the least-squares optimum with that weight fixed at 0.
    torch.manual_seed(1)
    w = torch.randn(3, 7, dtype=torch.float64)
    h = _gram(_correlated(30, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 0] = False
    got, keep = sparsegpt_weight(w, h, "unstructured", 0.0, mask=mask, damp=0.0)
    assert torch.equal(keep, mask)
    for r in range(3):
        # minimise (w - v) H (w - v)^T over v with v_0 = 0: v_S = w_S + H_SS^-1 H_S0 w_0
        s = torch.arange(1, 7)
        v = w[r, s] + torch.linalg.solve(h[s][:, s], h[s, 0] * w[r, 0])
        torch.testing.assert_close(got[r, s], v, rtol=1e-8, atol=1e-10)


def test_single_weight_choice_is_the_brute_force_obs_optimum():
    # One weight to remove from a one-row layer whose column order puts every
    # candidate first in turn: OBS must pick the weight whose optimal removal
    # costs least, and its cost must equal the brute-force minimum.
    torch.manual_seed(2)
    d = 5
    w = torch.randn(1, d, dtype=torch.float64)
    h = _gram(_correlated(25, d, factors=3))
    best = None
    for q in range(d):
        rest = [j for j in range(d) if j != q]
        v = torch.zeros(d, dtype=torch.float64)
        v[rest] = w[0, rest] + torch.linalg.solve(h[rest][:, rest], h[rest, q] * w[0, q])
        cost = float((w[0] - v) @ h @ (w[0] - v))
        best = cost if best is None else min(best, cost)
    obs = (w[0] ** 2 / torch.linalg.inv(h).diagonal()).min()
    assert float(obs) == pytest.approx(best, rel=1e-8)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4x1", "1x4"])
def test_error_beats_wanda_and_magnitude_on_correlated_inputs(pattern):
    torch.manual_seed(3)
    layer = nn.Linear(32, 24)
    xs = _correlated(64, 32, n=6)
    h = _gram(xs)
    w = layer.weight.detach().double()
    errors = {}
    for imp in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(layer)
        p = Pruner(m, importance=imp, pattern=pattern, sparsity=0.5, scope="layer", progress=False)
        p.calibrate(xs).step()
        errors[imp] = layer_error(w, m.weight.detach().double(), h)
        assert parse_pattern(pattern).conforms(m.weight.detach() != 0)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_sparsity_is_exact_and_earlier_zeros_stay_zero():
    torch.manual_seed(4)
    w = torch.randn(10, 37, dtype=torch.float64)
    h = _gram(_correlated(50, 37))
    forced = torch.rand(10, 37) < 0.3
    got, keep = sparsegpt_weight(w, h, "unstructured", 0.6, forced=forced, blocksize=16)
    assert int((~keep).sum()) == round(0.6 * 370)
    assert not bool((keep & forced).any())
    assert torch.all(got[~keep] == 0)


def test_dead_inputs_and_rank_deficient_hessian_are_handled():
    w = torch.randn(4, 8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    x[:, 2] = 0  # an input that is always zero; only 3 samples for 8 features
    got, keep = sparsegpt_weight(w, x.T @ x, "unstructured", 0.5)
    assert torch.isfinite(got).all() and int((~keep).sum()) == 16


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, h, scale=None):
        return (h + self.out(torch.tanh(self.q(h)) * self.k(h)),)


class _Stack(nn.Module):
    def __init__(self, d=12, n=3):
        super().__init__()
        self.inp = nn.Linear(10, d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=1.0)[0]
        return self.head(h)


def test_block_path_equals_whole_model_path_and_sees_pruned_inputs():
    torch.manual_seed(5)
    model = _Stack()
    data = [torch.randn(6, 5, 10) for _ in range(3)]
    results = []
    for use_blocks in (True, False):
        m = copy.deepcopy(model)
        p = Pruner(m, importance="sparsegpt", sparsity=0.6, use_blocks=use_blocks, progress=False)
        p.calibrate(data).step()
        results.append({n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, nn.Linear)})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-5, atol=1e-6)

    # the groups come in execution order, Q and K (same input) together, and the
    # Gram matrix of a later layer is computed on the model as pruned so far
    m = copy.deepcopy(model)
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    seen = []
    for group, grams, _, _ in sequential_grams(m, layers, data, progress=False):
        seen.append(group)
        if group == ["blocks.0.q", "blocks.0.k"]:
            with torch.no_grad():
                for name in group:
                    layers[name].weight.zero_()
                    layers[name].bias.zero_()
        if group == ["blocks.0.out"]:
            torch.testing.assert_close(grams["blocks.0.out"], torch.zeros_like(grams["blocks.0.out"]))
    assert seen[:3] == [["inp"], ["blocks.0.q", "blocks.0.k"], ["blocks.0.out"]]
    assert seen[-1] == ["head"] and len(seen) == 2 + 2 * 3


def test_pruner_validates_and_runs_gradual_steps():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = _correlated(32, 16, n=3)
    with pytest.raises(ValueError, match="scope='layer'"):
        Pruner(model, importance="sparsegpt", scope="global")
    with pytest.raises(ValueError, match="calibrat"):
        Pruner(copy.deepcopy(model), importance="sparsegpt").step()
    # compute_masks() ranks by the OBS saliency and leaves the weights alone
    m = copy.deepcopy(model)
    masks = Pruner(m, importance="sparsegpt", sparsity=0.5, progress=False).calibrate(data).compute_masks()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
    assert all(mk.float().mean().item() == pytest.approx(0.5) for mk in masks.values())
    m = copy.deepcopy(model)
    p = Pruner(m, importance="sparsegpt", sparsity=0.75, schedule="iterative", progress=False).calibrate(data)
    previous = None
    while not p.done:
        p.step()
        zeros = {n: (mod.weight == 0).clone() for n, mod in p.layers.items()}
        if previous is not None:
            for n in zeros:
                assert bool((zeros[n] | ~previous[n]).all()), "a pruned weight came back"
        previous = zeros
    for mod in p.layers.values():
        assert (mod.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1e-9)


def test_sparsegpt_options_reach_the_criterion():
    model = nn.Sequential(nn.Linear(8, 8))
    p = Pruner(model, importance="sparsegpt", blocksize=32, damp=0.05)
    assert p.criterion.blocksize == 32 and p.criterion.damp == 0.05
    with pytest.raises(ValueError):
        Pruner(model, importance="sparsegpt", blocksize=0)


def test_all_small_masks_are_no_worse_than_obs_choice_on_average():
    # sanity: over every 2-of-4 mask of a 1x4 row, the OBS-chosen one is among the best
    torch.manual_seed(7)
    w = torch.randn(1, 4, dtype=torch.float64)
    h = _gram(_correlated(20, 4, factors=2))
    got, keep = sparsegpt_weight(w, h, "unstructured", 0.5, damp=0.0)
    costs = []
    for kept in itertools.combinations(range(4), 2):
        s = list(kept)
        q = [j for j in range(4) if j not in s]
        v = torch.zeros(4, dtype=torch.float64)
        v[s] = w[0, s] + torch.linalg.solve(h[s][:, s], h[s][:, q] @ w[0, q])
        costs.append(float((w[0] - v) @ h @ (w[0] - v)))
    mine = float((w[0] - got[0]) @ h @ (w[0] - got[0]))
    assert mine <= sorted(costs)[2] + 1e-9  # within the best half of the 6 masks


def test_dense_target_weight_is_the_least_squares_map_to_the_unpruned_outputs():
    from sparsert.prune.sparsegpt import dense_target_weight

    torch.manual_seed(8)
    w = torch.randn(5, 9, dtype=torch.float64)
    x_ref = torch.randn(60, 9, dtype=torch.float64)
    x = x_ref + 0.3 * torch.randn(60, 9, dtype=torch.float64)  # the drifted inputs
    got = dense_target_weight(w, x.T @ x, x.T @ x_ref, damp=0.0)
    want = torch.linalg.lstsq(x, x_ref @ w.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    same = dense_target_weight(w, x_ref.T @ x_ref, x_ref.T @ x_ref, damp=0.1)  # no drift: nothing to correct
    torch.testing.assert_close(same, w, rtol=1e-8, atol=1e-10)


def test_dense_target_tracks_the_unpruned_model_better_than_the_papers_objective():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 12))
    calib, test = _correlated(128, 24, n=6, seed=1), _correlated(128, 24, n=4, seed=2)
    errors = {}
    for target in ("dense", "pruned"):
        m = copy.deepcopy(model)
        Pruner(m, importance="sparsegpt", sparsity=0.7, target=target, progress=False).calibrate(calib).step()
        with torch.no_grad():
            errors[target] = sum(float((m(x) - model(x)).pow(2).sum()) for x in test) / sum(
                float(model(x).pow(2).sum()) for x in test)
        assert all((mod.weight == 0).float().mean().item() == pytest.approx(0.7, abs=1e-3)
                   for mod in m if isinstance(mod, nn.Linear))
    assert errors["dense"] < errors["pruned"], errors
