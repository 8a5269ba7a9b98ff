"""Pruner: scopes, bounds, overrides, exclude, validation and schedules."""

import copy

import pytest
import torch
from torch import nn

from sparsert.prune import Gradual, Iterative, OneShot, Pruner, get_mask, prune


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _sparsity(module):
    return (module.weight.detach() == 0).float().mean().item()


def test_layer_scope_hits_target_in_every_layer():
    m = _mlp()
    res = Pruner(m, sparsity=0.75).step()
    for name in ("0", "2", "4"):
        assert _sparsity(m[int(name)]) == pytest.approx(0.75)
        assert res[name] == pytest.approx(0.75)


def test_row_scope_hits_target_in_every_row():
    m = _mlp()
    Pruner(m, sparsity=0.5, scope="row").step()
    w = m[0].weight.detach()
    assert ((w == 0).sum(1) == 8).all()


def test_global_scope_ranks_across_layers():
    m = _mlp()
    with torch.no_grad():
        m[0].weight.mul_(100.0)  # layer 0 is far more important by magnitude
    orig = {i: m[i].weight.detach().abs().clone() for i in (0, 2, 4)}
    Pruner(m, sparsity=0.5, scope="global").step()
    total = sum(m[i].weight.numel() for i in (0, 2, 4))
    zeros = sum(int((m[i].weight == 0).sum()) for i in (0, 2, 4))
    assert zeros == round(0.5 * total)
    assert _sparsity(m[0]) < 0.01 and _sparsity(m[2]) > 0.7
    # one threshold shared by all layers: every pruned weight <= every kept one
    pruned = torch.cat([orig[i][m[i].weight == 0] for i in (0, 2, 4)])
    kept = torch.cat([orig[i][m[i].weight != 0] for i in (0, 2, 4)])
    assert pruned.max() <= kept.min()


def test_global_min_max_density():
    m = _mlp()
    with torch.no_grad():
        m[0].weight.mul_(100.0)
        m[4].weight.mul_(0.01)
    Pruner(m, sparsity=0.5, scope="global", min_density=0.2, max_density=0.8).step()
    for i in (0, 2, 4):
        d = 1 - _sparsity(m[i])
        assert 0.2 - 1e-6 <= d <= 0.8 + 1e-6, (i, d)
    assert 1 - _sparsity(m[0]) == pytest.approx(0.8, abs=1 / 512)
    assert 1 - _sparsity(m[4]) == pytest.approx(0.2, abs=1 / 128)
    total = sum(m[i].weight.numel() for i in (0, 2, 4))
    zeros = sum(int((m[i].weight == 0).sum()) for i in (0, 2, 4))
    assert zeros == round(0.5 * total)


def test_global_bounds_infeasible_raise_before_modifying():
    m = _mlp()
    before = copy.deepcopy(m.state_dict())
    p = Pruner(m, sparsity=0.9, scope="global", min_density=0.5)
    with pytest.raises(ValueError, match="cannot be reached"):
        p.step()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert get_mask(m[0]) is None


def test_exclude_by_name_and_prefix_and_regex():
    m = nn.Sequential()
    m.add_module("encoder", _mlp())
    m.add_module("classifier", nn.Linear(4, 2))
    p = Pruner(m, sparsity=0.5, exclude=["classifier", r"encoder\.2"])
    assert set(p.layers) == {"encoder.0", "encoder.4"}
    p.step()
    assert _sparsity(m.classifier) == 0 and _sparsity(m.encoder[2]) == 0
    assert _sparsity(m.encoder[0]) == pytest.approx(0.5)
    assert set(Pruner(_mlp(), include=["2"]).layers) == {"2"}


def test_overrides_by_name_and_regex():
    m = _mlp()
    p = Pruner(
        m, sparsity=0.5, scope="global",
        overrides={"0": {"sparsity": 0.25}, r"[24]": {"pattern": "2:4"}},
    )
    p.step()
    assert _sparsity(m[0]) == pytest.approx(0.25)
    for i in (2, 4):
        w = m[i].weight.detach()
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    p2 = Pruner(_mlp(), overrides={"4": {"exclude": True}})
    assert "4" not in p2.layers
    with pytest.raises(ValueError, match="unknown keys"):
        Pruner(_mlp(), overrides={"4": {"sparsty": 0.1}})


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(importance="nope"), ValueError, "unknown importance"),
    (dict(sparsity=1.0), ValueError, r"\[0, 1\)"),
    (dict(sparsity=-0.1), ValueError, r"\[0, 1\)"),
    (dict(sparsity="0.5"), TypeError, "number"),
    (dict(pattern="3:2"), ValueError, "N:M"),
    (dict(pattern="64x1"), ValueError, "does not fit"),
    (dict(scope="everything"), ValueError, "scope"),
    (dict(schedule="sometimes"), ValueError, "schedule"),
    (dict(exclude=["0", "2", "4"]), ValueError, "no prunable layers"),
    (dict(min_density=0.9, max_density=0.1), ValueError, "min_density"),
    (dict(overrides={"2": {"sparsity": 1.5}}), ValueError, "override"),
])
def test_bad_arguments_raise_before_anything_changes(kwargs, exc, msg):
    m = _mlp()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(exc, match=msg):
        Pruner(m, **kwargs)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_data_criterion_without_calibration_raises_before_modifying():
    m = _mlp()
    before = m[0].weight.detach().clone()
    p = Pruner(m, importance="taylor", sparsity=0.5)
    with pytest.raises(ValueError, match="calibrate"):
        p.step()
    assert torch.equal(m[0].weight.detach(), before) and get_mask(m[0]) is None


