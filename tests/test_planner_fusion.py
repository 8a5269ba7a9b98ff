"""The planner and the layers the served model runs as one call (Q/K/V, gate/up of one format)."""

from __future__ import annotations

import itertools

import pytest
import torch

import sparsert
from sparsert.convert.streamline import fusion_groups, streamline
from sparsert.planner import tables as T
from sparsert.planner.plan import build_plan, fixed_plan, two_level_plan, uniform_plan, uniform_points
from sparsert.prune.allocation import SensitivityTable
from planner_util import cache, synthetic_timing  # noqa: F401  (fixtures)

GROUP = ("q", "k", "v")


def _tables(fused_dense=2.0, fused_at=None, k_half=0.55, fused_formats=None):
    """q, k, v (one group) and o, 1 s each dense, in a 10 s model. At 0.5 q's fastest format is
    bitmask16 and k's and v's csr; at 0.9 all csr. The group as one call: ``fused_dense`` dense, and
    ``fused_at`` ({sparsity: (seconds, kind)}) sparse, the fastest format; ``fused_formats``
    ({sparsity: {kind: seconds}}): every format timed there. ``k_half``: k's time at 0.5."""
    own = {"q": {0.5: (0.5, "bitmask16"), 0.9: (0.2, "csr")}, "k": {0.5: (k_half, "csr"), 0.9: (0.25, "csr")},
           "v": {0.5: (0.55, "csr"), 0.9: (0.25, "csr")}, "o": {0.5: (0.6, "csr"), 0.9: (0.3, "csr")}}
    layers = {n: T.LayerTimes(n, "Linear", (8, 8), (1, 8), 1.0, 1.5, {"unstructured": dict(pts)})
              for n, pts in own.items()}
    fused_at = {0.5: (1.0, "csr"), 0.9: (0.45, "csr")} if fused_at is None else fused_at
    fused = {GROUP: T.LayerTimes("q+k+v", "Linear", (24, 8), (1, 8), fused_dense, 1.5 * fused_dense,
                                 {"unstructured": dict(fused_at)},
                                 {"unstructured": dict(fused_formats)} if fused_formats else {})}
    return T.TimeTables(layers, "best_dense", 10.0, 1, {}, fused=fused)


def _sens(errors):
    return {"unstructured": SensitivityTable([0.5, 0.9], {n: list(e) for n, e in errors.items()},
                                             {n: 64 for n in errors})}


SENS = _sens({"q": (0.2, 0.6), "k": (0.1, 0.3), "v": (0.3, 0.5), "o": (0.25, 0.7)})


def test_a_fused_group_counts_as_one_call_in_the_baseline_and_the_remainder():
    tab = _tables()
    assert tab.layer_seconds == pytest.approx(2.0 + 1.0)  # the group's one call + o
    assert tab.remainder == pytest.approx(10.0 - 3.0)
    # every layer dense predicts the model: the baseline is the model as served, the group fused
    plan = fixed_plan(tab, SENS, 1.1, {})
    assert plan.predicted_seconds == pytest.approx(10.0) and plan.predicted_speedup == pytest.approx(1.0)
    assert [l.fused for l in plan.layers] == ["q+k+v"] * 3 + [""] and plan["o"].seconds == 1.0


