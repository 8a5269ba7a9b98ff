"""The latency-budget planner: solver optimality, time-table cache, targets, plan, end to end."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import pytest
import torch
from torch import nn

import sparsert
from sparsert.convert import timing
from sparsert.planner import tables as T
from sparsert.planner.plan import build_plan
from sparsert.planner.solver import Option, solve
from sparsert.prune import Pruner as KernelFreePruner
from sparsert.prune.allocation import SensitivityTable
from planner_util import cache, synthetic_timing, tiny_mlp  # noqa: F401  (cache, synthetic_timing: fixtures)

TINY_TIMING = dict(min_time=0.002, rounds=1, model_min_time=0.01)


# ---------------------------------------------------------------- solver


def _brute(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        t = sum(options[i][j].seconds for i, j in enumerate(combo))
        if t <= budget + 1e-9:
            loss = sum(options[i][j].loss for i, j in enumerate(combo))
            if best is None or loss < best - 1e-12:
                best = loss
    return best


@pytest.mark.parametrize("seed", range(25))
def test_solver_finds_the_exact_optimum_on_integer_times(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 5)
    options = [[Option(float(rng.randint(0, 9)), rng.random()) for _ in range(rng.randint(1, 4))]
               for _ in range(layers)]
    fastest = sum(min(o.seconds for o in opts) for opts in options)
    budget = float(fastest + rng.randint(0, 12))
    sol = solve(options, budget, quantum=1.0)
    assert sol.loss == pytest.approx(_brute(options, budget), abs=1e-12)
    assert sol.seconds <= budget + 1e-9
    assert sol.loss == pytest.approx(sum(options[i][j].loss for i, j in enumerate(sol.choice)))


def test_solver_respects_the_budget_with_fractional_times():
    rng = random.Random(7)
    options = [[Option(rng.uniform(0.1, 1.0), rng.random()) for _ in range(5)] for _ in range(8)]
    budget = sum(sorted(o.seconds for o in opts)[2] for opts in options)
    sol = solve(options, budget, bins=500)
    assert sol.seconds <= budget
    # quantising up can only cost optimality, never feasibility; it is close to the exact optimum
    assert sol.loss >= _brute(options, budget) - 1e-12


def test_solver_frontier_is_monotone_and_ends_at_the_least_loss():
    options = [[Option(3, 0.0), Option(1, 0.5)], [Option(4, 0.0), Option(2, 0.3), Option(1, 0.9)]]
    sol = solve(options, 4.0, quantum=1.0)
    assert sol.choice == [1, 1] and sol.loss == pytest.approx(0.8)  # 1 + 2 s beats 3 + 1 s (0.9)
    secs = [s for s, _ in sol.frontier]
    losses = [l for _, l in sol.frontier]
    assert secs == sorted(secs) and losses == sorted(losses, reverse=True)
    assert losses[-1] == 0.0 and secs[-1] == 7.0  # everything dense: 3 + 4


def test_solver_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="fastest choice takes 3"):
        solve([[Option(2, 0)], [Option(1, 0)]], 2.5, quantum=0.5)


# ---------------------------------------------------------------- synthetic tables -> plan


def _tables(baseline_total=10.0, dense=(3.0, 3.0), sparse=None):
    layers = {}
    for i, d in enumerate(dense):
        opts = sparse[i] if sparse else {"unstructured": {0.5: (d / 2, "csr"), 0.9: (d / 5, "csr")}}
        layers[f"l{i}"] = T.LayerTimes(f"l{i}", "Linear", (4, 4), (1, 4), d, d * 1.5, opts)
    return T.TimeTables(layers, "best_dense", baseline_total, 1, {})


def _sens(names, errs):
    return {"unstructured": SensitivityTable([0.5, 0.9], {n: list(e) for n, e in zip(names, errs)},
                                             {n: 16 for n in names})}


def test_plan_picks_the_cheap_layer_and_reports_it():
    tables = _tables()  # remainder 4, layers 3 + 3
    sens = _sens(["l0", "l1"], [(0.1, 0.5), (0.01, 0.05)])  # l1 is nearly free to prune
    plan = build_plan(tables, sens, 10 / 8.5, bins=1000)  # budget 8.5: 1.5 s to save
    assert plan["l1"].pattern == "unstructured" and plan["l1"].format == "csr"
    assert plan["l0"].pattern is None and plan["l0"].format == "dense"
    assert plan.predicted_speedup >= plan.target
    text = plan.table()
    for word in ("l0", "l1", "unstructured", "dense", "csr", "predicted end to end", "best reachable"):
        assert word in text
    assert plan.overrides()["l0"] == {"exclude": True}
    assert plan.overrides()["l1"]["pattern"] == "unstructured"
    assert plan.best_speedup == pytest.approx(10 / (4 + 0.6 + 0.6))


@pytest.mark.parametrize("target, match", [(1.0, "greater than 1"), (0.5, "greater than 1"),
                                           (5.0, "not reachable.*1.92x"), (float("nan"), "finite number"),
                                           ("2", "finite number"), (True, "finite number")])
def test_bad_targets_say_the_best_reachable_speedup(target, match):
    with pytest.raises(ValueError, match=match):
        build_plan(_tables(), _sens(["l0", "l1"], [(0.1, 0.5), (0.1, 0.5)]), target)
    if isinstance(target, float) and math.isfinite(target):
        with pytest.raises(ValueError, match="1.92x"):
            build_plan(_tables(), _sens(["l0", "l1"], [(0.1, 0.5), (0.1, 0.5)]), target)


def test_plan_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    plan = build_plan(_tables(), _sens(["l0", "l1"], [(0.1, 0.5), (0.01, 0.05)]), 1.5)
    path = tmp_path / "frontier.png"
    plan.plot(str(path))
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- real tables and the cache




def test_tables_are_cached_and_invalidated_by_cpu_and_version(cache, monkeypatch):
    model, x = tiny_mlp(), torch.randn(4, 32)
    names = ["0", "2", "4"]
    first = T.time_tables(model, names, x, threads=1, **TINY_TIMING)
    assert first.cache_misses > 0 and first.cache_hits == 0
    files = list((cache / "planner").glob("timings-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"]["threads"] == 1
    with monkeypatch.context() as mp:  # a cached run needs no forward pass: the input shapes are cached too
        mp.setattr(T, "capture_layer_inputs", lambda *a: pytest.fail("the model was run on a fully cached table"))
        again = T.time_tables(model, names, x, threads=1, **TINY_TIMING)
    assert again.cache_misses == 0 and again.cache_hits == 4  # 3 layers + the whole model
    assert again.layers["2"].dense == first.layers["2"].dense  # read back, not re-timed

    monkeypatch.setattr(T, "_cpu_model", lambda: "Another CPU 9000")
    other_cpu = T.time_tables(model, names, x, threads=1, **TINY_TIMING)
    assert other_cpu.cache_hits == 0 and other_cpu.cache_misses > 0
    monkeypatch.undo()
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache))
    monkeypatch.setattr(T, "_sparsert_version", lambda: "99.0")
    assert T.time_tables(model, names, x, threads=1, **TINY_TIMING).cache_hits == 0
    monkeypatch.setattr(T, "_sparsert_version", lambda: sparsert.__version__)
    assert T.time_tables(model, names, x, threads=1, **TINY_TIMING).cache_misses == 0
    monkeypatch.setattr(T, "_native_build", lambda: "a rebuilt extension")  # same version, other kernels
    assert T.time_tables(model, names, x, threads=1, **TINY_TIMING).cache_hits == 0
    monkeypatch.undo()
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache))
    # another token count is another layer input shape: timed anew
    assert T.time_tables(model, names, torch.randn(9, 32), threads=1, **TINY_TIMING).cache_hits == 0


def test_a_grid_point_added_later_retimes_the_row_with_its_dense_baseline(cache, monkeypatch):
    model, x = tiny_mlp(), torch.randn(4, 32)
    calls = []

    def fake(module, x, patterns, sparsities, min_time, rounds, cold_bytes=0):  # known times: dense 1 ms, then 2 ms
        dense = 1e-3 * (1 + len(calls))
        calls.append((tuple(str(p) for p in patterns), tuple(sparsities)))
        opts = {str(p): {str(s): [dense * (1 - s), "csr"] for s in sparsities} for p in patterns}
        return {"dense": dense, "torch": dense, "options": opts}

    monkeypatch.setattr(T, "_time_layer", fake)
    kw = dict(threads=1, patterns=("unstructured",), **TINY_TIMING)
    first = T.time_tables(model, ["2"], x, sparsities=(0.5,), **kw)
    assert calls == [(("unstructured",), (0.5,))]
    assert first.layers["2"].options["unstructured"][0.5][0] == pytest.approx(0.5e-3 * first.layer_scale)
    wider = T.time_tables(model, ["2"], x, sparsities=(0.5, 0.75), **kw)
    # the whole row again, with the baseline, in one interleaved measurement (not the new point alone)
    assert calls[1] == (("unstructured",), (0.5, 0.75))
    lt, k = wider.layers["2"], wider.layer_scale
    assert lt.dense == pytest.approx(2e-3 * k)
    assert lt.options["unstructured"][0.5][0] == pytest.approx(1e-3 * k)
    assert lt.options["unstructured"][0.75][0] == pytest.approx(0.5e-3 * k)
    again = T.time_tables(model, ["2"], x, sparsities=(0.5, 0.75), **kw)
    assert len(calls) == 2 and again.cache_misses == 0  # now cached
    assert T.time_tables(model, ["2"], x, sparsities=(0.75,), **kw).cache_misses == 0  # a subset: cached


def test_layers_of_a_model_larger_than_the_cache_are_timed_with_their_weights_evicted(cache, monkeypatch):
    model, x = tiny_mlp(), torch.randn(4, 32)
    seen = []
    real = T._time_layer

    def spy(module, x, patterns, sparsities, min_time, rounds, cold_bytes=0):
        seen.append(cold_bytes)
        return real(module, x, patterns, sparsities, min_time, rounds, cold_bytes)

    monkeypatch.setattr(T, "_time_layer", spy)
    kw = dict(threads=1, patterns=("unstructured",), sparsities=(0.5,), **TINY_TIMING)
    T.time_tables(model, ["0", "2"], x, **kw)  # ~25 KB of weights: fits any cache, timed hot
    assert seen == [0, 0]
    monkeypatch.setattr(timing, "last_level_cache_bytes", lambda: 4096)  # now the weights do not fit
    cold = T.time_tables(model, ["0", "2"], x, **kw)
    assert seen[2:] == [8192, 8192] and cold.cache_misses > 0  # hot entries are not reused for cold ones
    assert all(t > 0 for lt in cold.layers.values() for t, _ in lt.options["unstructured"].values())
    assert T.time_tables(model, ["0", "2"], x, **kw).cache_misses == 0


def test_streaming_layers_keep_their_isolated_times_beside_the_measured_remainder(cache, monkeypatch):
    # at many rows the layers are scaled so that layers + remainder add up to the measured model; layers
    # that stream their weights from memory (few rows, cold) keep their isolated times and the remainder
    # is the measured one: only an all-dense model ran its layers faster than alone (SmolLM2 decode)
    model = tiny_mlp()

    def fake_layer(module, x, patterns, sparsities, min_time, rounds, cold_bytes=0):
        opts = {str(p): {str(s): [1e-3 * (1 - s), "csr"] for s in sparsities} for p in patterns}
        return {"dense": 1e-3, "torch": 1e-3, "options": opts}

    monkeypatch.setattr(T, "_time_layer", fake_layer)
    # the model measures its two layers at half their isolated 1 ms each, plus 1 ms of remainder
    monkeypatch.setattr(T, "_time_model_and_rest", lambda *a, **k: (2e-3, 1e-3))
    kw = dict(threads=1, patterns=("unstructured",), sparsities=(0.5,), **TINY_TIMING)
    names = ["0", "2"]
    for rows, cold, scaled in ((1, False, True), (64, True, True), (1, True, False), (16, True, False)):
        monkeypatch.setattr(timing, "last_level_cache_bytes", (lambda: 4096) if cold else (lambda: 1 << 30))
        tab = T.time_tables(model, names, torch.randn(rows, 32), **kw)
        k = 0.5 if scaled else 1.0
        assert tab.layer_scale == pytest.approx(k) and tab.remainder == pytest.approx(1e-3)
        assert tab.model_seconds == pytest.approx(2e-3)
        for lt in tab.layers.values():
            assert lt.dense == pytest.approx(1e-3 * k)
            assert lt.options["unstructured"][0.5][0] == pytest.approx(0.5e-3 * k)
        # an all-dense plan adds up to the model only when scaled; streaming, it predicts what a model of
        # layers running as fast as alone would take
        assert (tab.remainder + tab.layer_seconds) == pytest.approx(2e-3 if scaled else 3e-3)


def test_cold_copies_hold_the_bytes_asked_in_separate_storage_and_timing_cycles_through_them(monkeypatch):
    lin = nn.Linear(32, 16)  # 2,112 bytes of parameters
    copies = T.cold_copies(lin, 10_000)
    assert len(copies) == 5 and copies[0] is lin
    assert len({c.weight.data_ptr() for c in copies}) == 5
    assert all(torch.equal(c.weight, lin.weight) for c in copies)
    assert len(T.cold_copies(lin, 10 ** 9, limit=7)) == 7 and len(T.cold_copies(lin, 1)) == 1
    assert T.last_level_cache_bytes() >= 1 << 20

    called = []
    real = timing.cold_copies

    def counted(module, cold_bytes, limit=4096):
        out = real(module, cold_bytes, limit)
        for c in out:
            c.register_forward_pre_hook(lambda m, a: called.append(id(m)))
        called.append(("set", [id(c) for c in out]))
        return out

    monkeypatch.setattr(timing, "cold_copies", counted)  # (in_model_call's, which times every candidate)
    T._time_layer(lin, torch.randn(3, 32), [], [], min_time=0.001, rounds=2, cold_bytes=10_000)
    sets = [ids for c in called if isinstance(c, tuple) for ids in [c[1]]]
    calls = [c for c in called if not isinstance(c, tuple)]
    assert len(sets) == 2  # the two baselines (eager, best dense); no pattern asked
    for ids in sets:  # every copy ran: the warm-up and the timing cycle over all of them
        assert all(calls.count(i) >= 2 for i in ids), [calls.count(i) for i in ids]


def test_default_grid_has_the_steps_between_70_and_90_percent():
    assert {0.75, 0.85} <= set(T.DEFAULT_SPARSITIES) and list(T.DEFAULT_SPARSITIES) == sorted(T.DEFAULT_SPARSITIES)


def test_tables_hold_every_pattern_and_sparsity_with_a_format(cache):
    model, x = tiny_mlp(), torch.randn(4, 32)
    tab = T.time_tables(model, ["0", "2"], x, threads=1, patterns=("unstructured", "4x1", "2:4"),
                        sparsities=(0.5, 0.9), **TINY_TIMING)
    lt = tab.layers["2"]
    assert lt.input_shape == (4, 64) and lt.shape == (32, 64)
    assert set(lt.options) == {"unstructured", "4x1", "2:4"}
    assert set(lt.options["unstructured"]) == {0.5, 0.9} and set(lt.options["2:4"]) == {0.5}
    assert all(t > 0 and isinstance(k, str) for pts in lt.options.values() for t, k in pts.values())
    assert lt.options["4x1"][0.9][1] in ("bsr4x1", "csr", "bitmask16")
    assert tab.model_seconds > 0 and tab.remainder >= 0


def test_smoothing_pools_pattern_free_formats_and_makes_each_row_non_increasing():
    raw = {"unstructured": {0.5: {"csr": 96.0, "bitmask16": 96.0, "rowgroup4": 70.0},
                            0.7: {"csr": 60.0, "bitmask16": 80.0, "rowgroup4": 55.0},
                            0.8: {"csr": 62.0}, 0.9: {"csr": 59.0}},
           "4x1": {0.5: {"csr": 90.0, "bitmask16": 85.0, "bsr4x1": 88.0},
                   0.7: {"csr": 58.0, "bitmask16": 78.0, "bsr4x1": 50.0},
                   0.8: {"csr": 40.0, "bsr4x1": 45.0}, 0.9: {"csr": 38.0, "bsr4x1": 30.0}},
           "2:4": {0.5: {"csr": 93.0, "bitmask16": 87.0, "nm2:4": 60.0}}}
    apart = T.smooth_formats(raw)  # many rows: each pattern keeps its own times, made non-increasing
    assert [apart["unstructured"][s]["csr"] for s in (0.5, 0.7, 0.8, 0.9)] == [96.0, 61.0, 61.0, 59.0]
    assert [apart["4x1"][s]["csr"] for s in (0.5, 0.7, 0.8, 0.9)] == [90.0, 58.0, 40.0, 38.0]
    assert apart["4x1"][0.5]["bitmask16"] == 85.0 and apart["2:4"][0.5]["csr"] == 93.0
    smooth = T.smooth_formats(raw, pool_patterns=True)  # a layer that streams its weight
    assert raw["unstructured"][0.5]["csr"] == 96.0  # the input is left as it was
    # csr and bitmask16: one cost at one sparsity whatever the pattern (the median of the patterns' times)
    for s in (0.5, 0.7, 0.8, 0.9):
        assert smooth["unstructured"][s]["csr"] == smooth["4x1"][s]["csr"]
    assert smooth["2:4"][0.5]["bitmask16"] == smooth["4x1"][0.5]["bitmask16"] == 87.0
    assert smooth["2:4"][0.5]["csr"] == 93.0 and smooth["unstructured"][0.7]["bitmask16"] == 79.0
    # pooled csr row 93, 59, 51, 48.5: already non-increasing
    assert [smooth["4x1"][s]["csr"] for s in (0.5, 0.7, 0.8, 0.9)] == [93.0, 59.0, 51.0, 48.5]
    # formats tied to a pattern keep their own times (this row is already non-increasing)
    assert [smooth["4x1"][s]["bsr4x1"] for s in (0.5, 0.7, 0.8, 0.9)] == [88.0, 50.0, 45.0, 30.0]
    assert smooth["unstructured"][0.5]["rowgroup4"] == 70.0 and smooth["2:4"][0.5]["nm2:4"] == 60.0
    for pts in smooth.values():
        for kind in {k for kinds in pts.values() for k in kinds}:
            row = [pts[s][kind] for s in sorted(pts) if kind in pts[s]]
            assert row == sorted(row, reverse=True)
    # a point slower than the sparser points after it is averaged with them (least squares)
    assert T._non_increasing([10.0, 6.0, 7.0, 8.0, 2.0]) == [10.0, 7.0, 7.0, 7.0, 2.0]
    assert T._non_increasing([1.0, 2.0, 3.0]) == [2.0, 2.0, 2.0] and T._non_increasing([]) == []
    fastest = T.fastest_formats(smooth)
    assert fastest["2:4"][0.5] == (60.0, "nm2:4") and fastest["4x1"][0.9] == (30.0, "bsr4x1")
    assert fastest["unstructured"][0.8] == (51.0, "csr")


def test_the_planner_reads_smoothed_tables_and_the_cache_keeps_the_raw_ones(cache, monkeypatch):
    model, x = tiny_mlp(), torch.randn(4, 32)

    def lucky(module, x, patterns, sparsities, min_time, rounds, cold_bytes=0):  # 4x1 at 0.5 measured lucky
        times = {"unstructured": {0.5: 9e-4, 0.7: 5e-4}, "4x1": {0.5: 6e-4, 0.7: 7e-4}}
        opts = {str(p): {str(s): [times[str(p)][s], "csr", {"csr": times[str(p)][s]}] for s in sparsities}
                for p in patterns}
        return {"dense": 1e-3, "torch": 1e-3, "options": opts}

    monkeypatch.setattr(T, "_time_layer", lucky)
    monkeypatch.setattr(T, "_time_model_and_rest", lambda *a, **k: (2e-3, 0.0))
    kw = dict(threads=1, patterns=("unstructured", "4x1"), sparsities=(0.5, 0.7), **TINY_TIMING)
    tab = T.time_tables(model, ["0", "2"], x, **kw)
    k = tab.layer_scale
    for p in ("unstructured", "4x1"):  # csr pooled (7.5e-4 at 0.5, 6e-4 at 0.7), then non-increasing
        assert tab.layers["2"].options[p][0.5] == (pytest.approx(7.5e-4 * k), "csr")
        assert tab.layers["2"].options[p][0.7][0] == pytest.approx(6e-4 * k)
        assert tab.layers["2"].formats[p][0.7]["csr"] == pytest.approx(6e-4 * k)
    raw = T.time_tables(model, ["0", "2"], x, smooth=False, **kw)
    assert raw.cache_misses == 0  # read from the cache, as measured
    assert raw.layers["2"].options["4x1"][0.5][0] == pytest.approx(6e-4 * raw.layer_scale)
    assert raw.layers["2"].options["4x1"][0.7][0] == pytest.approx(7e-4 * raw.layer_scale)
    many = T.time_tables(model, ["0", "2"], torch.randn(64, 32), **kw)  # 64 rows: patterns not pooled
    k = many.layer_scale
    assert many.layers["2"].options["unstructured"][0.5][0] == pytest.approx(9e-4 * k)
    assert many.layers["2"].options["4x1"][0.5][0] == pytest.approx(6.5e-4 * k)  # 6, 7: averaged
    assert many.layers["2"].options["4x1"][0.7][0] == pytest.approx(6.5e-4 * k)


def test_remainder_is_timed_directly_and_the_layers_add_up_to_the_model(cache):
    model, x = tiny_mlp(), torch.randn(4, 32)
    tab = T.time_tables(model, ["0", "2"], x, threads=1, patterns=("unstructured",), sparsities=(0.5,),
                        **TINY_TIMING)
    lo, hi = T._SCALE_BOUNDS
    assert lo <= tab.layer_scale <= hi
    if lo < tab.layer_scale < hi:  # not clamped: scaled layers + measured remainder = measured model
        assert tab.remainder + tab.layer_seconds == pytest.approx(tab.model_seconds, rel=1e-9)
    # the second run reads the same numbers back (model and remainder are both cached)
    again = T.time_tables(model, ["0", "2"], x, threads=1, patterns=("unstructured",), sparsities=(0.5,),
                          **TINY_TIMING)
    assert again.cache_misses == 0 and again.model_seconds == tab.model_seconds
    assert again.remainder == pytest.approx(tab.remainder) and again.layer_scale == tab.layer_scale


def test_stub_layer_keeps_the_output_shape():
    stub = T._ZerosLike(torch.Size([4, 7]), torch.float32, linear_out=7)
    out = stub(torch.randn(2, 3, 5))
    assert out.shape == (2, 3, 7) and out.dtype == torch.float32 and not out.any()
    conv = T._ZerosLike(torch.Size([1, 8, 3, 3]), torch.float64, linear_out=None)
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 8, 3, 3) and conv(torch.randn(1)).dtype == torch.float64


def test_random_pattern_weight_follows_the_pattern():
    from sparsert.prune import parse_pattern

    w = T.random_pattern_weight(16, 32, "4x1", 0.75)
    assert parse_pattern("4x1").conforms(w != 0)
    assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=0.02)
    assert parse_pattern("2:4").conforms(T.random_pattern_weight(8, 16, "2:4", 0.9) != 0)


# ---------------------------------------------------------------- the Pruner


def test_sparsity_usage_is_unchanged():
    m = tiny_mlp()
    p = sparsert.Pruner(m, "magnitude", "unstructured", 0.5)
    assert isinstance(p, KernelFreePruner) and p.plan is None
    p.step()
    assert float((m[2].weight == 0).float().mean()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="target_speedup"):
        sparsert.Pruner(tiny_mlp(), sparsity=0.5, example_inputs=torch.randn(2, 32))


def test_pruner_rejects_bad_arguments_before_timing(cache):
    x = torch.randn(4, 32)
    for kwargs, match in [(dict(target_speedup=2, sparsity=0.5), "not both"),
                          (dict(target_speedup=2), "example_inputs"),
                          (dict(target_speedup="fast", example_inputs=x), "finite number"),
                          (dict(target_speedup=2, example_inputs=x, baseline="onnx"), "baseline"),
                          (dict(target_speedup=2, example_inputs=x, scope="global"), "global")]:
        with pytest.raises(ValueError, match=match):
            sparsert.Pruner(tiny_mlp(), **kwargs)
    assert not (cache / "planner").exists()  # nothing was timed


def test_pruner_unreachable_target_says_the_best(cache, synthetic_timing):
    from sparsert.planner.plan import TargetUnreachable

    with pytest.raises(ValueError, match=r"not reachable: the best reachable speedup for this model is \d+\.\d\dx") as err:
        sparsert.Pruner(tiny_mlp(), target_speedup=1e6, example_inputs=torch.randn(4, 32), threads=1,
                        timing=TINY_TIMING)
    # the demo plans for 95% of err.best instead: it must be the number the message says, and reachable
    assert isinstance(err.value, TargetUnreachable) and err.value.target == 1e6
    assert f"{err.value.best:.2f}x" in str(err.value) and 1.0 < err.value.best < 1e6
    sparsert.Pruner(tiny_mlp(), target_speedup=0.95 * err.value.best, example_inputs=torch.randn(4, 32), threads=1,
                    timing=TINY_TIMING)


def test_tiny_model_end_to_end(cache, synthetic_timing, tmp_path):
    from sparsert.nn import DenseLinear, SparseLinear

    model, x = tiny_mlp(), torch.randn(4, 32)
    dense = [p.detach().clone() for p in model.parameters()]
    pruner = sparsert.Pruner(model, "wanda", target_speedup=1.05, example_inputs=x, threads=1,
                             sparsities=(0.5, 0.9), timing=TINY_TIMING)
    pruner.calibrate([torch.randn(8, 32) for _ in range(2)])
    plan = pruner.plan
    best = plan.best_speedup
    assert 1.05 <= best and plan.pruned  # beating the best dense path needs at least one sparse layer
    assert plan.predicted_speedup >= 1.05 * (1 - 1e-9)
    assert pruner.sensitivity_tables is not None and set(pruner.sensitivity_tables) == {"unstructured", "4x1",
                                                                                        "2:4"}
    reuse = sparsert.Pruner(tiny_mlp(), "wanda", target_speedup=1.05, example_inputs=x, threads=1, sparsities=(0.5, 0.9),
                            timing=TINY_TIMING, sensitivity=pruner.sensitivity_tables)
    # without calibration data nothing is scored: the solver's plan, the first candidate the other scored
    solver_plan = plan.candidates[0].plan if plan.candidates else plan
    assert reuse.plan.candidates == []
    assert [(l.pattern, l.sparsity) for l in reuse.plan.layers] == [(l.pattern, l.sparsity)
                                                                    for l in solver_plan.layers]
    pruner.step()
    for lp in plan.layers:
        w = model.get_submodule(lp.name).weight
        if lp.pattern is None:
            assert not bool((w == 0).any())
        else:
            assert float((w == 0).float().mean()) == pytest.approx(lp.sparsity, abs=0.07)
            from sparsert.prune import parse_pattern

            assert parse_pattern(lp.pattern).conforms(w != 0)
    fast = pruner.sparsify()
    for lp in plan.layers:
        mod = fast.get_submodule(lp.name)
        assert isinstance(mod, SparseLinear if lp.pattern else DenseLinear)
        if lp.pattern:
            assert mod.format == lp.format
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(dense, model.parameters()))
    path = tmp_path / "m.sparsert"
    sparsert.save(fast, path)
    assert path.is_file()


def _widertiny_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                         nn.ReLU(), nn.Linear(32, 8)).eval()


def _planned_sparsegpt(cache, layout):
    """A planned SparseGPT pruner over ``_wider_mlp`` whose plan is overridden by ``layout``
    ({layer: (pattern or None, sparsity)}), so each layer's target is known to the test."""
    model, x = _widertiny_mlp(), torch.randn(4, 32)
    pruner = sparsert.Pruner(model, "sparsegpt", target_speedup=1.01, example_inputs=x, threads=1,
                             sparsities=(0.5, 0.75), timing=TINY_TIMING)
    pruner.calibrate([torch.randn(16, 32) for _ in range(4)])
    plan = pruner.plan
    for lp in plan.layers:
        lp.pattern, lp.sparsity = layout[lp.name]
        lp.format = "dense" if lp.pattern is None else ("nm2:4" if lp.pattern == "2:4" else "csr")
    return model, x, pruner, plan


