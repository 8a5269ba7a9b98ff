"""Choose among candidate plans by the error each leaves at the model's output.

The solver minimises a *sum of per-layer errors*, each measured with the layer
pruned alone on the dense model's inputs (:func:`sparsert.prune.allocation.sensitivity_tables`).
That sum does not see how errors compound through the network, nor what a
criterion that updates the kept weights (SparseGPT) recovers: on MiniLM at 1.5x
the solver's plan (summed loss 1.27) kept 0.649 mean embedding cosine while
uniform 80% unstructured (summed loss 6.59) kept 0.698.

So, after solving, a few candidate plans that all meet the time budget — the
solver's plan, the solver limited to each single pattern, and uniform sparsity
with each pattern (the least timed sparsity that reaches the target) — are each
applied to a copy of the model with the criterion that will really prune it, on
part of the calibration data, and the model's output on the other, held-out
calibration batches is compared with the dense model's. The candidate with the
least end-to-end error is the plan. With the uniform plans among the candidates
the planner loses to uniform sparsity only when the calibration error mispredicts
the quality on the evaluation data.

The candidates' per-layer losses can be calibrated end to end too
(:func:`probe_groups`, :func:`calibrated_candidates`): each group of layers that
play the same part in the repeated blocks (all queries, all FFN inputs, ...) is
pruned alone, at the point of the best uniform candidate, and the error that
leaves at the model's output, divided by the group's summed per-layer loss, is
that group's weight; the solver run on the weighted losses (per layer, and with
one choice per group) gives two more candidates. The weight corrects what the
per-layer loss cannot see: how a layer's error carries to the output, and what
the criterion's weight update recovers.

The pruning is passed in (``prune(model, plan)``): this module knows no criterion
and no kernel.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..prune._data import output_tensor, progress_enabled, run
from ..prune.allocation import SensitivityTable
from .plan import Plan, build_plan, fixed_plan, two_level_plan, uniform_plan, uniform_points
from .tables import TimeTables

__all__ = ["Candidate", "GroupProbe", "METRICS", "UNIFORM_OVERSHOOT", "candidate_plans", "output_error",
           "output_errors", "reference_outputs", "score_candidates", "choose", "candidates_table", "layer_groups",
           "probe_groups", "group_weights", "scaled_sensitivity", "calibrated_candidates", "probes_table"]

#: what the candidates are chosen by: ``"cosine"`` (1 - mean cosine of the output vectors: each
#: token's hidden state, each sample's logits), ``"pooled_cosine"`` (1 - mean cosine of each
#: sample's ``(tokens, width)`` output averaged over its tokens, padding left out: a sentence
#: encoder's embedding; an output of another rank is one vector per sample) or ``"mse"``
#: (relative squared error)
METRICS = ("cosine", "pooled_cosine", "mse")


@dataclasses.dataclass
class Candidate:
    """One plan scored end to end."""

    label: str
    plan: Plan
    cosine_error: Optional[float] = None  # 1 - mean cosine of the output vectors to the dense model's
    mse: Optional[float] = None           # summed squared output error / summed squared dense output
    metric: str = "cosine"
    chosen: bool = False
    seconds: float = 0.0                  # what pruning and scoring this candidate cost
    measured_speedup: Optional[float] = None  # the pruned copy packed and timed end to end (``measure``)
    pooled_cosine_error: Optional[float] = None  # 1 - mean cosine of the token-averaged outputs (per sample)

    @property
    def error(self) -> Optional[float]:
        """The error the choice is made by (``metric``)."""
        return {"cosine": self.cosine_error, "pooled_cosine": self.pooled_cosine_error, "mse": self.mse}[self.metric]

    def as_dict(self) -> dict:
        return {"label": self.label, "predicted_speedup": self.plan.predicted_speedup, "loss": self.plan.loss,
                "cosine_error": self.cosine_error, "pooled_cosine_error": self.pooled_cosine_error, "mse": self.mse,
                "metric": self.metric, "chosen": self.chosen, "seconds": self.seconds,
                "measured_speedup": self.measured_speedup}


def _signature(plan: Plan) -> tuple:
    return tuple((l.name, l.pattern, round(l.sparsity, 6)) for l in plan.layers)


#: a uniform candidate predicted this much faster than the target is split over two grid steps
UNIFORM_OVERSHOOT = 0.02


def candidate_plans(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float, *,
                    bins: int = 4000, limit: Optional[int] = None, sensitivity_note: str = "") -> list:
    """Plans that all reach ``target`` (predicted), distinct, in this order: the solver's plan
    (every pattern), uniform sparsity with each pattern (the least timed sparsity whose
    predicted speedup reaches the target; when that overshoots the target by more than
    :data:`UNIFORM_OVERSHOOT`, each layer at it or at the grid step below, as the solver
    needs: label ``"uniform 4x1@0.75/0.8"``), then the solver limited to each single pattern.
    ``limit``: keep the first ``limit``. Returns ``[(label, Plan)]``."""
    out: list = []
    seen: set = set()

    def add(label: str, plan: Plan) -> None:
        sig = _signature(plan)
        if sig in seen or plan.predicted_speedup < target * (1 - 1e-9):
            return
        seen.add(sig)
        plan.label = label
        out.append((label, plan))

    add("plan", build_plan(tables, sensitivity, target, bins=bins, sensitivity_note=sensitivity_note))
    patterns = sorted({p for lt in tables.layers.values() for p in lt.options})
    points = uniform_points(tables, sensitivity)
    for pattern in patterns:
        grid = sorted((s, sp) for p, s, sp, _ in points if p == pattern)
        fits = [(s, sp) for s, sp in grid if sp >= target * (1 - 1e-9)]
        if not fits:
            continue
        s, sp = fits[0]
        below = [g for g, _ in grid if g < s]
        plan = uniform_plan(tables, sensitivity, target, pattern, s, sensitivity_note=sensitivity_note)
        label = f"uniform {pattern}@{s:g}"
        if below and sp > target * (1 + UNIFORM_OVERSHOOT):
            # the least uniform sparsity reaching the target overshoots it by a step of the grid:
            # lower some layers to the step below, so the candidate is as fast as asked, not faster
            # at a quality cost (Round 6: uniform 80% asked for 1.5x measured 1.68x)
            split = two_level_plan(tables, sensitivity, target, pattern, below[-1], s, bins=bins,
                                   sensitivity_note=sensitivity_note)
            if any(l.sparsity != s for l in split.layers):
                plan, label = split, f"uniform {pattern}@{below[-1]:g}/{s:g}"
        add(label, plan)
    for pattern in patterns:
        try:
            plan = build_plan(tables, sensitivity, target, bins=bins, sensitivity_note=sensitivity_note,
                              patterns=(pattern,))
        except ValueError:  # this pattern alone cannot reach the target
            continue
        add(f"plan {pattern} only", plan)
    return out if limit is None else out[:max(1, int(limit))]


def _token_weights(batch: Any, out: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask of a Hugging Face batch, when it lines up with the output's leading
    dims: padded positions are not part of the answer."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        m = batch["attention_mask"]
        if out.dim() >= 2 and tuple(m.shape) == tuple(out.shape[:2]):
            return m.to(torch.float64)
    return None


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: Sequence) -> list:
    """The model's outputs (:func:`sparsert.prune._data.output_tensor`) on ``batches``, in float32
    (a causal LM's logits are large: float64 copies would double what is held)."""
    was = model.training
    model.eval()
    try:
        return [output_tensor(run(model, b)[0]).detach().float() for b in batches]
    finally:
        model.train(was)


def output_error(model: nn.Module, reference: Sequence[torch.Tensor], batches: Sequence) -> tuple:
    """``(1 - mean cosine, relative squared error)`` of ``model``'s outputs on ``batches`` against
    ``reference`` (from :func:`reference_outputs`). The cosine is taken per vector along the last
    dimension (a token's hidden state, a sample's logits), padded tokens left out."""
    errors = output_errors(model, reference, batches)
    return errors["cosine"], errors["mse"]


def _pooled(out: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    """One vector per sample: a ``(batch, tokens, width)`` output averaged over its tokens (weights
    ``w``: the attention mask); any other output (logits, a feature map) flattened per sample."""
    if out.dim() != 3:
        return out.reshape(out.shape[0] if out.dim() else 1, -1).double()
    wt = torch.ones(out.shape[:2], dtype=torch.float64) if w is None else w
    return (out.double() * wt[:, :, None]).sum(1) / wt.sum(1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def output_errors(model: nn.Module, reference: Sequence[torch.Tensor], batches: Sequence) -> dict:
    """``{metric: error}`` for every metric of :data:`METRICS`, from one pass of ``model`` over
    ``batches`` against ``reference`` (from :func:`reference_outputs`), padded tokens left out.
    ``pooled_cosine`` is what a sentence encoder's users see: on all-MiniLM-L6-v2 at 2x, the
    per-token cosine ranked uniform 85-90% ahead of the solver's plan, the embedding cosine on
    the same sentences (and on evaluation text of other sources) the other way round."""
    was = model.training
    model.eval()
    try:
        cos_sum = cos_n = num = den = pooled_sum = pooled_n = 0.0
        for b, ref in zip(batches, reference):
            out = output_tensor(run(model, b)[0]).float()
            if out.shape != ref.shape:
                raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
            w = _token_weights(b, ref)
            width = out.shape[-1] if out.dim() else 1
            a, r = out.reshape(-1, width), ref.float().reshape(-1, width)
            wt = torch.ones(a.shape[0], dtype=torch.float64) if w is None else w.reshape(-1)
            # per-vector terms in float32, sums over vectors in float64
            cos = torch.nn.functional.cosine_similarity(a, r, dim=-1, eps=1e-12).double()
            cos_sum += float((cos * wt).sum())
            cos_n += float(wt.sum())
            num += float((((a - r) ** 2).sum(-1).double() * wt).sum())
            den += float(((r * r).sum(-1).double() * wt).sum())
            pooled = torch.nn.functional.cosine_similarity(_pooled(out, w), _pooled(ref.float(), w), dim=-1, eps=1e-12)
            pooled_sum += float(pooled.double().sum())
            pooled_n += pooled.numel()
    finally:
        model.train(was)
    return {"cosine": 1.0 - cos_sum / cos_n if cos_n > 0 else math.nan,
            "pooled_cosine": 1.0 - pooled_sum / pooled_n if pooled_n > 0 else math.nan,
            "mse": num / den if den > 0 else math.nan}


def score_candidates(model: nn.Module, candidates: Sequence, prune: Callable[[nn.Module, Plan], None],
                     batches: Sequence, *, metric: str = "cosine", progress: Optional[bool] = None,
                     reference: Optional[Sequence[torch.Tensor]] = None, desc: str = "score candidate plans end to end",
                     measure: Optional[Callable[[nn.Module, Plan], float]] = None) -> list:
    """Prunes a copy of ``model`` per candidate plan (``prune(copy, plan)``, in place), measures
    :func:`output_error` on ``batches`` against ``model``'s outputs (or ``reference``, from
    :func:`reference_outputs`), and marks the candidate with the least error (``metric``:
    one of :data:`METRICS`) as chosen (:func:`choose`). ``candidates``: ``[(label, Plan)]``
    (:func:`candidate_plans`). ``measure(pruned copy, plan)``: its measured end-to-end speedup
    (the caller packs and times it; this module knows no kernel). Returns ``[Candidate]``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not candidates:
        raise ValueError("no candidate plan to score")
    if not batches:
        raise ValueError("scoring needs at least one held-out batch")
    ref = reference_outputs(model, batches) if reference is None else reference
    scored = []
    bar = None
    if progress_enabled(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates), desc=desc, leave=False)
    try:
        for label, plan in candidates:
            t0 = time.perf_counter()
            trial = copy.deepcopy(model)
            prune(trial, plan)
            errors = output_errors(trial, ref, batches)
            speed = None if measure is None else float(measure(trial, plan))
            del trial
            scored.append(Candidate(label, plan, errors["cosine"], errors["mse"], metric,
                                    seconds=time.perf_counter() - t0, measured_speedup=speed,
                                    pooled_cosine_error=errors["pooled_cosine"]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{label}: {metric} error {scored[-1].error:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return choose(scored)


def choose(scored: Sequence[Candidate], target: Optional[float] = None, tolerance: float = 0.1) -> list:
    """Marks the candidate with the least error as chosen (ties: the earlier one; a NaN error
    never wins) and only it; returns the list. With ``target``, only candidates whose
    ``measured_speedup`` is at least ``target * (1 - tolerance)`` compete, if any is (a
    prediction that the measurement contradicts does not win; unmeasured ones compete)."""
    if not scored:
        raise ValueError("no candidate to choose from")
    pool = list(range(len(scored)))
    if target is not None:
        fast = [i for i in pool if scored[i].measured_speedup is None
                or scored[i].measured_speedup >= target * (1 - tolerance)]
        pool = fast or pool
    best = min(pool, key=lambda i: (math.inf if scored[i].error is None or
                                    not math.isfinite(scored[i].error) else scored[i].error, i))
    for i, c in enumerate(scored):
        c.chosen = i == best
    return list(scored)


def candidates_table(candidates: Sequence[Candidate]) -> list:
    """Lines for the plan's table: each candidate's predicted speedup, summed per-layer loss and
    measured end-to-end error, the chosen one marked."""
    from ..convert.plan import _format_table

    measured = any(c.measured_speedup is not None for c in candidates)
    head = ["candidate", "predicted"] + (["measured"] if measured else []) + ["summed loss", "1 - cosine",
                                                                            "1 - pooled cos", "rel. sq. error", ""]

    def f(v):
        return "-" if v is None else f"{v:.4f}"

    rows = [[c.label, f"{c.plan.predicted_speedup:.2f}x"]
            + ([("-" if c.measured_speedup is None else f"{c.measured_speedup:.2f}x")] if measured else [])
            + [f"{c.plan.loss:.3f}", f(c.cosine_error), f(c.pooled_cosine_error), f(c.mse),
               "<- chosen" if c.chosen else ""] for c in candidates]
    chosen = next((c for c in candidates if c.chosen), None)
    lines = ["", f"candidate plans pruned with the criterion and scored end to end (output error vs the dense "
                 f"model on held-out text; chosen by {candidates[0].metric if candidates else '-'}):"]
    lines += _format_table(head, rows)
    if chosen is not None:
        lines.append(f"chosen: {chosen.label} (least end-to-end error among {len(candidates)} candidates that "
                     f"reach the target; scoring took {sum(c.seconds for c in candidates):.0f} s, "
                     f"score_candidates=0 skips it)")
    return lines


# ---------------------------------------------------------------- end-to-end calibrated losses

#: a name part that is a block's number, followed by the layer's name inside the block
#: (``encoder.layer.3.attention`` -> ``encoder.layer.*.attention``; ``0`` of a Sequential stays)
_BLOCK_NUMBER = re.compile(r"(?<![^.])\d+(?=\.)")


def layer_groups(names: Sequence[str]) -> dict:
    """``{group: [layer, ...]}``: the layers whose names differ only in block numbers
    (``encoder.layer.0.attention.self.query`` and ``encoder.layer.5.attention.self.query``:
    group ``encoder.layer.*.attention.self.query``), in the order first seen. A layer outside
    repeated blocks (``fc1``, or ``2`` in an ``nn.Sequential``) is a group of its own."""
    out: dict = {}
    for n in names:
        out.setdefault(_BLOCK_NUMBER.sub("*", n), []).append(n)
    return out


@dataclasses.dataclass
class GroupProbe:
    """One group of layers pruned alone at one point, and what that did at the model's output."""

    group: str
    layers: list
    pattern: str
    sparsity: float
    loss: float              # the group's summed per-layer loss there (what the solver believed)
    error: float             # measured: the model's output error (the scoring metric) with only it pruned
    seconds: float = 0.0

    @property
    def weight(self) -> float:
        """Output error per unit of per-layer loss (what the group's losses are multiplied by)."""
        return self.error / self.loss if self.loss > 0 else math.nan

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "weight": self.weight}


def probe_groups(model: nn.Module, tables: TimeTables, sensitivity: Mapping[str, SensitivityTable],
                 prune: Callable[[nn.Module, Plan], None], batches: Sequence, groups: Mapping[str, Sequence[str]],
                 pattern: str, sparsity: float, *, metric: str = "cosine", progress: Optional[bool] = None,
                 reference: Optional[Sequence[torch.Tensor]] = None) -> list:
    """Prunes each group of layers alone (the rest dense) at ``pattern`` and ``sparsity`` (a
    timed point of every member) on a copy with ``prune`` and measures the output error on
    ``batches`` (see :func:`score_candidates`). Returns ``[GroupProbe]``."""
    if not groups:
        raise ValueError("no group of layers to probe")
    plans = [(g, fixed_plan(tables, sensitivity, 1.0, {n: (pattern, sparsity) for n in members}))
             for g, members in groups.items()]
    scored = score_candidates(model, plans, prune, batches, metric=metric, progress=progress, reference=reference,
                              desc="probe layer groups end to end")
    return [GroupProbe(g, list(groups[g]), pattern, float(sparsity), plan.loss, float(c.error), c.seconds)
            for (g, plan), c in zip(plans, scored)]


def group_weights(probes: Sequence[GroupProbe]) -> dict:
    """``{layer: weight}`` from the probes: each layer takes its group's measured output error
    per unit of summed per-layer loss. A group whose per-layer loss was 0 (or whose error is
    not finite) takes the median weight of the others (1.0 if there are none)."""
    good = sorted(p.weight for p in probes if math.isfinite(p.weight) and p.weight >= 0)
    fallback = good[len(good) // 2] if good else 1.0
    out = {}
    for p in probes:
        w = p.weight if math.isfinite(p.weight) and p.weight >= 0 else fallback
        out.update({n: w for n in p.layers})
    return out


def scaled_sensitivity(sensitivity: Mapping[str, SensitivityTable], weights: Mapping[str, float]) -> dict:
    """The tables with each layer's loss (the squared error) multiplied by ``weights[layer]``
    (layers not named: unchanged), for every pattern."""
    out = {}
    for pattern, table in sensitivity.items():
        errors = {n: [e * math.sqrt(weights[n]) if n in weights else e for e in errs]
                  for n, errs in table.errors.items()}
        out[pattern] = dataclasses.replace(table, errors=errors, meta={**table.meta, "scaled": "end to end"})
    return out


def calibrated_candidates(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float,
                          probes: Sequence[GroupProbe], *, bins: int = 4000, sensitivity_note: str = "") -> list:
    """The solver run on the per-layer losses weighted by the probes (:func:`group_weights`):
    ``[("plan calibrated", per layer), ("plan calibrated per group", one choice per probed
    group)]``, those that reach the target. The plans' ``loss`` is the weighted one (an
    estimate of the output error)."""
    scaled = scaled_sensitivity(sensitivity, group_weights(probes))
    note = "; ".join(n for n in (sensitivity_note, "sensitivity weighted end to end per layer group") if n)
    out = []
    for label, groups in (("plan calibrated", None), ("plan calibrated per group", {p.group: p.layers for p in probes})):
        try:
            plan = build_plan(tables, scaled, target, bins=bins, sensitivity_note=note, groups=groups)
        except ValueError:  # not reachable with one choice per group
            continue
        if plan.predicted_speedup >= target * (1 - 1e-9):
            plan.label = label
            out.append((label, plan))
    return out


def probes_table(probes: Sequence[GroupProbe]) -> list:
    """Lines for the plan's table: each probed group's summed per-layer loss, measured output
    error and weight."""
    from ..convert.plan import _format_table

    if not probes:
        return []
    p0 = probes[0]
    head = ["layer group", "layers", "summed loss", "output error", "weight"]
    rows = [[p.group, str(len(p.layers)), f"{p.loss:.3f}", f"{p.error:.4f}", f"{p.weight:.4f}"] for p in probes]
    return (["", f"per-layer losses calibrated end to end: each group pruned alone at {p0.pattern}@{p0.sparsity:g}, "
                 f"the rest dense (output error on the held-out calibration batches)"] + _format_table(head, rows)
            + [f"sum of the groups' errors {sum(p.error for p in probes):.4f} (took {sum(p.seconds for p in probes):.0f} s)"])