def test_fixed_and_uniform_plans_run_a_group_at_one_point_as_one_call():
    tab = _tables()
    plan = uniform_plan(tab, SENS, 1.2, "unstructured", 0.9)
    # q, k, v at 0.9 share csr: one call of 0.45 s, shared in proportion to 0.2 / 0.25 / 0.25
    assert [plan[n].seconds for n in GROUP] == pytest.approx([0.45 * 0.2 / 0.7, 0.45 * 0.25 / 0.7, 0.45 * 0.25 / 0.7])
    assert {plan[n].format for n in GROUP} == {"csr"} and {plan[n].fused for n in GROUP} == {"q+k+v"}
    assert plan.predicted_seconds == pytest.approx(7.0 + 0.45 + 0.3)
    points = {(p, s): sp for p, s, sp, _ in uniform_points(tab, SENS)}
    assert points[("unstructured", 0.9)] == pytest.approx(plan.predicted_speedup)
    # at 0.5 the layers' own formats differ (q bitmask16): fused only where that is faster. Here it is
    # (1.0 s < 1.6 s), and every layer of the group is packed in the fused Linear's format
    half = uniform_plan(tab, SENS, 1.2, "unstructured", 0.5)
    assert {half[n].format for n in GROUP} == {"csr"} and half.predicted_seconds == pytest.approx(7.0 + 1.0 + 0.6)
    slow = uniform_plan(_tables(fused_at={0.5: (2.5, "csr"), 0.9: (0.45, "csr")}), SENS, 1.2, "unstructured", 0.5)
    assert slow["q"].format == "bitmask16" and not slow["q"].fused
    assert slow.predicted_seconds == pytest.approx(7.0 + 1.6 + 0.6)
    # dense and sparse layers of one group run as separate calls
    mixed = fixed_plan(tab, SENS, 1.2, {"q": ("unstructured", 0.5), "k": ("unstructured", 0.9)})
    assert not any(l.fused for l in mixed.layers)
    assert mixed.predicted_seconds == pytest.approx(7.0 + 0.5 + 0.25 + 1.0 + 1.0)
    # sparse layers at different points run as one call when the fused Linear has one format at both:
    # each its rows' share of the fused time at its own point
    apart = fixed_plan(tab, SENS, 1.2, {"q": ("unstructured", 0.5), "k": ("unstructured", 0.9),
                                        "v": ("unstructured", 0.9)})
    assert {apart[n].format for n in GROUP} == {"csr"} and {apart[n].fused for n in GROUP} == {"q+k+v"}
    assert [apart[n].seconds for n in GROUP] == pytest.approx([1.0 * 0.5 / 1.6, 0.45 * 0.25 / 0.7, 0.45 * 0.25 / 0.7])
    two_kinds = _tables(fused_at={0.5: (1.0, "bitmask16"), 0.9: (0.45, "csr")})
    apart = fixed_plan(two_kinds, SENS, 1.2, {"q": ("unstructured", 0.5), "k": ("unstructured", 0.9),
                                              "v": ("unstructured", 0.9)})
    assert not any(l.fused for l in apart.layers)  # no one format for the fused Linear: separate calls
    # ... unless the fused Linear was timed in one format at both points too (not the fastest at 0.5):
    # then q, k and v are repacked in it and run as one call, each its share at its own point
    both = _tables(fused_at={0.5: (1.0, "bitmask16"), 0.9: (0.45, "csr")},
                   fused_formats={0.5: {"bitmask16": 1.0, "csr": 1.1}, 0.9: {"csr": 0.45, "bitmask16": 0.6}})
    apart = fixed_plan(both, SENS, 1.2, {"q": ("unstructured", 0.5), "k": ("unstructured", 0.9),
                                         "v": ("unstructured", 0.9)})
    assert {apart[n].format for n in GROUP} == {"csr"} and {apart[n].fused for n in GROUP} == {"q+k+v"}
    assert [apart[n].seconds for n in GROUP] == pytest.approx([1.1 * 0.5 / 1.6, 0.45 * 0.25 / 0.7, 0.45 * 0.25 / 0.7])
    # layers sharing a format run as one call in it when served, or repacked in a quicker one
    for fast_09, kind in ((0.9, "csr"), (0.3, "bitmask16")):
        tab = _tables(fused_at={0.5: (0.9, "bitmask16"), 0.9: (0.45, "csr")},
                      fused_formats={0.5: {"bitmask16": 0.9, "csr": 1.0}, 0.9: {"csr": 0.45, "bitmask16": fast_09}})
        same = fixed_plan(tab, SENS, 1.2, {n: ("unstructured", 0.5) for n in "kv"} | {"q": ("unstructured", 0.9)})
        assert {same[n].format for n in GROUP} == {kind} and {same[n].fused for n in GROUP} == {"q+k+v"}
        t = {"csr": (0.45, 1.0), "bitmask16": (0.3, 0.9)}[kind]
        assert sum(same[n].seconds for n in GROUP) == pytest.approx(t[0] * 0.2 / 0.7 + t[1] * (0.55 + 0.55) / 1.6)
    assert "run as one call" not in mixed.table()
    assert "run as one call" in plan.table() and "csr*" in plan.table()


@pytest.mark.parametrize("fused_at, k_half", [(None, 0.55), ({0.5: (2.5, "csr"), 0.9: (0.45, "csr")}, 0.55),
                                              ({0.9: (0.8, "csr")}, 0.55), (None, 1.2),
                                              ({0.5: (1.0, "bitmask16"), 0.9: (0.45, "csr")}, 0.55),
                                              ({0.5: (1.0, "bitmask16"), 0.9: (0.45, "csr"),
                                                "formats": {0.5: {"bitmask16": 1.0, "csr": 1.3},
                                                            0.9: {"csr": 0.45, "bitmask16": 0.5}}}, 0.55)])
