"""What the planner tests share: a tiny MLP and a private time-table cache per test."""

import pytest
import torch
from torch import nn


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The planner's time tables go to an empty folder of this test (shadows pytest's own ``cache``
    fixture in the modules that import it)."""
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def synthetic_timing(monkeypatch):
    """Replaces the planner's layer and model timing by a cost model (seconds proportional to the
    multiply-adds kept, plus a fixed cost per call), so tests of the planner's flow do not hinge on
    whether a sparse kernel beats dense on a tiny layer on a loaded machine. Tests of the timing
    itself (the cache, real tables) do not use it."""
    from sparsert.formats import kind_name
    from sparsert.prune.patterns import weight_2d_shape
    from sparsert.planner import tables

    per_mac, per_call = 1e-9, 2e-6

    def layer_seconds(rows, cols, tokens, density=1.0):
        return per_mac * rows * cols * tokens * density + per_call

    def fake_time_layer(module, x, patterns, sparsities, min_time, rounds, cold_bytes=0):
        rows, cols = weight_2d_shape(module.weight)
        tokens = x.numel() // x.shape[-1]
        options = {}
        for pat in patterns:
            try:
                pat.check(rows, cols)
            except ValueError:
                continue
            kind = ("csr" if (pat.kind, pat.a, pat.b) == ("block", 1, 1) else
                    kind_name("bsr", pat.a, pat.b) if pat.kind == "block" else kind_name("nm", pat.a, pat.b))
            options[str(pat)] = {str(s): [layer_seconds(rows, cols, tokens, 1.0 - s), kind]
                                 for s in tables._points(pat, sparsities)}
        dense = layer_seconds(rows, cols, tokens)
        return {"dense": dense, "torch": 1.2 * dense, "options": options}

    def fake_time_model_and_rest(model, names, example_inputs, min_time, baseline, rounds=5, served=None):
        from sparsert.convert.streamline import fusion_groups
        from sparsert.convert.timing import capture_layer_inputs

        captured, _ = capture_layer_inputs(model, names, example_inputs)
        # the model as served runs each fused group (all in names) as one call of the stacked rows
        calls = [(n,) for n in names]
        if served is not None:
            groups = [g for g in fusion_groups(model) if all(n in names for n in g)]
            grouped = {n for g in groups for n in g}
            calls = [c for c in calls if c[0] not in grouped] + groups
        layers = 0.0
        for call in calls:
            x = captured[call[0]]
            rows = sum(weight_2d_shape(model.get_submodule(n).weight)[0] for n in call)
            cols = weight_2d_shape(model.get_submodule(call[0]).weight)[1]
            layers += layer_seconds(rows, cols, x.numel() // x.shape[-1]) * (1.2 if baseline == "torch" else 1.0)
        rest = 10 * per_call
        return layers + rest, rest

    monkeypatch.setattr(tables, "_time_layer", fake_time_layer)
    monkeypatch.setattr(tables, "_time_model_and_rest", fake_time_model_and_rest)