def test_sparsegpt_planned_path_prunes_each_layer_to_its_own_sparsity_and_pattern(cache, synthetic_timing):
    from sparsert.prune import parse_pattern

    layout = {"0": ("unstructured", 0.75), "2": ("4x1", 0.5), "4": ("2:4", 0.5), "6": (None, 0.0)}
    model, x, pruner, plan = _planned_sparsegpt(cache, layout)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in layout}
    pruner.step()
    for name, (pattern, sparsity) in layout.items():
        w = model.get_submodule(name).weight.detach()
        if pattern is None:  # planned dense: untouched, bit for bit
            assert torch.equal(w, before[name])
            continue
        assert parse_pattern(pattern).conforms(w != 0), name
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name  # exactly the planned count
        kept = w != 0
        # SparseGPT moved the kept weights to make up for the removed ones (wanda would only mask)
        assert not torch.equal(w[kept], before[name][kept]), name
    fast = pruner.sparsify(x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_recovery_recipe_options_reach_recover(cache, synthetic_timing):
    # the encoder recipe passes train="pruned" and dropout=False through recover_pruned to recover
    from sparsert.models.catalogue import recovery_recipe
    from sparsert.planner.workflow import recover_pruned

    layout = {"0": ("unstructured", 0.75), "2": ("4x1", 0.5), "4": ("2:4", 0.5), "6": (None, 0.0)}
    model, x, pruner, plan = _planned_sparsegpt(cache, layout)
    dense = _widertiny_mlp()
    pruner.step()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in layout}
    encoder = type("Workload", (), {"family": "hf", "extra": {}})()
    recipe = recovery_recipe(encoder)
    assert recipe["train"] == "pruned" and recipe["dropout"] is False and recipe["lr"] == 1e-3
    recipe.pop("embedding_weight")  # an MLP has no token embeddings to pool
    batches = [torch.randn(16, 32) for _ in range(4)]
    result = recover_pruned(model, dense, batches, 1.0, steps=5, log=lambda line: None, **recipe)
    assert result.done
    assert torch.equal(model.get_submodule("6").weight, before["6"])  # not pruned: not trained
    assert all(not torch.equal(model.get_submodule(n).weight, before[n]) for n in ("0", "2", "4"))


