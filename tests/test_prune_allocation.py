"""Non-uniform layer sparsity: OWL, sensitivity tables, exact mean sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from sparsert.prune import Pruner, SensitivityTable, allocate_from_table, owl_sparsities, sensitivity_table
from sparsert.prune.allocation import block_of, fit_mean


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 16))


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 24, generator=torch.Generator().manual_seed(9))
    return [torch.randn(32, 4, generator=g) @ mix + 0.1 * torch.randn(32, 24, generator=g) for _ in range(n)]


def _mean_sparsity(layers):
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / sum(m.weight.numel() for m in layers.values())


def test_block_of_takes_the_repeated_block():
    assert block_of("model.layers.5.mlp.up_proj") == "model.layers.5"
    assert block_of("encoder.layer.11.attention.self.query") == "encoder.layer.11"
    assert block_of("classifier") == "classifier"


def test_fit_mean_is_exact_and_keeps_the_order():
    raw = {"a": 0.2, "b": 0.5, "c": 0.9}
    sizes = {"a": 1000, "b": 333, "c": 77}
    out = fit_mean(raw, sizes, 0.6, 0.0, 0.95)
    pruned = sum(round(out[k] * sizes[k]) for k in raw)
    assert pruned == round(0.6 * sum(sizes.values()))
    assert out["a"] < out["b"] < out["c"] <= 0.95
    with pytest.raises(ValueError):
        fit_mean(raw, sizes, 0.99, 0.0, 0.9)


def test_owl_gives_fewer_pruned_weights_to_layers_with_outliers():
    from sparsert.prune import Wanda

    model = _model()
    with torch.no_grad():  # a few strong weights: outliers in layer "2"
        model[2].weight.view(-1)[::97] *= 30
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    data = _data()
    out = owl_sparsities(model, layers, data, 0.6, lam=0.1, m=3.0, granularity="layer", progress=False)
    scores = Wanda().scores(model, layers, data)
    ratio = {k: float((s > 3.0 * s.mean()).float().mean()) for k, s in scores.items()}
    assert len(set(ratio.values())) == 3
    by_ratio = sorted(layers, key=ratio.get)
    assert [out[k] for k in by_ratio] == sorted(out.values(), reverse=True)  # more outliers, less pruned
    sizes = {k: m.weight.numel() for k, m in layers.items()}
    assert sum(round(out[k] * sizes[k]) for k in out) == round(0.6 * sum(sizes.values()))
    assert max(out.values()) - min(out.values()) == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("importance", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_pruner_honours_the_mean_sparsity(importance, allocation):
    model = _model()
    p = Pruner(model, importance=importance, sparsity=0.6, scope="layer", allocation=allocation,
               allocation_options={"granularity": "layer"} if allocation == "owl" else {}, progress=False)
    p.calibrate(_data()).step()
    assert _mean_sparsity(p.layers) == pytest.approx(0.6, abs=0.5 / sum(m.weight.numel() for m in p.layers.values()))
    assert len(set(round(s, 6) for s in p.layer_sparsity.values())) > 1  # really non-uniform
    for name, m in p.layers.items():
        assert (m.weight == 0).float().mean().item() == pytest.approx(p.layer_sparsity[name], abs=1e-6)


def test_overrides_and_nm_layers_stay_out_of_the_allocation():
    model = _model()
    p = Pruner(model, importance="wanda", sparsity=0.5, scope="layer", allocation="owl",
               allocation_options={"granularity": "layer"},
               overrides={"4": {"sparsity": 0.1}, "0": {"pattern": "2:4"}}, progress=False)
    p.calibrate(_data()).step()
    assert p.layer_sparsity["4"] == 0.1
    assert (model[4].weight == 0).float().mean().item() == pytest.approx(0.1, abs=1e-3)
    assert (model[2].weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)  # the only free layer


def test_sensitivity_table_measures_error_and_round_trips(tmp_path):
    model = _model()
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    table = sensitivity_table(model, layers, _data(), sparsities=(0.25, 0.5, 0.75), progress=False)
    for name, errs in table.errors.items():
        assert errs == sorted(errs) and errs[0] > 0, name  # more pruning, more error
    assert table.error("0", 0.0) == 0.0
    assert table.error("0", 0.375) == pytest.approx(0.5 * (table.errors["0"][0] + table.errors["0"][1]))
    path = tmp_path / "t.json"
    table.save(path)
    again = SensitivityTable.load(path)
    assert again.to_dict() == table.to_dict()
    alloc = allocate_from_table(again, 0.5, max_shift=0.2)
    sizes = table.params
    assert sum(round(alloc[k] * sizes[k]) for k in alloc) == round(0.5 * sum(sizes.values()))
    # a table given to the Pruner is used as is (no recomputation)
    p = Pruner(copy.deepcopy(model), importance="magnitude", sparsity=0.5, scope="layer", allocation=again,
               progress=False)
    p.step()
    assert p.layer_sparsity == pytest.approx(alloc)


def test_sensitivity_allocation_lowers_the_summed_error():
    model = _model()
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    table = sensitivity_table(model, layers, _data(), sparsities=[i / 20 for i in range(1, 20)], progress=False)
    alloc = allocate_from_table(table, 0.6, max_shift=0.3)
    cost = sum(table.error(k, alloc[k]) ** 2 for k in alloc)
    uniform = sum(table.error(k, 0.6) ** 2 for k in alloc)
    assert cost < uniform


def test_allocation_arguments_are_validated():
    model = _model()
    with pytest.raises(ValueError, match="allocation"):
        Pruner(model, allocation="random")
    with pytest.raises(ValueError, match="global"):
        Pruner(model, allocation="owl", scope="global")
    with pytest.raises(ValueError, match="calibrat"):
        Pruner(model, allocation="owl", scope="layer").step()


class _TwoHeads(nn.Module):
    """Two layers read the same tensor (as q/k/v do), then a third reads their sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.out = nn.Linear(24, 16), nn.Linear(24, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.k(x)))


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, 50, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[1, 6:] = 0  # padding: must not enter the Grams
        mask[3, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


@pytest.mark.parametrize("case", ["shared-input", "bert-with-padding"])
def test_input_grams_match_the_group_by_group_grams(case):
    from sparsert.prune.sequential import input_grams, sequential_grams

    if case == "shared-input":
        model, data = _TwoHeads(), _data()
    else:
        model, data = _tiny_bert()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    want = {}
    for group, grams, _, _ in sequential_grams(model, dict(layers), data, progress=False):
        want.update({n: grams[n] for n in group})
    got = input_grams(model, dict(layers), data, progress=False)
    assert set(got) == set(want) == set(layers)
    for n in layers:
        scale = float(want[n].abs().max())
        assert float((got[n] - want[n]).abs().max()) <= 1e-5 * scale, n  # float32 forwards, run in other pieces
    with pytest.raises(ValueError, match="never called"):
        input_grams(model, {**layers, "extra": nn.Linear(3, 3)}, data, progress=False)


def test_wanda_sensitivity_in_float32_matches_the_float64_error():
    from sparsert.prune.allocation import _wanda_rows, sensitivity_tables
    from sparsert.prune.patterns import parse_pattern
    from sparsert.prune.sequential import input_grams
    from sparsert.prune.sparsegpt import layer_error

    model = _model()
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    grid = (0.25, 0.5, 0.75)
    tables = sensitivity_tables(model, layers, _data(), grid, patterns=("unstructured", "4x1", "2:4"), progress=False)
    grams = input_grams(model, dict(layers), _data(), progress=False)
    for pat, table in tables.items():
        for n, errs in table.errors.items():
            w = layers[n].weight.detach().double()
            ref = [layer_error(w, w * _wanda_rows(w, grams[n], parse_pattern(pat), s), grams[n]) for s in grid]
            assert errs == pytest.approx(ref, rel=1e-4, abs=1e-7), (pat, n)


def test_allocation_stays_within_the_measured_grid():
    # past the grid's last point the table knows no error: a step there must not look free
    model = _model()
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    table = sensitivity_table(model, layers, _data(), sparsities=[0.3, 0.5, 0.7, 0.8], progress=False)
    alloc = allocate_from_table(table, 0.75, max_shift=0.2)
    assert max(alloc.values()) <= 0.8 + 1e-9
    assert sum(round(alloc[k] * table.params[k]) for k in alloc) == round(0.75 * sum(table.params.values()))
    with pytest.raises(ValueError, match="grid"):
        allocate_from_table(table, 0.85)


def test_the_pruners_table_measures_its_pattern_up_to_the_allocations_reach():
    from sparsert.prune import sensitivity_grid

    assert sensitivity_grid(0.5) == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert sensitivity_grid(0.9, 0.05)[-1] == pytest.approx(0.95)
    assert sensitivity_grid(0.9)[-1] == pytest.approx(0.99)
    model = _model()
    p = Pruner(model, importance="wanda", pattern="4x1", sparsity=0.9, scope="layer", allocation="sensitivity",
               progress=False).calibrate(_data())
    p.step()
    assert str(p.sensitivity.pattern) == "4x1"
    assert max(p.sensitivity.sparsities) == pytest.approx(0.99)
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    assert _mean_sparsity(layers) == pytest.approx(0.9, abs=2e-3)
    assert len({round(s, 3) for s in p.layer_sparsity.values()}) > 1  # not uniform


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_per_token_sensitivity_is_the_rms_of_each_tokens_relative_error(method):
    # one token with massive inputs dominates the error of all outputs together; per token it weighs
    # as one token among many (SmolLM2's down_proj at 95% measured 0.006 in total)
    from sparsert.prune.allocation import _wanda_rows, sensitivity_tables
    from sparsert.prune.patterns import parse_pattern
    from sparsert.prune.sequential import input_grams
    from sparsert.prune.sparsegpt import sparsegpt_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24, bias=False)).double()
    x = torch.randn(64, 16, dtype=torch.float64)
    x[5, 3] = 500.0  # the massive token: one input channel
    data = [x[:32], x[32:]]
    layers = {"0": model[0]}
    grams, weighted = input_grams(model, layers, data, progress=False, per_token=True)
    w = model[0].weight.detach()
    want = sum(torch.outer(t, t) / float((w @ t).square().sum()) for t in x)
    torch.testing.assert_close(weighted["0"], want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grams["0"], x.T @ x, rtol=1e-9, atol=1e-9)

    grid = (0.5, 0.8)
    total = sensitivity_tables(model, layers, data, grid, method=method, progress=False)["unstructured"]
    token = sensitivity_tables(model, layers, data, grid, method=method, progress=False, per_token=True)
    token = token["unstructured"]
    assert "per token" in token.meta["error"] and "error" not in total.meta
    pat = parse_pattern("unstructured")
    for i, s in enumerate(grid):
        new = (sparsegpt_weight(w, grams["0"], pat, s)[0] if method == "sparsegpt"
               else w * _wanda_rows(w, grams["0"], pat, s))  # the masks come from the plain Gram either way
        rel = ((x @ (new - w).T).square().sum(1) / (x @ w.T).square().sum(1))
        assert token.errors["0"][i] == pytest.approx(float(rel.mean().sqrt()), rel=1e-4)
        whole = float((x @ (new - w).T).square().sum() / (x @ w.T).square().sum())
        assert total.errors["0"][i] == pytest.approx(whole ** 0.5, rel=1e-4)
        assert token.errors["0"][i] > 3 * total.errors["0"][i]  # the massive token hid the others' error
