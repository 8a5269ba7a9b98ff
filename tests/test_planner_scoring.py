"""End-to-end scoring of candidate plans: candidates, the measured output error, the choice."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import sparsert
from sparsert.planner import pruner as pruner_mod
from sparsert.planner import scoring
from sparsert.planner import tables as T
from sparsert.planner.plan import build_plan, fixed_plan
from sparsert.prune import Pruner as KernelFreePruner
from sparsert.prune.allocation import SensitivityTable
from planner_util import cache, synthetic_timing, tiny_mlp  # noqa: F401  (cache, synthetic_timing: fixtures)

TINY_TIMING = dict(min_time=0.002, rounds=1, model_min_time=0.01)


class _LoudAndQuiet(nn.Module):
    """``loud(x) + 1e-3 * quiet(x)``: pruning ``quiet`` barely moves the output, pruning ``loud`` does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.loud(x) + 1e-3 * self.quiet(x)


def _tables(names=("loud", "quiet"), total=10.0, dense=3.0, opts=None):
    """Two layers of 3 s in a 10 s model (remainder 4 s)."""
    opts = opts or {"unstructured": {0.5: (1.5, "csr"), 0.9: (0.6, "csr")}, "4x1": {0.5: (1.4, "bsr4x1")}}
    layers = {n: T.LayerTimes(n, "Linear", (16, 16), (1, 16), dense, dense * 1.5, {p: dict(v) for p, v in opts.items()})
              for n in names}
    return T.TimeTables(layers, "best_dense", total, 1, {})


def _sens(errors):
    """``{pattern: {layer: (err@0.5, err@0.9)}}`` -> sensitivity tables."""
    return {p: SensitivityTable([0.5, 0.9], {n: list(e) for n, e in errs.items()}, {n: 256 for n in errs}, p)
            for p, errs in errors.items()}


# the per-layer estimate is wrong on purpose: it calls "loud" cheap and "quiet" expensive with
# unstructured masks, but (with 4x1) "quiet" cheap and "loud" expensive
MISLEADING = _sens({"unstructured": {"loud": (0.01, 0.05), "quiet": (0.5, 0.9)},
                    "4x1": {"loud": (0.9, 0.9), "quiet": (0.02, 0.02)}})


def _magnitude_prune(model, plan):
    pruned = plan.pruned
    if not pruned:
        return
    kp = KernelFreePruner(model, "magnitude", include=[l.name for l in pruned],
                          overrides={re.escape(l.name): {"sparsity": l.sparsity, "pattern": l.pattern} for l in pruned})
    kp.step()


def test_candidates_reach_the_target_and_uniform_takes_the_least_sparsity_that_does():
    tables = _tables()
    target = 10 / 8.6  # 1.5 s to save: one layer at 50%, or both (budget 4.6 s of layers)
    cands = scoring.candidate_plans(tables, MISLEADING, target, bins=1000)
    labels = [label for label, _ in cands]
    assert labels[0] == "plan"
    # uniform unstructured: 0.5 on both layers saves 3 s >= 1.4 s, so 0.5 (not 0.9) is the least that fits
    assert "uniform unstructured@0.5" in labels and "uniform unstructured@0.9" not in labels
    assert "uniform 4x1@0.5" in labels
    for label, plan in cands:
        assert plan.label == label
        assert plan.predicted_speedup >= target * (1 - 1e-9), label
        assert plan.predicted_seconds <= tables.model_seconds / target * (1 + 1e-9), label
        if label.startswith("uniform"):
            pattern, s = label.split()[1].split("@")
            assert all(l.pattern == pattern and l.sparsity == float(s) for l in plan.layers), label
            assert plan.loss == pytest.approx(sum(MISLEADING[pattern].error(l.name, float(s)) ** 2
                                                  for l in plan.layers))
    # distinct choices only: "plan unstructured only" is the same as "plan" here and is left out
    sigs = [tuple((l.name, l.pattern, l.sparsity) for l in p.layers) for _, p in cands]
    assert len(set(sigs)) == len(sigs)
    assert [label for label, _ in scoring.candidate_plans(tables, MISLEADING, target, bins=1000, limit=2)] \
        == labels[:2]


def test_a_pattern_that_cannot_reach_the_target_gives_no_uniform_candidate():
    tables = _tables()
    target = 10 / 6.0  # 4 s to save: only unstructured 0.9 on both layers (1.2 s of layers) does it
    labels = [label for label, _ in scoring.candidate_plans(tables, MISLEADING, target, bins=1000)]
    assert "uniform unstructured@0.9" in labels
    assert not any("4x1" in label for label in labels)  # 4x1 at 0.5 saves at most 3.2 s