def test_recovery_after_planned_pruning_keeps_every_mask_and_pattern(cache, synthetic_timing):
    from sparsert.planner.workflow import recover_pruned
    from sparsert.prune import parse_pattern
    from sparsert.prune.masks import get_mask

    layout = {"0": ("unstructured", 0.75), "2": ("4x1", 0.5), "4": ("2:4", 0.5), "6": (None, 0.0)}
    model, x, pruner, plan = _planned_sparsegpt(cache, layout)
    dense = _widertiny_mlp()  # the same seed: the unpruned teacher
    pruner.step()
    masks = {n: get_mask(model.get_submodule(n)).clone() for n, (p, _) in layout.items() if p}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in layout}
    batches = [torch.randn(16, 32) for _ in range(4)]
    mse = lambda: float(sum(((model(b) - dense(b)) ** 2).mean() for b in batches))  # noqa: E731
    with torch.no_grad():
        err_before = mse()
    logs = []
    result = recover_pruned(model, dense, batches, 1.0, steps=40, lr=1e-2, log=logs.append)
    assert result.done and result.step == 40 and any("40/40 steps" in line for line in logs)
    with torch.no_grad():
        assert mse() < err_before  # it learned something
    for name, (pattern, sparsity) in layout.items():
        module = model.get_submodule(name)
        w = module.weight.detach()
        assert not torch.equal(w, weights[name]), name  # trained
        if pattern is None:
            assert get_mask(module) is None and bool((w != 0).all()), name
            continue
        assert torch.equal(get_mask(module), masks[name]), name  # the very same mask
        assert torch.equal(w != 0, masks[name]), name  # zeros exactly where pruned, nowhere else
        assert parse_pattern(pattern).conforms(w != 0)
    fast = pruner.sparsify(x)  # still packs in the planned formats
    for lp in plan.pruned:
        assert fast.get_submodule(lp.name).format == lp.format