def test_prune_one_call_with_data():
    m = _mlp()
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    out = prune(m, "taylor", "4x1", 0.75, data=[(x, y)], exclude=["4"])
    assert out is m
    assert _sparsity(m[0]) == pytest.approx(0.75) and _sparsity(m[4]) == 0


def test_calibrate_materialises_iterators():
    m = _mlp()
    x = torch.randn(8, 16)
    p = Pruner(m, importance="wanda", sparsity=0.5, schedule=Iterative(2))
    p.calibrate(iter([x, x]))  # a one-shot iterator must survive two steps
    p.step()
    p.step()
    assert _sparsity(m[0]) == pytest.approx(0.5)


def test_oneshot_schedule():
    m = _mlp()
    p = Pruner(m, sparsity=0.8, schedule=OneShot())
    assert p.step() is not None and p.done
    assert p.step() is None  # nothing more to do
    assert _sparsity(m[2]) == round(0.8 * 1024) / 1024


def test_iterative_schedule_rounds_and_monotone_masks():
    m = _mlp()
    p = Pruner(m, sparsity=0.875, schedule=Iterative(rounds=3))
    seen, prev = [], None
    while not p.done:
        p.step()
        mask = get_mask(m[2]).clone()
        if prev is not None:
            assert not (mask & ~prev).any()  # once pruned, always pruned
        prev = mask
        seen.append(_sparsity(m[2]))
    assert seen == pytest.approx([0.5, 0.75, 0.875])


def test_gradual_cubic_schedule_zhu_gupta():
    sched = Gradual(begin_step=10, end_step=50, frequency=10, initial_sparsity=0.1)
    s_f = 0.9
    for t in range(0, 60):
        s = sched.sparsity_at(t, s_f)
        if t < 10 or t > 50 or (t - 10) % 10:
            assert s is None
        else:
            expected = s_f + (0.1 - s_f) * (1 - (t - 10) / 40) ** 3
            assert s == pytest.approx(expected)
    assert sched.sparsity_at(50, s_f) == pytest.approx(s_f)
    assert sched.sparsity_at(10, s_f) == pytest.approx(0.1)


def test_gradual_pruner_reaches_target_and_follows_curve():
    m = _mlp()
    sched = Gradual(begin_step=0, end_step=20, frequency=5)
    p = Pruner(m, sparsity=0.9, schedule=sched)
    observed = {}
    for t in range(25):
        r = p.step()
        if r is not None:
            observed[t] = r["2"]
    assert sorted(observed) == [0, 5, 10, 15, 20]
    for t, s in observed.items():
        assert s == pytest.approx(sched.cubic(t, 0.9), abs=1 / 1024)
    assert p.done and _sparsity(m[2]) == round(0.9 * 1024) / 1024


def test_bad_schedules():
    with pytest.raises(ValueError):
        Gradual(begin_step=5, end_step=5)
    with pytest.raises(ValueError):
        Iterative(rounds=0)


def test_top_level_shorthand_is_callable():
    import sparsert
    import sparsert.prune as sp

    m = _mlp()
    assert sparsert.prune(m, sparsity=0.5) is m  # works whether the name resolves to the module or function
    assert sp(m, sparsity=0.75) is m
    assert _sparsity(m[2]) == pytest.approx(0.75)
    assert issubclass(sparsert.Pruner, Pruner)  # the planner-aware one (target_speedup=) on top


def test_calibrate_and_finetune_accept_a_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    from sparsert.prune import finetune

    m = _mlp()
    ds = TensorDataset(torch.randn(40, 16), torch.randint(0, 4, (40,)))
    loader = DataLoader(ds, batch_size=8)
    p = Pruner(m, importance="fisher", sparsity=0.5, schedule=Iterative(2))
    p.calibrate(loader)
    p.step()
    p.step()
    assert _sparsity(m[0]) == pytest.approx(0.5)
    zeros = m[0].weight.detach() == 0
    finetune(m, loader, epochs=1)
    assert bool((m[0].weight.detach()[zeros] == 0).all())