def test_a_uniform_candidate_that_overshoots_is_split_over_two_grid_steps():
    tables = _tables()
    target = 10 / 6.5  # 2.5 s of layers: 0.5 on both (3.0 s) misses, 0.9 on both (1.2 s) overshoots to 1.92x
    cands = dict(scoring.candidate_plans(tables, MISLEADING, target, bins=1000))
    assert "uniform unstructured@0.9" not in cands
    split = cands["uniform unstructured@0.5/0.9"]
    # the solver lifts the layer whose 0.9 costs least (loud: 0.05^2 against quiet's 0.9^2) and keeps the other at 0.5
    assert {l.name: (l.pattern, l.sparsity) for l in split.layers} == {"loud": ("unstructured", 0.9),
                                                                      "quiet": ("unstructured", 0.5)}
    assert split.predicted_speedup == pytest.approx(10 / 6.1)  # 1.64x: still reaches 1.54x, no longer 1.92x
    assert split.loss == pytest.approx(0.05 ** 2 + 0.5 ** 2)
    # within 2% of the target, the plain uniform point stays (here it is the solver's plan too, so listed once)
    near = dict(scoring.candidate_plans(tables, MISLEADING, 10 / 5.22, bins=1000))
    assert not any("/" in label for label in near)
    assert [(l.pattern, l.sparsity) for l in near["plan"].layers] == [("unstructured", 0.9)] * 2


def test_scoring_picks_the_candidate_with_the_least_measured_error():
    model = _LoudAndQuiet().eval()
    tables = _tables()
    target = 10 / 8.6
    cands = scoring.candidate_plans(tables, MISLEADING, target, bins=1000)
    # the solver trusts the misleading estimate and prunes "loud"
    assert cands[0][1]["loud"].pattern == "unstructured" and cands[0][1]["quiet"].pattern is None
    batches = [torch.randn(8, 16) for _ in range(2)]
    scored = scoring.score_candidates(model, cands, _magnitude_prune, batches, metric="mse")
    chosen = [c for c in scored if c.chosen]
    assert len(chosen) == 1
    # the answer is known: only the candidate that leaves "loud" dense keeps the output
    assert chosen[0].plan["loud"].pattern is None and chosen[0].plan["quiet"].pattern is not None
    assert chosen[0].label == "plan 4x1 only"
    assert chosen[0].mse == min(c.mse for c in scored) and chosen[0].mse < 1e-4
    assert all(c.mse > 1e-3 for c in scored if not c.chosen)
    # the errors are the real output errors of each pruned copy, and the model itself is untouched
    ref = scoring.reference_outputs(model, batches)
    for c in scored:
        trial = _LoudAndQuiet().eval()
        trial.load_state_dict(model.state_dict())
        _magnitude_prune(trial, c.plan)
        with torch.no_grad():
            num = sum(float(((trial(b).double() - r) ** 2).sum()) for b, r in zip(batches, ref))
            den = sum(float((r ** 2).sum()) for r in ref)
            cos = torch.cat([nn.functional.cosine_similarity(trial(b).double(), r, dim=-1)
                             for b, r in zip(batches, ref)])
        assert c.mse == pytest.approx(num / den, rel=1e-4)
        assert c.cosine_error == pytest.approx(1 - float(cos.mean()), rel=1e-4, abs=1e-6)
    assert not bool((model.loud.weight == 0).any()) and not bool((model.quiet.weight == 0).any())
    text = "\n".join(scoring.candidates_table(scored))
    assert "<- chosen" in text and "plan 4x1 only" in text and "uniform unstructured@0.5" in text