@pytest.mark.parametrize("saved", [0.5, 1.2, 1.85, 2.4, 3.1])
def test_the_solver_is_the_exact_optimum_over_every_choice_as_served(fused_at, k_half, saved):
    # brute force: every layer dense, 0.5 or 0.9; each choice timed as served (fixed_plan). The solver,
    # which sees the group as one item, must find the least loss that fits, and predict it alike (with
    # k_half=1.2, k alone at 0.5 is slower than dense, but the group at 0.5 in one call is not)
    fused_at = dict(fused_at) if fused_at else None
    formats = fused_at.pop("formats", None) if fused_at else None
    tab = _tables(fused_at=fused_at, k_half=k_half, fused_formats=formats)
    target = 10.0 / (10.0 - saved)
    best = None
    for choice in itertools.product([None, 0.5, 0.9], repeat=4):
        p = fixed_plan(tab, SENS, target, {n: ("unstructured", s) for n, s in zip("qkvo", choice) if s is not None})
        if p.predicted_speedup >= target * (1 - 1e-9) and (best is None or p.loss < best.loss - 1e-12):
            best = p
    if best is None:  # beyond every choice: the solver says so
        with pytest.raises(ValueError, match="not reachable"):
            build_plan(tab, SENS, target, bins=20000)
        return
    plan = build_plan(tab, SENS, target, bins=20000)
    assert plan.loss == pytest.approx(best.loss)
    assert plan.predicted_speedup >= target * (1 - 1e-6)
    again = fixed_plan(tab, SENS, target, {l.name: (l.pattern, l.sparsity) for l in plan.pruned})
    assert again.predicted_seconds == pytest.approx(plan.predicted_seconds)
    assert [l.format for l in again.layers] == [l.format for l in plan.layers]
    split = two_level_plan(tab, SENS, 10.0 / 8.6, "unstructured", 0.5, 0.9, bins=20000)
    assert split.predicted_speedup >= 10.0 / 8.6 * (1 - 1e-6)
    # two levels leave no layer dense, even where the group dense in one call would fit
    loose = two_level_plan(tab, SENS, 1.0001, "unstructured", 0.5, 0.9, bins=20000)
    assert {(l.pattern, l.sparsity) for l in loose.layers} == {("unstructured", 0.5)}


def test_fusion_groups_name_qkv_and_gate_up_of_streamlined_models():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=24)).eval()
    assert fusion_groups(streamline(bert, fuse_qkv=False)) == [
        tuple(f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")) for i in range(2)]
    assert fusion_groups(streamline(bert)) == [] and fusion_groups(bert) == []  # already fused; not streamlined
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()
    assert fusion_groups(streamline(lm, fuse_qkv=False)) == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")]


def test_the_planner_times_fused_groups_and_the_served_model_fuses_what_the_plan_says(cache, synthetic_timing):
    # the tables hold each Q/K/V group as one Linear of the stacked rows; a plan that puts a group in one
    # format must come out of sparsify fused when served, and the plan's prediction counts it so
    transformers = pytest.importorskip("transformers")
    from sparsert.planner.pruner import served_sparse

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64)).eval()
    ids = {"input_ids": torch.randint(0, 50, (2, 8))}
    pruner = sparsert.Pruner(bert, "magnitude", target_speedup=1.3, example_inputs=ids, threads=1,
                             patterns=("unstructured",), sparsities=(0.5, 0.9), score_candidates=0)
    tab = pruner.tables
    assert sorted(tab.fused) == [tuple(f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value"))
                                 for i in range(2)]
    for group, lt in tab.fused.items():
        assert lt.shape == (96, 32) and "unstructured" in lt.options
    plan = uniform_plan(tab, pruner.sensitivity_tables or _magnitude_sens(pruner), 1.0001, "unstructured", 0.9)
    assert {plan[n].fused for g in tab.fused for n in g} == {"+".join(g) for g in tab.fused}
    pruner._plan = plan
    pruner.model.eval()
    for lp in plan.pruned:  # prune as planned, by magnitude
        w = pruner.model.get_submodule(lp.name).weight
        with torch.no_grad():
            w.mul_(w.abs() > w.abs().flatten().kthvalue(int(w.numel() * lp.sparsity)).values)
    served = served_sparse(pruner.sparsify(ids), "streamlined", "best_dense", ids)
    for i in range(2):
        assert hasattr(served.encoder.layer[i].attention.self, "qkv")


def _magnitude_sens(pruner):
    from sparsert.prune.allocation import sensitivity_tables

    return sensitivity_tables(pruner.model, pruner.layers, None, (0.5, 0.9), patterns=("unstructured",))
