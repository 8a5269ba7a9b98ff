"""``sparsert.Pruner``: the kernel-free :class:`sparsert.prune.Pruner`, plus ``target_speedup=``.

```python
pruner = sparsert.Pruner(model, importance="wanda", target_speedup=2.0, baseline="best_dense",
                         example_inputs=x, patterns=("unstructured", "4x1", "2:4"))
pruner.calibrate(batches)          # the sensitivity tables use it (and the criterion)
print(pruner.plan)                 # per layer: sparsity, pattern, format, predicted time, sensitivity
pruner.step()                      # prunes each layer as planned (layers that do not pay stay dense)
fast = pruner.sparsify()           # packs each layer in the planned format
```

Without ``target_speedup`` it is exactly :class:`sparsert.prune.Pruner`. With it,
the constructor measures (or reads from the cache) the time tables
(:mod:`~sparsert.planner.tables`) and rejects a target the model cannot reach;
the plan is solved when first needed (``pruner.plan`` or the first ``step``),
from the sensitivity of each layer to each pattern on the calibration data
(:func:`sparsert.prune.allocation.sensitivity_tables`; without data, the
relative weight error) and handed to the kernel-free Pruner as its per-layer
settings. With calibration data and ``score_candidates`` > 0 (default 4), a few
candidate plans that reach the target (the solver's, uniform sparsity per pattern,
the solver limited to one pattern) are first pruned on a copy with the pruner's
criterion and scored by the model's output error on held-out batches (``score_data``,
else calibration batches held out); the least error is the plan (:mod:`~sparsert.planner.scoring`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..convert.streamline import FORWARDS, fusion_groups
from ..convert.timing import call_model, close, flatten_tensors, max_rel_err
from ..nn import SparseConv2d, SparseLinear
from ..nn.surgery import swap
from ..prune import Pruner as _KernelFreePruner
from ..prune.allocation import sensitivity_tables
from ..prune.patterns import parse_pattern
from .plan import Plan, best_speedup, build_plan, check_reachable, check_target
from . import scoring
from .scoring import METRICS, candidate_plans
from .tables import BASELINES, DEFAULT_PATTERNS, DEFAULT_SPARSITIES, time_tables

#: with ``measure_candidates``: a chosen candidate measured further than this from the target
#: (relative) makes the planner solve again, aimed by the measured error ...
MEASURED_TOLERANCE = 0.05
#: ... at most this many times
MEASURED_CORRECTIONS = 2

__all__ = ["Pruner", "sparsify_planned", "plannable_layers", "served_forward", "served_sparse", "FORWARDS"]


def plannable_layers(model: nn.Module, names: Sequence[str]) -> list:
    """The names among ``names`` the planner can time and pack: Linear / Conv2d outside
    ``nn.MultiheadAttention`` (which reads its ``out_proj.weight`` directly) whose weight no
    other module holds (a language model's ``lm_head`` tied to its token embedding: pruning
    it would prune the embedding too; SmolLM2 planned so lost all quality)."""
    skip = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    holders: dict = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(mod_name)
    return [n for n in names if isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d))
            and not isinstance(model.get_submodule(n), (SparseLinear, SparseConv2d))
            and not any(n.startswith(p) for p in skip)
            and len(holders.get(id(model.get_submodule(n).weight), ())) <= 1]


class Pruner(_KernelFreePruner):
    """:class:`sparsert.prune.Pruner` that can also plan for a speedup.

    Args (besides those of :class:`sparsert.prune.Pruner`):
        target_speedup: end-to-end speedup to reach vs ``baseline`` (> 1), instead of ``sparsity``.
        baseline: ``"best_dense"`` (every Linear on the best dense path) or ``"torch"`` (eager).
        example_inputs: what the model is called with (Tensor, tuple or dict); each layer is
            timed on the input shape it receives from it.
        patterns: the patterns the planner may give a layer.
        sparsities: the sparsity grid timed and scored per pattern.
        threads: threads for the timing (default: the current setting; the plan holds for it).
        sensitivity_method: ``"wanda"`` or ``"sparsegpt"`` (see ``sensitivity_tables``).
        sensitivity_per_token: measure each layer's error as the root mean square of each token's
            relative error (default), not the relative error of all its outputs together, which
            a few tokens with massive outputs dominate (see ``sensitivity_tables``).
        timing: options for :func:`~sparsert.planner.tables.time_tables` (``min_time``,
            ``rounds``, ``model_min_time``, ``cache``).
        bins: time grid of the solver.
        sensitivity: ready ``{pattern: SensitivityTable}`` (e.g. another pruner's
            ``sensitivity_tables`` for the same model and data) instead of measuring them.
        score_candidates: how many candidate plans that reach the target (the solver's plan,
            uniform sparsity with each pattern, the solver limited to each pattern; see
            :func:`~sparsert.planner.scoring.candidate_plans`) to prune on a copy of the model
            with this pruner's criterion and score by their error at the model's output on
            held-out batches (``score_data``, else calibration batches held out); the least error
            is the plan. ``0``: the solver's plan, unscored (as does a pruner without calibration
            data). Each candidate costs one pruning of the model (on the calibration batches not
            held out).
        score_batches: calibration batches held out for that score (default a quarter, at least
            one; the candidates are pruned with the rest; with a single batch, that batch).
        score_data: batches of their own to score the candidates on, instead of holding
            calibration batches out (the candidates are then pruned with every calibration
            batch). More text than calibration can spare: on MiniLM, 64 held-out sentences
            ranked two 2x candidates 0.0005 apart, the reverse of their order on evaluation text.
            Must not be the text the model is evaluated on.
        score_metric: ``"cosine"`` (1 - mean cosine of the output vectors, e.g. tokens' hidden
            states or logits), ``"pooled_cosine"`` (1 - mean cosine of each sample's outputs
            averaged over its tokens: a sentence embedding; what to use for an encoder whose
            users pool) or ``"mse"`` (relative squared error of the outputs).
        calibrate_groups: when candidates are scored, also calibrate the per-layer losses end to
            end: prune each group of layers that play one part in the repeated blocks (all
            queries, all FFN inputs, ...; :func:`~sparsert.planner.scoring.layer_groups`) alone
            at the best uniform candidate's point, weight each group's losses by the output
            error that left (on the calibration batches the candidates are pruned with, not the
            held-out ones that choose: a candidate built from the choosing batches would be
            favoured by them), and score the solver's plans on the weighted losses (per layer
            and per group) as two more candidates. Each probe costs one pruning of a group.
            Skipped when there are more than ``max_groups`` groups (a model without repeated
            blocks). Off by default: on MiniLM at 2x it tied the other candidates (see
            benchmarks/RESULTS.md) for ~80 s more.
        measure_candidates: also pack each scored candidate and time it end to end against the
            baseline (a few seconds each); a candidate measured below 90% of the target does not
            win unless none measures above. When the chosen one measures more than 5% off the
            target, the planner solves again with its aim corrected by that error (the tables
            mispredicted this model here), measures those candidates too and prefers the best
            one measured within 5% (at most two such rounds). With ``score_candidates=0`` the
            solver's plan alone is measured and corrected. Off by default: each measured
            candidate costs a pruning and a timing, and on a loaded machine one short
            measurement says little.
        forward: how the model is timed: ``"streamlined"`` (default) through
            :func:`sparsert.streamline`'s lean forward where it takes the model (BERT-style
            encoders, LLaMA-style causal LMs): what ``sparsert serve`` and the benchmarks run, so
            the plan's speedup is the one users get (the layer tables are timed with Q/K/V
            unfused, under the model's own layer names; candidates are measured as served,
            fused); ``"hf"``: the model's own forward. Models streamline does not take are timed
            as they are either way.
    """

    def __init__(self, model: nn.Module, importance: Any = "magnitude", pattern: Any = "unstructured",
                 sparsity: Optional[float] = None, *args: Any, target_speedup: Optional[float] = None,
                 baseline: str = "best_dense", example_inputs: Any = None,
                 patterns: Sequence[str] = DEFAULT_PATTERNS, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                 threads: Optional[int] = None, sensitivity_method: str = "wanda",
                 sensitivity_per_token: bool = True, timing: Optional[Mapping[str, Any]] = None, bins: int = 4000,
                 sensitivity: Optional[Mapping[str, Any]] = None, score_candidates: int = 4,
                 score_batches: Optional[int] = None, score_data: Optional[Sequence] = None,
                 score_metric: str = "cosine", calibrate_groups: bool = False,
                 max_groups: int = 12, measure_candidates: bool = False, forward: str = "streamlined",
                 **kwargs: Any):
        self.target_speedup = None
        self._plan: Optional[Plan] = None
        self._applied = False
        if target_speedup is None:
            if example_inputs is not None or timing is not None:
                raise ValueError("example_inputs and timing are for target_speedup=...; with sparsity= "
                                 "nothing is timed")
            super().__init__(model, importance, pattern, 0.5 if sparsity is None else sparsity, *args, **kwargs)
            return
        target = check_target(target_speedup)
        if sparsity is not None:
            raise ValueError("give sparsity= or target_speedup=, not both: the planner picks each layer's sparsity")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if example_inputs is None:
            raise ValueError("target_speedup needs example_inputs: the layers are timed on the shapes the "
                             "model really gives them")
        if kwargs.get("scope") == "global" or (args and args[0] == "global"):
            raise ValueError("target_speedup plans each layer's sparsity itself: scope='global' does not apply")
        if kwargs.get("allocation", "uniform") != "uniform":
            raise ValueError("target_speedup plans each layer's sparsity itself: leave allocation='uniform'")
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if sensitivity_method not in ("wanda", "sparsegpt"):
            raise ValueError("sensitivity_method must be 'wanda' or 'sparsegpt'")
        if isinstance(score_candidates, bool) or not isinstance(score_candidates, int) or score_candidates < 0:
            raise ValueError(f"score_candidates must be an int >= 0 (0: no end-to-end scoring), got {score_candidates!r}")
        if score_batches is not None and (isinstance(score_batches, bool) or not isinstance(score_batches, int)
                                          or score_batches < 1):
            raise ValueError(f"score_batches must be an int >= 1, got {score_batches!r}")
        if score_data is not None:
            if score_batches is not None:
                raise ValueError("give score_batches (calibration batches held out) or score_data (batches of "
                                 "their own), not both")
            score_data = list(score_data)
            if not score_data:
                raise ValueError("score_data is empty: give at least one batch, or leave it None")
        if score_metric not in METRICS:
            raise ValueError(f"score_metric must be one of {METRICS}, got {score_metric!r}")
        if not isinstance(calibrate_groups, bool):
            raise ValueError(f"calibrate_groups must be True or False, got {calibrate_groups!r}")
        if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
            raise ValueError(f"max_groups must be an int >= 1, got {max_groups!r}")
        if not isinstance(measure_candidates, bool):
            raise ValueError(f"measure_candidates must be True or False, got {measure_candidates!r}")
        pats = tuple(str(parse_pattern(p)) for p in ([patterns] if isinstance(patterns, str) else patterns))
        if not pats:
            raise ValueError("patterns must name at least one pattern")
        if any(parse_pattern(p).kind == "channel" for p in pats):
            raise ValueError("the planner times unstructured, RxC block and N:M patterns; 'channel' is not one")
        super().__init__(model, importance, pattern, 0.5, *args, **kwargs)
        self.target_speedup = target
        self.baseline = baseline
        self.example_inputs = example_inputs
        self.patterns = pats
        self.sparsities = tuple(sorted({float(s) for s in sparsities}))
        self.sensitivity_method = sensitivity_method
        self.sensitivity_per_token = bool(sensitivity_per_token)
        self.bins = bins
        self.score_candidates, self.score_batches, self.score_metric = score_candidates, score_batches, score_metric
        self.score_data = score_data
        self.calibrate_groups, self.max_groups = calibrate_groups, max_groups
        self.measure_candidates = measure_candidates
        self._served_dense: Optional[nn.Module] = None  # the dense model as served, built once for measuring
        self.forward = forward
        names = plannable_layers(model, list(self.layers))
        for n in [n for n in self.layers if n not in names]:  # not plannable: left as they are
            del self.layers[n], self.settings[n]
        if not self.layers:
            raise ValueError("no layer the planner can time (Linear / Conv2d outside nn.MultiheadAttention)")
        was_training = model.training
        model.eval()
        try:
            timed = served_forward(model, forward, fuse_qkv=False)  # (unfused: the layers keep their names)
            # the layers the served model runs as one call when they share a format (Q/K/V, gate/up) are
            # timed that way too, and the baseline is the model as served, those fused: a uniform 4x1 plan
            # for SmolLM2 predicted 1.52x from unfused layers measured 1.80x fused
            groups = fusion_groups(timed)
            served = served_forward(model, forward) if groups else None
            self.tables = time_tables(timed, names, example_inputs, baseline=baseline, patterns=pats,
                                      sparsities=self.sparsities, threads=threads, fused=groups, served=served,
                                      **dict(timing or {}))
            del timed, served
        finally:
            model.train(was_training)
        check_reachable(self.tables, target)
        #: {pattern: SensitivityTable} the plan was solved with
        self.sensitivity_tables: Optional[dict] = dict(sensitivity) if sensitivity is not None else None

    # ------------------------------------------------------------------ plan
    @property
    def plan(self) -> Optional[Plan]:
        """The per-layer plan (solved on first access; ``None`` without ``target_speedup``)."""
        if self.target_speedup is None:
            return None
        if self._plan is None:
            sensitivity_given = self.sensitivity_tables is not None
            names = list(self.tables.layers)
            tables = self.sensitivity_tables
            if tables is None:
                tables = sensitivity_tables(self.model, {n: self.layers[n] for n in names}, self._data,
                                            self.sparsities, patterns=self.patterns, method=self.sensitivity_method,
                                            progress=self.progress, per_token=self.sensitivity_per_token)
                self.sensitivity_tables = tables
            note = ("" if self._data is not None or sensitivity_given
                    else "no calibration data: sensitivity = relative weight error")
            self._plan = self._choose(tables, note)
        return self._plan

    def _choose(self, sensitivity: Mapping[str, Any], note: str) -> Plan:
        """The solver's plan, or (``score_candidates`` > 0, with calibration data) the candidate
        plan with the least end-to-end output error (see :mod:`~sparsert.planner.scoring`)."""
        measuring = self.measure_candidates and self._data is not None
        if not measuring and (not self.score_candidates or self._data is None):
            return build_plan(self.tables, sensitivity, self.target_speedup, bins=self.bins, sensitivity_note=note)
        candidates = candidate_plans(self.tables, sensitivity, self.target_speedup, bins=self.bins,
                                     limit=max(1, self.score_candidates), sensitivity_note=note)
        if len(candidates) == 1 and not measuring:
            return candidates[0][1]  # nothing to choose between: skip the cost
        data = list(self._data)
        if self.score_data is not None:
            prune_data, score_data = data, self.score_data
        else:
            held = min(len(data) - 1, self.score_batches or max(1, len(data) // 4))
            prune_data, score_data = (data, data) if held < 1 else (data[:-held], data[-held:])

        def prune_copy(model: nn.Module, plan: Plan) -> None:
            pruned = plan.pruned
            if not pruned:
                return
            kp = _KernelFreePruner(model, self.criterion, sparsity=0.5, scope=self.scope,
                                   include=[l.name for l in pruned], progress=False,
                                   overrides={re.escape(l.name): {"sparsity": l.sparsity, "pattern": l.pattern}
                                              for l in pruned})
            kp.calibrate(prune_data, self._loss_fn)
            while not kp.done:
                kp.step()

        measure = self._measure_speedup if self.measure_candidates else None
        reference = scoring.reference_outputs(self.model, score_data)
        scored = scoring.score_candidates(self.model, candidates, prune_copy, score_data, metric=self.score_metric,
                                          progress=self.progress, reference=reference, measure=measure)
        probes: list = []
        uniform = [c for c in scored if c.label.startswith("uniform") and c.error is not None
                   and math.isfinite(c.error)]
        groups = scoring.layer_groups(list(self.tables.layers))
        if self.calibrate_groups and uniform and 1 < len(groups) <= self.max_groups:
            # probe each group at the best uniform candidate's point: its losses are then right there
            best = min(uniform, key=lambda c: c.error).plan.layers
            # (a two-level uniform candidate holds two sparsities: probe at the higher)
            probes = scoring.probe_groups(self.model, self.tables, sensitivity, prune_copy, prune_data, groups,
                                          best[0].pattern, max(l.sparsity for l in best), metric=self.score_metric,
                                          progress=self.progress)
            seen = {scoring._signature(c.plan) for c in scored}
            extra = [(label, p) for label, p in scoring.calibrated_candidates(
                self.tables, sensitivity, self.target_speedup, probes, bins=self.bins, sensitivity_note=note)
                if scoring._signature(p) not in seen]
            if extra:
                scored = scored + scoring.score_candidates(
                    self.model, extra, prune_copy, score_data, metric=self.score_metric, progress=self.progress,
                    reference=reference, measure=measure)
        scored = scoring.choose(scored, self.target_speedup if self.measure_candidates else None)
        if self.measure_candidates:
            scored = self._correct_to_measured(scored, sensitivity, note, prune_copy, score_data, reference, measure)
        chosen = next(c for c in scored if c.chosen)
        plan = chosen.plan
        if not plan.frontier:  # a uniform plan: plot the solver's frontier with it
            plan.frontier = candidates[0][1].frontier
        plan.candidates = scored
        plan.probes = probes
        return plan

    def _correct_to_measured(self, scored: list, sensitivity: Mapping[str, Any], note: str, prune_copy: Callable,
                             score_data: Sequence, reference: list, measure: Callable) -> list:
        """When the chosen candidate measures more than :data:`MEASURED_TOLERANCE` off the target,
        the tables mispredict this model here (its remainder, its layers inside the model, ...):
        solve again, aiming the predictions at the target scaled by that error (a plan predicted
        1.52x that measured 1.29x against a target of 1.5x: aim at 1.77x), score and measure the
        new candidates, and choose among all, preferring those measured within the tolerance.
        At most :data:`MEASURED_CORRECTIONS` rounds."""
        target = self.target_speedup
        seen = {scoring._signature(c.plan) for c in scored}
        best = best_speedup(self.tables)
        for _ in range(MEASURED_CORRECTIONS):
            chosen = next(c for c in scored if c.chosen)
            got = chosen.measured_speedup
            if not got or abs(got / target - 1) <= MEASURED_TOLERANCE:
                break
            # (clipped a few of the solver's time bins below the best reachable: its rounding
            # finds no plan exactly at the best)
            aim = min(chosen.plan.predicted_speedup * target / got, best * (1 - 4.0 / self.bins))
            if aim <= 1.0:
                break
            try:
                new = candidate_plans(self.tables, sensitivity, aim, bins=self.bins,
                                      limit=max(1, self.score_candidates), sensitivity_note=note)
            except ValueError:  # the corrected aim is out of reach
                break
            new = [(f"{label} (aimed {aim:.2f}x)", plan) for label, plan in new
                   if scoring._signature(plan) not in seen]
            if not new:
                break
            for label, plan in new:
                plan.label = label
                seen.add(scoring._signature(plan))
            scored = list(scored) + scoring.score_candidates(
                self.model, new, prune_copy, score_data, metric=self.score_metric, progress=self.progress,
                reference=reference, measure=measure)
            close = [c for c in scored if c.measured_speedup is not None
                     and abs(c.measured_speedup / target - 1) <= MEASURED_TOLERANCE]
            if close:  # among those measured close to the target, the best quality
                scoring.choose(close)
                ids = {id(c) for c in close}
                for c in scored:
                    c.chosen = c.chosen and id(c) in ids
            else:
                scoring.choose(scored, target)
        return scored

    def _measure_speedup(self, pruned: nn.Module, plan: Plan) -> float:
        """``pruned`` (a pruned copy) packed per ``plan`` and timed end to end against the
        baseline, interleaved (medians)."""
        from ..bench import benchmark

        sparse = served_sparse(sparsify_planned(pruned, plan, check=False), self.forward, self.baseline,
                               self.example_inputs)
        if self._served_dense is None:  # (a copy of the still dense model: planning prunes copies)
            self._served_dense = served_forward(self.model, self.forward)
        r = benchmark(self._served_dense, sparse, self.example_inputs, threads=self.tables.threads, warmup=2, repeats=15,
                      rounds=5, per_layer=False, best_dense=self.baseline == "best_dense", verbose=False)
        base = r.best_dense if self.baseline == "best_dense" else r.dense
        return base.median / r.sparse.median

    def _apply_plan(self) -> None:
        if self._applied or self.target_speedup is None:
            return
        self._served_dense = None  # from here on self.model is pruned
        plan = self.plan
        for lp in plan.layers:
            if lp.pattern is None:  # does not pay: stays dense
                del self.layers[lp.name], self.settings[lp.name]
                continue
            st = self.settings[lp.name]
            st["pattern"] = parse_pattern(lp.pattern)
            st["sparsity"] = lp.sparsity
            st["own"] = True
        self.layer_sparsity = {}
        self._applied = True

    def step(self):
        self._apply_plan()
        if not self.layers:
            self._step += 1
            return {}
        return super().step()

    def compute_masks(self, step: Optional[int] = None):
        self._apply_plan()
        return super().compute_masks(step)

    def sparsify(self, example_inputs: Any = None, *, check: bool = True) -> nn.Module:
        """A copy of the pruned model with every layer in its planned format (see :func:`sparsify_planned`)."""
        if self.target_speedup is None:
            raise ValueError("sparsify() follows a plan: use target_speedup=, or sparsert.sparsify(model) otherwise")
        return sparsify_planned(self.model, self.plan, self.example_inputs if example_inputs is None
                                else example_inputs, check=check)


def served_forward(model: nn.Module, forward: str = "streamlined", *, fuse_qkv: bool = True) -> nn.Module:
    """``model`` as it is timed and served: under :func:`sparsert.streamline` (a copy in eval mode)
    where ``forward`` is "streamlined" and streamline takes it, else ``model`` itself."""
    from ..convert.streamline import streamlined_or_same

    if forward != "streamlined":
        return model
    was = model.training
    model.eval()
    try:
        return streamlined_or_same(model, fuse_qkv=fuse_qkv)
    finally:
        model.train(was)


@torch.no_grad()
def sparsify_planned(model: nn.Module, plan: Plan, example_inputs: Any = None, *, check: bool = True) -> nn.Module:
    """A copy of ``model`` with each planned layer packed in its planned format, and every other
    plain ``nn.Linear`` on the best dense path (:class:`~sparsert.nn.DenseLinear`).

    A pruned layer whose zeros do not fit the planned format (e.g. a pattern the criterion
    did not keep) is packed as CSR. With ``check`` and ``example_inputs`` the result is
    compared with ``model``.
    """
    import copy

    from ..bench import best_dense_model

    was_training = model.training
    model.eval()
    try:
        out = copy.deepcopy(model)
        for lp in plan.layers:
            module = out.get_submodule(lp.name)
            if lp.format == "dense" or not bool((module.weight == 0).any()):
                continue
            build = SparseConv2d.from_dense if isinstance(module, nn.Conv2d) else SparseLinear.from_dense
            try:
                new = build(module, lp.format)
            except (ValueError, TypeError):
                new = build(module, "csr")
            swap(out, lp.name, new)
        out = best_dense_model(out, example_inputs)  # the layers left dense: on the best dense path, tuned
        out.eval()
        if check and example_inputs is not None:
            ref = flatten_tensors(call_model(model, example_inputs))
            got = flatten_tensors(call_model(out, example_inputs))
            if len(ref) != len(got) or not all(close(a, b, rtol=1e-2) for a, b in zip(got, ref)):
                worst = max((max_rel_err(a, b) for a, b in zip(got, ref) if a.shape == b.shape), default=float("inf"))
                raise RuntimeError(f"the planned sparse model's outputs differ from the pruned model's "
                                   f"(max relative error {worst:.2e})")
    finally:
        model.train(was_training)
    out.planner_plan = plan
    return out


def served_sparse(model: nn.Module, forward: str = "streamlined", baseline: str = "best_dense",
                  example_inputs: Any = None) -> nn.Module:
    """A packed model as it is measured against ``baseline``: :func:`served_forward`'s, with the
    Linears it left plain (``lm_head``, layers the planner does not prune) on the best dense path
    where the baseline runs its layers there, as ``sparsert serve`` runs them. (Measured with those on
    torch's ``F.linear``, SmolLM2's tied ``lm_head`` took 11.4 ms of a 1-token step against 4.2 ms
    on the baseline's GEMV: a plan predicted at 1.51x measured 1.10x.)"""
    from ..bench import best_dense_model

    out = served_forward(model, forward)
    if baseline != "best_dense":
        return out
    # (served_forward's streamlined model is already a copy: one copy of a 540 MB model, not two)
    return best_dense_model(out, example_inputs, inplace=out is not model)