def test_output_error_leaves_padded_tokens_out():
    ref = [torch.randn(2, 3, 4)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = ref[0].clone()
    out[0, 2] += 100.0  # a padded position: must not count
    out[1, 1] *= -1.0   # padded too

    class Fixed(nn.Module):
        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": out.float()}

    cos_err, mse = scoring.output_error(Fixed(), ref, [{"input_ids": torch.zeros(2, 3), "attention_mask": mask}])
    assert cos_err == pytest.approx(0.0, abs=1e-6) and mse == pytest.approx(0.0, abs=1e-12)
    cos_err, _ = scoring.output_error(Fixed(), ref, [{"input_ids": torch.zeros(2, 3),
                                                     "attention_mask": torch.ones(2, 3)}])
    assert cos_err > 0.1


def test_pooled_cosine_is_the_cosine_of_each_sample_s_token_average():
    torch.manual_seed(3)
    ref, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    class Fixed(nn.Module):
        def forward(self, input_ids, attention_mask):
            return out

    errors = scoring.output_errors(Fixed(), [ref], [{"input_ids": torch.zeros(2, 3), "attention_mask": mask}])
    m = mask[..., None].double()
    expected = nn.functional.cosine_similarity((out.double() * m).sum(1) / m.sum(1),
                                               (ref.double() * m).sum(1) / m.sum(1), dim=-1)
    assert errors["pooled_cosine"] == pytest.approx(1 - float(expected.mean()), rel=1e-5)
    # the token average is not the average of the tokens' cosines
    assert errors["pooled_cosine"] != pytest.approx(errors["cosine"], rel=1e-3)
    assert (errors["cosine"], errors["mse"]) == scoring.output_error(
        Fixed(), [ref], [{"input_ids": torch.zeros(2, 3), "attention_mask": mask}])
    # one vector per sample (logits, a classifier's output): pooling changes nothing
    flat = scoring.output_errors(nn.Identity(), [ref[:, 0]], [out[:, 0]])
    assert flat["pooled_cosine"] == pytest.approx(flat["cosine"], rel=1e-6)
    # a feature map (batch, channels, h, w) is one vector per sample, not averaged over channels
    fmap_ref, fmap = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    fm = scoring.output_errors(nn.Identity(), [fmap_ref], [fmap])
    whole = nn.functional.cosine_similarity(fmap.reshape(2, -1).double(), fmap_ref.reshape(2, -1).double(), dim=-1)
    assert fm["pooled_cosine"] == pytest.approx(1 - float(whole.mean()), rel=1e-6)


def test_the_choice_follows_the_metric():
    model = _LoudAndQuiet().eval()
    cands = scoring.candidate_plans(_tables(), MISLEADING, 10 / 8.6, bins=1000)
    batches = [torch.randn(8, 16) for _ in range(2)]
    for metric in scoring.METRICS:
        scored = scoring.score_candidates(model, cands, _magnitude_prune, batches, metric=metric)
        chosen = next(c for c in scored if c.chosen)
        assert chosen.metric == metric and chosen.error == min(c.error for c in scored)
        assert all(c.pooled_cosine_error is not None for c in scored)
    assert "1 - pooled cos" in "\n".join(scoring.candidates_table(scored))


def test_score_candidates_rejects_bad_input():
    model = _LoudAndQuiet().eval()
    cands = scoring.candidate_plans(_tables(), MISLEADING, 10 / 8.6, bins=1000)
    with pytest.raises(ValueError, match="metric"):
        scoring.score_candidates(model, cands, _magnitude_prune, [torch.randn(2, 16)], metric="l1")
    with pytest.raises(ValueError, match="held-out batch"):
        scoring.score_candidates(model, cands, _magnitude_prune, [])


# ---------------------------------------------------------------- through sparsert.Pruner




def _pruner(n, **kw):
    x = torch.randn(4, 32)
    p = sparsert.Pruner(tiny_mlp(), "wanda", target_speedup=1.05, example_inputs=x, threads=1, sparsities=(0.5, 0.9),
                        timing=TINY_TIMING, **kw)
    # fixed times instead of this machine's (the candidates must not depend on the load): every pattern pays
    opts = {"unstructured": {0.5: (2.0, "csr"), 0.9: (0.8, "csr")}, "4x1": {0.5: (2.2, "bsr4x1"), 0.9: (0.9, "bsr4x1")},
            "2:4": {0.5: (2.4, "nm2:4")}}
    p.tables = _tables(names=("0", "2", "4"), total=12.0, opts=opts)  # remainder 3 s, layers 3 x 3 s
    torch.manual_seed(n)
    p.calibrate([torch.randn(8, 32) for _ in range(4)])
    return p


def test_pruner_chooses_the_scored_candidate_and_off_is_the_solver_plan(cache, synthetic_timing):
    off = _pruner(0, score_candidates=0)
    plan_off = off.plan
    solver = build_plan(off.tables, off.sensitivity_tables, 1.05, bins=off.bins)
    assert plan_off.candidates == [] and plan_off.label == "plan"
    assert [(l.pattern, l.sparsity) for l in plan_off.layers] == [(l.pattern, l.sparsity) for l in solver.layers]
    assert "chosen" not in plan_off.table()

    on = _pruner(0, score_candidates=5, sensitivity=off.sensitivity_tables, calibrate_groups=False)
    plan = on.plan
    cands = plan.candidates
    assert plan.probes == []
    # plan, uniform unstructured@0.5, uniform 4x1@0.5, uniform 2:4, then a single-pattern plan (limit 5)
    assert len(cands) == 5, [c.label for c in cands]
    assert [c.label for c in cands[1:4]] == ["uniform 2:4@0.5", "uniform 4x1@0.5", "uniform unstructured@0.5"]
    assert cands[0].label == "plan"
    assert [(l.pattern, l.sparsity) for l in cands[0].plan.layers] == [(l.pattern, l.sparsity) for l in solver.layers]
    chosen = [c for c in cands if c.chosen]
    assert len(chosen) == 1 and chosen[0].plan is plan and plan.label == chosen[0].label
    assert chosen[0].cosine_error == min(c.cosine_error for c in cands)
    assert all(c.plan.predicted_speedup >= 1.05 * (1 - 1e-9) for c in cands)
    assert any(c.label.startswith("uniform") for c in cands)
    text = plan.table()
    assert "<- chosen" in text and f"chosen: {plan.label}" in text
    assert plan.as_dict()["candidates"][0]["label"] == "plan"
    # the scoring pruned copies: the pruner's model is untouched until step()
    assert not any(bool((m.weight == 0).any()) for m in on.model if isinstance(m, nn.Linear))
    on.step()
    for lp in plan.layers:
        w = on.model.get_submodule(lp.name).weight
        assert bool((w == 0).any()) == (lp.pattern is not None), lp.name


@pytest.mark.parametrize("own", [False, True])
def test_pruner_scores_on_its_own_batches_or_on_held_out_calibration_ones(cache, synthetic_timing, monkeypatch, own):
    seen = {}
    real = scoring.reference_outputs

    def spy(model, batches):
        seen["score"] = list(batches)
        return real(model, batches)

    monkeypatch.setattr(scoring, "reference_outputs", spy)
    torch.manual_seed(7)
    own_batches = [torch.randn(8, 32) for _ in range(3)]
    p = _pruner(1, score_candidates=3, **(dict(score_data=own_batches) if own else {}))
    calib = list(p._data)
    assert p.plan.candidates
    if own:  # every calibration batch prunes; the given ones choose
        assert [b is o for b, o in zip(seen["score"], own_batches)] == [True] * 3
    else:  # a quarter of the 4 calibration batches held out: the last one
        assert len(seen["score"]) == 1 and seen["score"][0] is calib[-1]


def test_pruner_without_calibration_data_does_not_score(cache, synthetic_timing):
    x = torch.randn(4, 32)
    p = sparsert.Pruner(tiny_mlp(), "magnitude", target_speedup=1.05, example_inputs=x, threads=1, sparsities=(0.5, 0.9),
                        timing=TINY_TIMING)
    assert p.plan.candidates == []


@pytest.mark.parametrize("kw, match", [(dict(score_candidates=-1), "score_candidates"),
                                       (dict(score_candidates=True), "score_candidates"),
                                       (dict(score_batches=0), "score_batches"),
                                       (dict(score_data=[]), "score_data is empty"),
                                       (dict(score_data=[torch.randn(2, 32)], score_batches=1), "not both"),
                                       (dict(score_metric="l1"), "score_metric"),
                                       (dict(calibrate_groups="yes"), "calibrate_groups"),
                                       (dict(max_groups=0), "max_groups"),
                                       (dict(max_groups=True), "max_groups"),
                                       (dict(measure_candidates=1), "measure_candidates")])
def test_pruner_rejects_bad_scoring_options(cache, synthetic_timing, kw, match):
    with pytest.raises(ValueError, match=match):
        sparsert.Pruner(tiny_mlp(), "wanda", target_speedup=1.05, example_inputs=torch.randn(4, 32), threads=1,
                        sparsities=(0.5, 0.9), timing=TINY_TIMING, **kw)


# ---------------------------------------------------------------- losses calibrated end to end


def test_layer_groups_join_the_same_layer_of_every_block():
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense",
             "encoder.layer.11.attention.self.query", "encoder.layer.11.output.dense", "pooler.dense", "0", "2",
             "blocks.3.conv.1"]
    assert scoring.layer_groups(names) == {
        "encoder.layer.*.attention.self.query": ["encoder.layer.0.attention.self.query",
                                                 "encoder.layer.11.attention.self.query"],
        "encoder.layer.*.output.dense": ["encoder.layer.0.output.dense", "encoder.layer.11.output.dense"],
        "pooler.dense": ["pooler.dense"], "0": ["0"], "2": ["2"],  # a Sequential's layers are not blocks
        "blocks.*.conv.1": ["blocks.3.conv.1"]}
    assert scoring.layer_groups([]) == {}