class _MLPWorkload:
    """Just what the gradual recovery asks of a workload."""

    def loss_fn(self):
        return None


def _gradual(cache, budget: float, steps: int = 40):
    from sparsert.planner.workflow import _recover_gradually

    layout = {"0": ("unstructured", 0.75), "2": ("4x1", 0.5), "4": ("2:4", 0.5), "6": (None, 0.0)}
    model, x, pruner, plan = _planned_sparsegpt(cache, layout)
    dense = _widertiny_mlp()  # the same seed: the unpruned teacher
    before = {n: model.get_submodule(n).weight.detach().clone() for n in layout}
    torch.manual_seed(3)
    calib = [torch.randn(16, 32) for _ in range(4)]
    train = [torch.randn(16, 32) for _ in range(4)]
    logs: list = []
    result = _recover_gradually(_MLPWorkload(), model, dense, plan, "sparsegpt", calib, train, steps, budget, 0.5,
                                None, 100, False, logs.append, {"lr": 1e-2, "train": "pruned"})
    return layout, model, x, pruner, plan, before, result, logs


def test_gradual_recovery_reaches_every_planned_sparsity_and_pattern(cache, synthetic_timing):
    from sparsert.prune import parse_pattern
    from sparsert.prune.masks import get_mask

    layout, model, x, pruner, plan, before, result, logs = _gradual(cache, budget=1e9)
    assert result.done and result.step == 40
    assert any("gradual pruning of 3 layers" in line and "wanda" in line for line in logs)  # sparsegpt -> wanda masks
    assert not any("pruned at once" in line for line in logs)
    for name, (pattern, sparsity) in layout.items():
        module = model.get_submodule(name)
        w = module.weight.detach()
        if pattern is None:  # planned dense: neither pruned nor trained
            assert get_mask(module) is None and torch.equal(w, before[name]), name
            continue
        assert int((~get_mask(module)).sum()) == round(sparsity * w.numel()), name  # exactly the planned count
        assert torch.equal(w != 0, get_mask(module)), name
        assert parse_pattern(pattern).conforms(w != 0), name
        assert not torch.equal(w[w != 0], before[name][w != 0]), name  # trained
    fast = pruner.sparsify(x)  # packs in the planned formats
    for lp in plan.pruned:
        assert fast.get_submodule(lp.name).format == lp.format
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_gradual_recovery_ramps_the_sparsity_over_the_first_half_of_the_run(cache, synthetic_timing, monkeypatch):
    import sparsert.prune as prune_pkg
    from sparsert.prune.masks import get_mask

    real, seen = prune_pkg.recover, []

    def spy(student, teacher, batches, *, pruner, **kw):  # records layer "0"'s sparsity after each pruning step
        step = pruner.step

        def recorded():
            out = step()
            mask = get_mask(student.get_submodule("0"))
            seen.append(0.0 if mask is None else float((~mask).float().mean()))
            return out

        pruner.step = recorded
        return real(student, teacher, batches, pruner=pruner, **kw)

    monkeypatch.setattr(prune_pkg, "recover", spy)
    *_, result, logs = _gradual(cache, budget=1e9, steps=40)
    assert result.done and result.step == 40
    # 40 steps, ramp over the first 20 (the schedule's steps 0..20): rising, final at the ramp's end
    assert len(seen) == 21 and all(a <= b for a, b in zip(seen, seen[1:]))
    assert seen[1] < 0.2 and seen[10] < 0.75 - 0.05 and seen[-1] == pytest.approx(0.75, abs=1 / 2048)


