"""sparsert.prune.reconstruct: fixed-mask least-squares refit of pruned layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsert.prune import Pruner, reconstruct
from sparsert.prune.reconstruct import mean_errors


def _batches(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _correlated(rows, features, n=6, seed=0, factors=6):
    """Inputs like real activations: a few shared factors plus a little noise
    (with independent features, a removed weight's share cannot be recovered)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(factors, features, generator=torch.Generator().manual_seed(99))
    return [torch.randn(rows, factors, generator=g) @ mix + 0.05 * torch.randn(rows, features, generator=g)
            for _ in range(n)]


def _output_error(model, reference, batches):
    with torch.no_grad():
        num = sum(float((model(b) - reference(b)).pow(2).sum()) for b in batches)
        den = sum(float(reference(b).pow(2).sum()) for b in batches)
    return (num / den) ** 0.5


def _half_pruned_linear(in_features, out_features, seed):
    """(reference Linear, copy with about half of its weights zeroed at random)."""
    torch.manual_seed(seed)
    reference = nn.Linear(in_features, out_features)
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model.weight[torch.rand(out_features, in_features) < 0.5] = 0
    return reference, model


def _zeros(model):
    return {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def test_refit_recovers_most_of_the_output_and_keeps_every_zero():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10))
    model = copy.deepcopy(reference)
    Pruner(model, importance="magnitude", sparsity=0.7, progress=False).step()
    zeros = _zeros(model)
    calib, test = _correlated(64, 32), _correlated(64, 32, seed=1)
    before = _output_error(model, reference, test)
    errors = reconstruct(model, reference, calib, progress=False)
    after = _output_error(model, reference, test)
    assert set(errors) == {"0", "2", "4"}
    for name, (e0, e1) in errors.items():
        assert e1 < e0, name
    assert after < 0.5 * before  # on held-out inputs too (measured: 0.83 -> 0.32)
    for name, z in _zeros(model).items():
        assert torch.equal(z, zeros[name]), f"{name}: the sparsity pattern changed"


def test_one_layer_matches_the_per_row_least_squares_solution():
    reference, model = _half_pruned_linear(12, 5, seed=1)
    kept = model.weight != 0
    batches = _batches((40, 12), n=3)
    reconstruct(model, reference, batches, damp=0.0, progress=False)
    x = torch.cat(batches).double()
    y = x @ reference.weight.double().T + reference.bias.double()
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    for r in range(5):
        cols = kept[r].nonzero().flatten()
        sol = torch.linalg.lstsq(torch.cat([x[:, cols], ones], 1), y[:, r:r + 1]).solution.flatten()
        torch.testing.assert_close(model.weight[r, cols].double(), sol[:-1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.bias[r].double(), sol[-1], rtol=1e-4, atol=1e-5)
        assert bool((model.weight[r, ~kept[r]] == 0).all())


def test_convolutions_with_stride_padding_and_no_bias():
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                              nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 8, (3, 1), padding=(1, 0), dilation=1))
    model = copy.deepcopy(reference)
    Pruner(model, importance="magnitude", sparsity=0.6, progress=False).step()
    zeros = _zeros(model)
    calib, test = _batches((4, 3, 15, 13)), _batches((4, 3, 15, 13), seed=3)
    before = _output_error(model, reference, test)
    errors = reconstruct(model, reference, calib, rows_per_batch=512, progress=False)
    assert all(e[1] <= e[0] for e in errors.values())
    assert _output_error(model, reference, test) < before
    assert model[0].bias is None
    for name, z in _zeros(model).items():
        assert torch.equal(z, zeros[name])


def test_an_unpruned_model_stays_as_it_is():
    torch.manual_seed(3)
    reference = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        reference[0].weight[:, :3] = 0  # sparse in the reference itself: nothing to recover
    model = copy.deepcopy(reference)
    errors = reconstruct(model, reference, _batches((32, 8)), progress=False)
    assert list(errors) == ["0"]
    assert errors["0"][0] < 1e-6
    torch.testing.assert_close(model[0].weight, reference[0].weight, rtol=1e-4, atol=1e-5)


def test_unsupported_layers_are_reported_and_left_alone():
    torch.manual_seed(4)
    reference = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = copy.deepcopy(reference)
    Pruner(model, importance="magnitude", sparsity=0.5, progress=False).step()
    grouped = model[0].weight.clone()
    errors = reconstruct(model, reference, _batches((2, 4, 6, 6)), progress=False)
    assert errors["0"] is None
    assert torch.equal(model[0].weight, grouped)
    assert errors["2"] is not None
    assert mean_errors(errors) == (1, *errors["2"])  # the unsupported layer is not averaged in
    assert mean_errors({"0": None}) == (0, 0.0, 0.0)


def test_bad_arguments():
    a, b = nn.Linear(4, 3), nn.Linear(5, 3)
    with torch.no_grad():
        a.weight[0, 0] = 0
    with pytest.raises(ValueError, match="at least one calibration batch"):
        reconstruct(a, copy.deepcopy(a), [])
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruct(nn.Sequential(a), nn.Sequential(b), _batches((2, 4)))
    with pytest.raises(ValueError, match="not in both models"):
        reconstruct(nn.Sequential(a), nn.Sequential(copy.deepcopy(a)), _batches((2, 4)), include=["nope"])


def test_damping_pulls_toward_the_pruned_weights_not_toward_zero():
    reference, model = _half_pruned_linear(16, 6, seed=5)
    pruned = model.weight.detach().clone()
    reconstruct(model, reference, _correlated(30, 16, n=2), damp=1e6, progress=False)
    torch.testing.assert_close(model.weight, pruned, rtol=1e-3, atol=1e-4)
    loose = copy.deepcopy(model)
    reconstruct(loose, reference, _correlated(30, 16, n=2), damp=0.0, progress=False)
    assert (loose.weight - pruned).abs().max() > 1e-2  # an undamped fit does move them