def test_fixed_plan_prunes_the_named_layers_and_leaves_the_rest_dense():
    tables = _tables()
    plan = fixed_plan(tables, MISLEADING, 1.1, {"quiet": ("4x1", 0.5)})
    assert plan["loud"].pattern is None and plan["loud"].seconds == 3.0
    assert (plan["quiet"].pattern, plan["quiet"].sparsity, plan["quiet"].format) == ("4x1", 0.5, "bsr4x1")
    assert plan.predicted_seconds == pytest.approx(4.0 + 3.0 + 1.4)
    assert plan.loss == pytest.approx(0.02 ** 2)
    with pytest.raises(KeyError, match="not in the time tables"):
        fixed_plan(tables, MISLEADING, 1.1, {"nope": ("4x1", 0.5)})
    with pytest.raises(KeyError):
        fixed_plan(tables, MISLEADING, 1.1, {"quiet": ("4x1", 0.9)})  # not a timed point


def _four_layer_tables():
    """Layers a0, a1 (group a) and b0, b1 (group b), 2 s each dense in a 10 s model."""
    opts = {"unstructured": {0.5: (1.2, "csr"), 0.9: (0.5, "csr")}}
    return _tables(names=("a0", "a1", "b0", "b1"), total=10.0, dense=2.0, opts=opts)