def test_gradual_recovery_stopped_by_its_budget_still_meets_the_plan(cache, synthetic_timing):
    from sparsert.prune import parse_pattern
    from sparsert.prune.masks import get_mask

    layout, model, x, pruner, plan, before, result, logs = _gradual(cache, budget=0.0)
    assert not result.done and result.step < 20  # stopped inside the ramp
    assert any("pruned at once" in line for line in logs)  # and says what that means
    for name, (pattern, sparsity) in layout.items():
        if pattern is None:
            continue
        w = model.get_submodule(name).weight.detach()
        assert int((~get_mask(model.get_submodule(name))).sum()) == round(sparsity * w.numel()), name
        assert parse_pattern(pattern).conforms(w != 0), name


def test_recovery_start_is_gradual_for_long_budgets_only():
    from sparsert.planner.workflow import GRADUAL_MIN_STEPS, gradual_checkpoint, recovery_start

    assert recovery_start("auto", GRADUAL_MIN_STEPS) == "gradual"
    assert recovery_start("auto", GRADUAL_MIN_STEPS - 1) == "oneshot"
    assert recovery_start("oneshot", 10 ** 6) == "oneshot" and recovery_start("gradual", 1) == "gradual"
    with pytest.raises(ValueError, match="recover_start"):
        recovery_start("slow", 10)
    assert gradual_checkpoint(None) is None
    assert str(gradual_checkpoint("ck/recover.pt")).endswith("recover-gradual.pt")