def test_build_plan_with_groups_is_the_exact_optimum_over_group_choices():
    import itertools

    tables = _four_layer_tables()
    sens = _sens({"unstructured": {"a0": (0.1, 0.3), "a1": (0.2, 0.9), "b0": (0.3, 0.4), "b1": (0.05, 0.5)}})
    groups = {"a": ["a0", "a1"], "b": ["b0", "b1"]}
    target = 10 / 7.0  # 3 s of the 8 s of layers to save
    plan = build_plan(tables, sens, target, bins=1000, groups=groups)
    for members in groups.values():  # one choice per group
        assert len({(plan[n].pattern, plan[n].sparsity) for n in members}) == 1
    # brute force over the group choices: dense, 0.5 or 0.9 for each group
    best = None
    for ca, cb in itertools.product([None, 0.5, 0.9], repeat=2):
        choice = {n: ("unstructured", s) for g, s in (("a", ca), ("b", cb)) if s is not None for n in groups[g]}
        p = fixed_plan(tables, sens, target, choice)
        if p.predicted_speedup >= target * (1 - 1e-9) and (best is None or p.loss < best.loss - 1e-12):
            best = p
    assert [(l.pattern, l.sparsity) for l in plan.layers] == [(l.pattern, l.sparsity) for l in best.layers]
    assert plan.loss == pytest.approx(best.loss)
    # per layer the solver can do better than (or as well as) one choice per group
    assert build_plan(tables, sens, target, bins=1000).loss <= plan.loss + 1e-12
    # a layer left out of every group is a group of its own
    part = build_plan(tables, sens, target, bins=1000, groups={"a": ["a0", "a1"]})
    assert part.predicted_speedup >= target * (1 - 1e-9)


def test_build_plan_rejects_bad_groups():
    tables = _four_layer_tables()
    sens = _sens({"unstructured": {n: (0.1, 0.3) for n in ("a0", "a1", "b0", "b1")}})
    with pytest.raises(ValueError, match="not in the tables"):
        build_plan(tables, sens, 1.2, groups={"a": ["a0", "zz"]})
    with pytest.raises(ValueError, match="more than one group"):
        build_plan(tables, sens, 1.2, groups={"a": ["a0", "a1"], "b": ["a1", "b0"]})
    with pytest.raises(ValueError, match="not reachable"):
        build_plan(tables, sens, 100.0, groups={"a": ["a0", "a1"]})


def test_scaled_sensitivity_multiplies_the_losses_and_leaves_the_input_alone():
    scaled = scoring.scaled_sensitivity(MISLEADING, {"loud": 4.0})
    for pattern in MISLEADING:
        for s in (0.5, 0.9, 0.7):
            assert scaled[pattern].error("loud", s) ** 2 == pytest.approx(4.0 * MISLEADING[pattern].error("loud", s) ** 2)
            assert scaled[pattern].error("quiet", s) == MISLEADING[pattern].error("quiet", s)
    assert MISLEADING["unstructured"].errors["loud"] == [0.01, 0.05]


def test_group_weights_are_error_per_loss_and_a_zero_loss_takes_the_median():
    probes = [scoring.GroupProbe("a", ["a0", "a1"], "unstructured", 0.5, 2.0, 0.2),
              scoring.GroupProbe("b", ["b0"], "unstructured", 0.5, 0.5, 0.5),
              scoring.GroupProbe("c", ["c0"], "unstructured", 0.5, 1.0, 0.3),
              scoring.GroupProbe("z", ["z0"], "unstructured", 0.5, 0.0, 0.1)]
    w = scoring.group_weights(probes)
    assert w == pytest.approx({"a0": 0.1, "a1": 0.1, "b0": 1.0, "c0": 0.3, "z0": 0.3})
    assert math.isnan(probes[3].weight)
    assert scoring.group_weights([scoring.GroupProbe("z", ["z0"], "4x1", 0.5, 0.0, 0.1)]) == {"z0": 1.0}


def test_probes_measure_each_group_alone_and_the_calibrated_plan_follows_them():
    model = _LoudAndQuiet().eval()
    tables = _tables()
    target = 10 / 8.6
    batches = [torch.randn(8, 16) for _ in range(2)]
    groups = scoring.layer_groups(list(tables.layers))
    assert groups == {"loud": ["loud"], "quiet": ["quiet"]}
    probes = scoring.probe_groups(model, tables, MISLEADING, _magnitude_prune, batches, groups, "unstructured", 0.5,
                                  metric="mse")
    by = {p.group: p for p in probes}
    # each probe is the output error with only its group pruned, recomputed here independently
    ref = scoring.reference_outputs(model, batches)
    for g, p in by.items():
        trial = _LoudAndQuiet().eval()
        trial.load_state_dict(model.state_dict())
        _magnitude_prune(trial, fixed_plan(tables, MISLEADING, 1.0, {g: ("unstructured", 0.5)}))
        assert p.error == pytest.approx(scoring.output_error(trial, ref, batches)[1], rel=1e-6)
        assert p.loss == pytest.approx(MISLEADING["unstructured"].error(g, 0.5) ** 2)
    assert by["loud"].error > 100 * by["quiet"].error  # the estimate said the opposite
    assert by["loud"].weight > 1e4 * by["quiet"].weight
    assert not bool((model.loud.weight == 0).any())
    cands = dict(scoring.calibrated_candidates(tables, MISLEADING, target, probes, bins=1000))
    assert set(cands) == {"plan calibrated", "plan calibrated per group"}
    solver = build_plan(tables, MISLEADING, target, bins=1000)
    assert solver["loud"].pattern is not None and solver["quiet"].pattern is None  # fooled
    for label, plan in cands.items():
        assert plan.label == label and plan.predicted_speedup >= target * (1 - 1e-9)
        assert plan["loud"].pattern is None and plan["quiet"].pattern is not None, label  # not fooled
    text = "\n".join(scoring.probes_table(probes))
    assert "loud" in text and "weight" in text and "unstructured@0.5" in text
    with pytest.raises(ValueError, match="no group"):
        scoring.probe_groups(model, tables, MISLEADING, _magnitude_prune, batches, {}, "unstructured", 0.5)


def test_scoring_ties_and_nan_errors():
    plan = build_plan(_tables(), MISLEADING, 10 / 8.6, bins=1000)
    cs = [scoring.Candidate("a", plan, math.nan, math.nan), scoring.Candidate("b", plan, 0.2, 0.1),
          scoring.Candidate("c", plan, 0.2, 0.1)]
    out = scoring.choose(cs)
    assert [c.chosen for c in out] == [False, True, False]
    with pytest.raises(ValueError):
        scoring.choose([])