def test_recovery_steps_fit_the_budget():
    from sparsert.planner.workflow import recovery_steps_for

    assert recovery_steps_for(150.0, 1.5) == 90 and recovery_steps_for(1.0, 10.0) == 1
    with pytest.raises(ValueError):
        recovery_steps_for(10.0, 0.0)


# ---------------------------------------------------------------- the command line


def _cli(*args, cache):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "SPARSERT_CACHE_DIR": str(cache)}
    env.pop("SPARSERT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sparsert", *map(str, args)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=900)


def test_cli_prune_to_a_target_speedup(tmp_path, cache):
    out = tmp_path / "mlp.sparsert"
    r = _cli("prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", "--json", "-o", out, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(r.stdout)
    assert data["target"] == 1.2 and data["baseline"] == "best_dense"
    assert data["predicted_speedup"] >= 1.2 * (1 - 1e-9)
    assert data["measured_speedup"] > 0 and "accuracy" in data["quality"]
    assert any(l["pattern"] for l in data["plan"]["layers"]) and out.is_file()
    # the digits MLP is no sentence encoder: its candidates are chosen by the per-vector cosine, unless told
    assert data["plan"]["candidates"] and {c["metric"] for c in data["plan"]["candidates"]} == {"cosine"}
    mse = json.loads(_cli("prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", "--score-metric", "mse",
                          "--json", "-o", out, cache=cache).stdout)
    chosen = [c for c in mse["plan"]["candidates"] if c["chosen"]]
    assert {c["metric"] for c in mse["plan"]["candidates"]} == {"mse"} and len(chosen) == 1
    assert chosen[0]["mse"] == min(c["mse"] for c in mse["plan"]["candidates"])
    rec = _cli("prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", "--recover-minutes", "0.2",
               "--recover-steps", "5", "--json", "-o", out, cache=cache)
    assert rec.returncode == 0, rec.stderr[-3000:]
    data = json.loads(rec.stdout)
    assert data["recovery"]["step"] == 5 and data["recovery"]["done"] and data["quality_oneshot"] is not None
    assert data["recovery"]["start"] == "oneshot"  # auto: 5 steps are too few for a gradual run
    assert data["importance"] == "magnitude"  # the digits examples' default; hf models get sparsegpt
    grad = _cli("prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", "--recover-minutes", "0.5",
                "--recover-steps", "8", "--recover-start", "gradual", "--json", "-o", out, cache=cache)
    assert grad.returncode == 0, grad.stderr[-3000:]
    data = json.loads(grad.stdout)
    assert data["recovery"]["start"] == "gradual" and data["recovery"]["step"] == 8 and data["recovery"]["done"]
    assert data["quality_oneshot"] is None  # nothing was pruned at once
    import sparsert as sr

    saved = sr.load(out)
    for lp in data["plan"]["layers"]:
        layer = saved.get_submodule(lp["name"])
        if lp["pattern"] is not None:  # every planned layer at its planned sparsity, packed as planned
            assert layer.format == lp["format"]
            zeros = float((layer.to_dense().weight == 0).float().mean())
            assert zeros == pytest.approx(lp["sparsity"], abs=0.02), lp["name"]
    text = _cli("prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", "--recover-minutes", "0.5",
                "--recover-steps", "8", "--recover-start", "gradual", "-o", out, cache=cache)
    assert text.returncode == 0 and "recovery (gradual): 8/8 steps" in text.stdout, text.stdout[-2000:]
    nonplanned = _cli("prune", "digits-mlp", "--sparsity", "0.5", "--recover-start", "gradual", "-o", out, cache=cache)
    assert nonplanned.returncode == 1 and "--recover-start" in nonplanned.stderr
    far = _cli("prune", "digits-mlp", "--target-speedup", "1000", "--threads", "1", "-o", out, cache=cache)
    assert far.returncode == 1 and "best reachable speedup" in far.stderr and "Traceback" not in far.stderr


def test_cli_prune_to_a_target_speedup_refuses_what_it_would_ignore(tmp_path, cache, capsys, monkeypatch):
    # in-process: these are refused while parsing the arguments, before any model is loaded
    from sparsert.cli import main

    monkeypatch.delenv("SPARSERT_DEBUG", raising=False)
    monkeypatch.setenv("SPARSERT_CACHE_DIR", str(cache))
    out = tmp_path / "mlp.sparsert"
    capsys.readouterr()

    def run(*args):
        rc = main(["prune", "digits-mlp", "--target-speedup", "1.2", "--threads", "1", *map(str, args), "-o", str(out)])
        return rc, capsys.readouterr().err

    rc, err = run("--score-metric", "l1")
    assert rc == 2 and "--score-metric" in err
    rc, err = run("--sparsity", "0.5")
    assert rc == 1 and "drop --sparsity" in err
    for extra, says in ((["--recover-prune-frac", "0.3"], "--recover-minutes"),
                        (["--checkpoint-every", "5"], "--recover-minutes"),
                        (["--recover-start", "gradual"], "--recover-minutes"),
                        (["--finetune-epochs", "1"], "--target-speedup"),
                        (["--allocation", "owl"], "--target-speedup"),
                        (["--checkpoint", tmp_path / "ck"], "--recover-minutes"),
                        (["--recover-lr", "1e-3"], "--recover-minutes"),
                        (["--checkpoint", tmp_path / "ck", "--recover-minutes", "1"], "--recover-steps")):
        rc, err = run(*extra)  # refused, not silently ignored
        assert rc == 1 and extra[0] in err and says in err, extra
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_demo_plans_for_a_speedup(tmp_path, cache):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SPARSERT_CACHE_DIR": str(cache)}
    # oneshot pinned: on a fast machine 6 s hold enough steps for auto to go gradual (no one-shot steps then)
    r = subprocess.run([sys.executable, "-m", "sparsert.demo", "--model", "digits-mlp", "--target-speedup", "1.2",
                        "--threads", "1", "--shape", "64x1x8x8", "--recover-minutes", "0.1", "--recover-start", "oneshot",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("latency, torch eager", "latency, best dense path", "latency, sparse (planned)", "quality kept",
                "file size", "predicted end to end", "next:"):
        assert row in r.stdout, row
    for step in ("dense quality", "time tables", "calibrate", "sensitivity tables + plan", "prune", "pack",
                 "one-shot quality", "recover", "save + reload", "quality (eval split)",
                 "benchmark"):  # where the time went, step by step
        assert re.search(rf"\[{re.escape(step)}: \d+\.\d s\]", r.stdout), step
    assert "[reconstruct:" not in r.stdout  # the refit is opt-in in the planned demo
    assert re.search(r"recovery: \d+/\d+ steps", r.stdout) and "recovery steps" in r.stdout
    assert (tmp_path / "digits-mlp.sparsert").is_file()


def test_cli_prune_can_turn_the_group_calibration_on():
    from sparsert.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["prune", "minilm", "--target-speedup", "2", "-o", "x.sparsert"]).calibrate_groups is False
    assert parse(["prune", "minilm", "--target-speedup", "2", "--calibrate-groups",
                  "-o", "x.sparsert"]).calibrate_groups is True
    assert parse(["prune", "minilm", "--target-speedup", "2", "-o", "x.sparsert"]).measure_candidates is False
    assert parse(["prune", "minilm", "--target-speedup", "2", "--measure-candidates",
                  "-o", "x.sparsert"]).measure_candidates is True
    # the CLI spells the metrics out (it imports no torch to parse): they must stay the scorer's
    from sparsert.planner.scoring import METRICS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
                  if a.dest == "score_metric")
    assert tuple(action.choices) == METRICS


def test_plannable_layers_leave_out_a_head_tied_to_the_embedding_and_attention_internals():
    from sparsert.planner.pruner import plannable_layers

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.mlp = nn.Linear(16, 16)
            self.attn = nn.MultiheadAttention(16, 2)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight  # tied, as in SmolLM2 / GPT-2

    lm = TinyLM()
    names = ["mlp", "attn.out_proj", "head"]
    assert plannable_layers(lm, names) == ["mlp"]
    lm.head.weight = nn.Parameter(lm.embed.weight.detach().clone())  # untied: its own weight, plannable
    assert plannable_layers(lm, names) == ["mlp", "head"]


@pytest.mark.parametrize("forward", ["streamlined", "hf"])
def test_pruner_times_the_forward_that_serves_the_model(cache, monkeypatch, forward):
    # a BERT-style encoder is timed through sparsert.streamline's lean forward (Q/K/V unfused: the
    # layers keep the names the plan prunes), unless forward="hf"; other models as they are
    transformers = pytest.importorskip("transformers")
    from sparsert.convert.streamline import StreamlinedEncoder
    from sparsert.planner import pruner as P

    timed = []

    class Stop(Exception):
        pass

    def spy(model, names, example_inputs, **kw):
        timed.append((model, list(names)))
        raise Stop

    monkeypatch.setattr(P, "time_tables", spy)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24)).train()
    ids = {"input_ids": torch.randint(0, 50, (2, 5))}
    with pytest.raises(Stop):
        sparsert.Pruner(bert, target_speedup=1.5, example_inputs=ids, threads=1, forward=forward)
    model, names = timed[-1]
    assert isinstance(model, StreamlinedEncoder) is (forward == "streamlined")
    assert "encoder.layer.0.attention.self.query" in names and model.get_submodule(names[0]) is not None
    assert bert.training and not hasattr(bert, "fused_layers")  # the user's model is left as it was
    with pytest.raises(Stop):
        sparsert.Pruner(tiny_mlp(), target_speedup=1.5, example_inputs=torch.randn(4, 32), threads=1, forward=forward)
    assert isinstance(timed[-1][0], nn.Sequential)
    with pytest.raises(ValueError, match="forward must be one of"):
        sparsert.Pruner(tiny_mlp(), target_speedup=1.5, example_inputs=torch.randn(4, 32), forward="onnx")