class _Blocks(nn.Module):
    """Three residual blocks of two Linears each: ``blocks.*.inp`` and ``blocks.*.out`` are the groups."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"inp": nn.Linear(16, 32), "out": nn.Linear(32, 16)})
                                    for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["out"](torch.relu(b["inp"](x)))
        return x


def test_pruner_calibrates_per_group_and_chooses_among_all_candidates(cache, synthetic_timing):
    x = torch.randn(4, 16)
    p = sparsert.Pruner(_Blocks().eval(), "wanda", target_speedup=1.05, example_inputs=x, threads=1,
                        sparsities=(0.5, 0.9), timing=TINY_TIMING, score_candidates=4, calibrate_groups=True)
    names = list(p.tables.layers)
    opts = {"unstructured": {0.5: (0.6, "csr"), 0.9: (0.25, "csr")}, "4x1": {0.5: (0.65, "bsr4x1"),
                                                                           0.9: (0.3, "bsr4x1")}}
    p.tables = _tables(names=names, total=8.0, dense=1.0, opts=opts)  # fixed times: 6 layers of 1 s, remainder 2 s
    torch.manual_seed(1)
    p.calibrate([torch.randn(8, 16) for _ in range(4)])
    plan = p.plan
    probes = plan.probes
    assert sorted(pr.group for pr in probes) == ["blocks.*.inp", "blocks.*.out"]
    best_uniform = min((c for c in plan.candidates if c.label.startswith("uniform")), key=lambda c: c.error)
    assert all((pr.pattern, pr.sparsity) == (best_uniform.plan.layers[0].pattern, best_uniform.plan.layers[0].sparsity)
               for pr in probes)
    labels = [c.label for c in plan.candidates]
    assert labels[0] == "plan" and len(labels) == len(set(labels))
    chosen = [c for c in plan.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].plan is plan
    assert chosen[0].error == min(c.error for c in plan.candidates)
    assert all(c.plan.predicted_speedup >= 1.05 * (1 - 1e-9) for c in plan.candidates)
    assert "calibrated end to end" in plan.table() and len(plan.as_dict()["probes"]) == 2
    # off (the default): the same candidates as before, no probes
    off = sparsert.Pruner(_Blocks().eval(), "wanda", target_speedup=1.05, example_inputs=x, threads=1,
                          sparsities=(0.5, 0.9), timing=TINY_TIMING, score_candidates=4,
                          sensitivity=p.sensitivity_tables)
    off.tables = p.tables
    off.calibrate([torch.randn(8, 16) for _ in range(4)])
    assert off.plan.probes == [] and not any("calibrated" in c.label for c in off.plan.candidates)
    # more groups than max_groups: not calibrated
    few = sparsert.Pruner(_Blocks().eval(), "wanda", target_speedup=1.05, example_inputs=x, threads=1,
                          sparsities=(0.5, 0.9), timing=TINY_TIMING, score_candidates=4, max_groups=1,
                          calibrate_groups=True,
                          sensitivity=p.sensitivity_tables)
    few.tables = p.tables
    few.calibrate([torch.randn(8, 16) for _ in range(4)])
    assert few.plan.probes == []


def test_a_candidate_measured_too_slow_does_not_win():
    plan = build_plan(_tables(), MISLEADING, 10 / 8.6, bins=1000)
    cs = [scoring.Candidate("best but slow", plan, 0.1, 0.1, measured_speedup=1.5),
          scoring.Candidate("worse, fast", plan, 0.2, 0.2, measured_speedup=1.9),
          scoring.Candidate("unmeasured", plan, 0.3, 0.3)]
    assert [c.chosen for c in scoring.choose(cs, target=2.0)] == [False, True, False]  # 1.9 >= 0.9 * 2
    assert [c.chosen for c in scoring.choose(cs, target=2.0, tolerance=0.01)] == [False, False, True]
    assert [c.chosen for c in scoring.choose(cs[:2], target=3.0)] == [True, False]  # none fast enough: least error
    assert [c.chosen for c in scoring.choose(cs)] == [True, False, False]  # no target: least error


def test_score_candidates_hands_the_pruned_copy_to_measure():
    model = _LoudAndQuiet().eval()
    cands = scoring.candidate_plans(_tables(), MISLEADING, 10 / 8.6, bins=1000)
    seen = []

    def measure(trial, plan):  # a known answer: the pruned copy's share of zero weights
        assert trial is not model
        zeros = sum(int((m.weight == 0).sum()) for m in (trial.loud, trial.quiet))
        seen.append(plan.label)
        return zeros / (2 * 16 * 16)

    scored = scoring.score_candidates(model, cands, _magnitude_prune, [torch.randn(4, 16)], measure=measure)
    assert seen == [label for label, _ in cands]
    for c in scored:
        want = sum(l.sparsity for l in c.plan.layers) / 2
        assert c.measured_speedup == pytest.approx(want, abs=0.02), c.label
    assert "measured" in "\n".join(scoring.candidates_table(scored))
    assert scored[0].as_dict()["measured_speedup"] == scored[0].measured_speedup


def test_pruner_measures_candidates_when_asked(cache, synthetic_timing):
    x = torch.randn(4, 16)
    p = sparsert.Pruner(_Blocks().eval(), "wanda", target_speedup=1.05, example_inputs=x, threads=1,
                        sparsities=(0.5, 0.9), timing=TINY_TIMING, score_candidates=2, calibrate_groups=False,
                        measure_candidates=True)
    opts = {"unstructured": {0.5: (0.6, "csr"), 0.9: (0.25, "csr")}, "4x1": {0.5: (0.65, "bsr4x1"),
                                                                           0.9: (0.3, "bsr4x1")}}
    p.tables = _tables(names=list(p.tables.layers), total=8.0, dense=1.0, opts=opts)  # fixed: 2 candidates
    p.calibrate([torch.randn(8, 16) for _ in range(4)])
    cands = p.plan.candidates
    # 2 candidates, and more when the chosen one measured > 5% off the target (a correction round)
    assert len(cands) >= 2 and all(c.measured_speedup is not None and c.measured_speedup > 0 for c in cands)
    fast = [c for c in cands if c.measured_speedup >= 1.05 * 0.9]
    close = [c for c in cands if abs(c.measured_speedup / 1.05 - 1) <= pruner_mod.MEASURED_TOLERANCE]
    chosen = next(c for c in cands if c.chosen)
    # the rule, whatever this machine measured
    if any("aimed" in c.label for c in cands) and close:
        assert chosen in close and chosen.error == min(c.error for c in close)
    elif fast:
        assert chosen in fast and chosen.error == min(c.error for c in fast)


def _measured_slower(total=8.0, factor=0.8, target=1.5, score_candidates=2):
    """A Pruner over _Blocks whose every candidate measures ``factor`` x its prediction (the tables
    mispredict the model by a constant, as a remainder measured wrong would)."""
    # (built with a target the tiny model's real tables reach, then given the synthetic ones and the target)
    p = sparsert.Pruner(_Blocks().eval(), "wanda", target_speedup=1.05, example_inputs=torch.randn(4, 16),
                        threads=1, sparsities=(0.5, 0.7, 0.9), timing=TINY_TIMING, score_candidates=score_candidates,
                        measure_candidates=True)
    opts = {"unstructured": {0.5: (0.6, "csr"), 0.7: (0.45, "csr"), 0.9: (0.25, "csr")}}
    p.tables = _tables(names=list(p.tables.layers), total=total, dense=1.0, opts=opts)  # 6 layers, remainder 2
    p.target_speedup = target
    measured = []

    def measure(pruned, plan):
        measured.append(plan.predicted_speedup)
        return plan.predicted_speedup * factor

    p._measure_speedup = measure
    gen = torch.Generator().manual_seed(1)  # the same calibration batches whatever the timing drew
    p.calibrate([torch.randn(8, 16, generator=gen) for _ in range(4)])
    return p, measured


@pytest.mark.parametrize("score_candidates", [0, 2])
def test_a_plan_measured_off_target_is_solved_again_with_the_aim_corrected(cache, synthetic_timing,
                                                                          score_candidates):
    p, measured = _measured_slower(score_candidates=score_candidates)
    cands = p.plan.candidates
    first = cands[0]
    assert first.measured_speedup == pytest.approx(first.plan.predicted_speedup * 0.8)
    assert first.measured_speedup < 1.5 * 0.95  # off by ~20%: corrected
    aimed = [c for c in cands if "aimed" in c.label]
    assert aimed, [c.label for c in cands]
    chosen = next(c for c in cands if c.chosen)
    assert chosen in aimed
    assert abs(chosen.measured_speedup / 1.5 - 1) <= pruner_mod.MEASURED_TOLERANCE
    # the corrected aim is the first prediction scaled by the measured error
    aim = float(aimed[0].label.split("aimed ")[1].rstrip("x)"))
    assert aim == pytest.approx(first.plan.predicted_speedup * 1.5 / first.measured_speedup, abs=0.006)
    assert p.plan is chosen.plan and sum(c.chosen for c in cands) == 1


def test_a_plan_measured_on_target_is_not_solved_again(cache, synthetic_timing):
    p, measured = _measured_slower(factor=1.0)
    assert not any("aimed" in c.label for c in p.plan.candidates)
    assert len(measured) == len(p.plan.candidates)


def test_corrections_stop_when_the_corrected_aim_is_out_of_reach(cache, synthetic_timing):
    p, measured = _measured_slower(factor=0.5, target=2.0)  # best reachable 8 / 3.5 = 2.29x: never 4x
    cands = p.plan.candidates
    best = 8 / 3.5
    # the fastest plan (every layer at 90%) gets measured: among the first candidates (uniform 90%) or
    # aimed at once (the aim is clipped to the best reachable); aiming there again finds nothing new
    assert any(c.plan.predicted_speedup == pytest.approx(best, rel=1e-3) for c in cands)
    aimed = [c for c in cands if "aimed" in c.label]
    assert len(aimed) <= 1 and all(c.plan.predicted_speedup == pytest.approx(best, rel=1e-3) for c in aimed)
    assert all(c.plan.predicted_speedup <= best * (1 + 1e-6) for c in cands)
    assert len(measured) == len(cands) and sum(c.chosen for c in cands) == 1


# ---------------------------------------------------------------- the planned path's scoring text


@pytest.mark.parametrize("calib_split", ["calibration", "train"])
def test_scoring_batches_are_training_text_that_neither_calibrates_nor_evaluates(monkeypatch, calib_split):
    from types import SimpleNamespace

    from sparsert.data import corpus
    from sparsert.models import minilm
    from sparsert.planner import workflow

    # sentences instead of token ids: what was chosen is then visible
    monkeypatch.setattr(minilm, "tokenize", lambda tok, s, bs: [s[i:i + bs] for i in range(0, len(s), bs)])
    wl = SimpleNamespace(family="hf", tokenizer=object(), extra={})
    batches = workflow.scoring_batches(wl, 3, 8, calib_split)
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)
    chosen = [s for b in batches for s in b]
    assert len(set(chosen)) == 96
    calib = {s for b in workflow.calibration_batches(wl, 8, None, calib_split) for s in b}
    assert len(calib) == 256 and not calib & set(chosen)
    assert set(chosen) <= set(corpus.split("train"))
    assert not set(chosen) & set(corpus.split("eval"))
    # nothing to score with: the planner holds calibration batches out instead
    assert workflow.scoring_batches(wl, 0, 8, calib_split) is None
    assert workflow.scoring_batches(wl, 3, 8, calib_split, data="my_text.txt") is None
    assert workflow.scoring_batches(SimpleNamespace(family="hf", tokenizer=object(), extra={"causal_lm": True}),
                                    3, 8, calib_split) is None
    assert workflow.scoring_batches(SimpleNamespace(family="digits", tokenizer=None, extra={}), 3, 8,
                                    calib_split) is None