def test_served_sparse_runs_the_linears_left_plain_on_the_best_dense_path_like_its_baseline():
    # a planned model keeps some Linears plain (an lm_head, unplanned layers); measured against the best
    # dense path they must run there too, as `sparsert serve` runs them, or the sparse model pays
    # F.linear's pace for them (SmolLM2's lm_head: 11.4 vs 4.2 ms per token)
    from sparsert.nn import DenseLinear, SparseLinear
    from sparsert.planner.pruner import served_sparse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    model[0] = SparseLinear.from_dense(model[0], "csr")
    x = torch.randn(3, 32)
    served = served_sparse(model, "streamlined", "best_dense", x)
    assert served is not model and type(model[2]) is nn.Linear  # the caller's model is left as it was
    assert isinstance(served[0], SparseLinear) and type(served[2]) is DenseLinear
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=1e-5, atol=1e-5)
    eager = served_sparse(model, "streamlined", "torch", x)
    assert type(eager[2]) is nn.Linear
    # a model streamline takes is copied once (streamlined), and the caller's is left as it was
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24)).eval()
    ids = {"input_ids": torch.randint(0, 50, (2, 5))}
    lean = served_sparse(bert, "streamlined", "best_dense", ids)
    assert type(lean.encoder.layer[0].attention.self.qkv) is DenseLinear
    assert type(bert.encoder.layer[0].attention.self.query) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(lean(**ids).last_hidden_state, bert(**ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
