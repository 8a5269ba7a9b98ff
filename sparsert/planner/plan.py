"""The plan: per layer the sparsity, pattern and format that reach a target speedup
with the least estimated loss, in a table a person reads, and its frontier plot."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Mapping, Optional, Sequence

from ..prune.allocation import SensitivityTable
from .solver import Option, solve
from .tables import LayerTimes, TimeTables

__all__ = ["LayerPlan", "Plan", "build_plan", "uniform_plan", "two_level_plan", "fixed_plan", "uniform_points",
           "layer_options", "check_target", "check_reachable", "best_speedup", "TargetUnreachable"]


def check_target(target) -> float:
    """A target speedup must be a finite number; > 1 is checked against the tables."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(float(target)):
        raise ValueError(f"target_speedup must be a finite number greater than 1 (e.g. 2.0), got {target!r}")
    return float(target)


@dataclasses.dataclass
class LayerPlan:
    name: str
    pattern: Optional[str]      # None: left dense (on the best dense path)
    sparsity: float
    format: str                 # "dense" or the kind sparsify will pack ("csr", "bsr4x1", "nm2:4", ...)
    seconds: float              # predicted (measured table) time of the layer as planned
    baseline_seconds: float     # the layer on the baseline path
    error: float                # estimated relative output error (sensitivity table; 0 when dense)
    #: the group this layer runs in as one call ("q+k+v" names joined by "+"; "" alone): its ``seconds``
    #: is its share of the group's time, in proportion to the members' own times
    fused: str = ""

    @property
    def speedup(self) -> float:
        return self.baseline_seconds / self.seconds if self.seconds > 0 else math.inf


@dataclasses.dataclass
class Plan:
    """What the planner chose. ``print(plan)`` shows the table; ``plan.plot(path)`` the frontier."""

    layers: list                # [LayerPlan]
    target: float
    baseline: str
    model_seconds: float        # the whole model on the baseline path (measured)
    remainder: float            # time outside the prunable layers (measured, unchanged by pruning)
    best_speedup: float         # the fastest any choice gets (every layer at its fastest option)
    loss: float                 # summed squared relative errors of the choice
    frontier: list              # [(predicted speedup, least loss)] the solver explored
    uniform: list               # [(label, predicted speedup, loss)]: every layer one pattern and sparsity
    sensitivity_note: str = ""
    #: the candidate plans scored end to end before this one was chosen (empty: not scored);
    #: see :mod:`sparsert.planner.scoring`
    candidates: list = dataclasses.field(default_factory=list)
    label: str = "plan"         # which candidate this is ("plan", "uniform 4x1@0.8", "plan 4x1 only", ...)
    #: the layer groups pruned alone to calibrate the losses end to end (empty: not calibrated);
    #: see :func:`sparsert.planner.scoring.probe_groups`
    probes: list = dataclasses.field(default_factory=list)

    @property
    def predicted_seconds(self) -> float:
        return self.remainder + sum(l.seconds for l in self.layers)

    @property
    def predicted_speedup(self) -> float:
        return self.model_seconds / self.predicted_seconds

    @property
    def pruned(self) -> list:
        return [l for l in self.layers if l.pattern is not None]

    def __getitem__(self, name: str) -> LayerPlan:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def overrides(self) -> dict:
        """Per-layer settings for :class:`sparsert.prune.Pruner` (``overrides=``): the planned
        sparsity and pattern, or ``exclude`` for layers left dense. Keys are escaped names."""
        out = {}
        for l in self.layers:
            key = re.escape(l.name)
            out[key] = {"exclude": True} if l.pattern is None else {"sparsity": l.sparsity, "pattern": l.pattern}
        return out

    def formats(self) -> dict:
        """``{layer: kind}`` to pack each layer in ("dense": the best dense path)."""
        return {l.name: l.format for l in self.layers}

    def as_dict(self) -> dict:
        return {"target": self.target, "baseline": self.baseline, "model_seconds": self.model_seconds,
                "remainder_seconds": self.remainder, "predicted_seconds": self.predicted_seconds,
                "predicted_speedup": self.predicted_speedup, "best_speedup": self.best_speedup, "loss": self.loss,
                "label": self.label, "candidates": [c.as_dict() for c in self.candidates],
                "probes": [p.as_dict() for p in self.probes],
                "layers": [dataclasses.asdict(l) for l in self.layers]}

    def table(self) -> str:
        from ..convert.plan import _format_table

        base = "best dense" if self.baseline == "best_dense" else "torch"
        head = ["layer", "pattern", "sparsity", "format", "ms", f"{base} ms", "speedup", "sensitivity"]
        rows = [[l.name, l.pattern or "dense", f"{l.sparsity:.2f}", l.format + ("*" if l.fused else ""),
                 f"{l.seconds * 1e3:.3f}",
                 f"{l.baseline_seconds * 1e3:.3f}", f"{l.speedup:.2f}x", f"{l.error:.3f}"] for l in self.layers]
        lines = _format_table(head, rows)
        layer_base = sum(l.baseline_seconds for l in self.layers)
        lines.append(f"{len(self.pruned)}/{len(self.layers)} layers pruned; layers {layer_base * 1e3:.2f} -> "
                     f"{sum(l.seconds for l in self.layers) * 1e3:.2f} ms, rest of the model "
                     f"{self.remainder * 1e3:.2f} ms (measured, unchanged)")
        groups = {l.fused for l in self.layers if l.fused}
        if groups:
            lines.append(f"* run as one call with the other layers of its group ({len(groups)} groups: Q/K/V, "
                         f"gate/up of one format): the group's time, shared in proportion to the layers' own")
        lines.append(f"predicted end to end: {self.model_seconds * 1e3:.2f} -> {self.predicted_seconds * 1e3:.2f} ms "
                     f"= {self.predicted_speedup:.2f}x vs {base} (asked {self.target:g}x; best reachable "
                     f"{self.best_speedup:.2f}x); summed squared error {self.loss:.4f}"
                     + (f"; {self.sensitivity_note}" if self.sensitivity_note else ""))
        if self.candidates:
            from .scoring import candidates_table, probes_table

            lines.extend(probes_table(self.probes))
            lines.extend(candidates_table(self.candidates))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Saves the speed/quality frontier (least estimated loss per predicted speedup), the
        uniform single-pattern points and the chosen plan as an image (needs matplotlib)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plan.plot needs matplotlib: pip install matplotlib") from None
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        pts = sorted((s, l) for s, l in self.frontier if l > 0 or s <= 1.0001)
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label="planner frontier (per layer)")
        by_pattern: dict = {}
        for label, s, l in self.uniform:
            by_pattern.setdefault(label.split("@")[0], []).append((s, l))
        for pattern, p in by_pattern.items():
            p.sort()
            ax.plot([x[0] for x in p], [x[1] for x in p], "o--", ms=3, label=f"uniform {pattern}")
        ax.plot([self.predicted_speedup], [self.loss], "r*", ms=12, label=f"plan ({self.predicted_speedup:.2f}x)")
        ax.axvline(self.target, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(f"predicted speedup vs {self.baseline}")
        ax.set_ylabel("estimated loss (summed squared relative error)")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def best_speedup(tables: TimeTables, options: Optional[list] = None) -> float:
    """The predicted speedup with every layer at its fastest timed option (or ``options``)."""
    if options is None:
        def quickest(lt) -> float:
            return min([lt.dense] + [t for pts in lt.options.values() for t, _ in pts.values()])

        grouped = {n for g in tables.fused for n in g}
        fastest = (sum(quickest(lt) for n, lt in tables.layers.items() if n not in grouped)
                   + sum(min(sum(quickest(tables.layers[n]) for n in g), quickest(lt))
                         for g, lt in tables.fused.items()))
    else:
        fastest = sum(min(o.seconds for o in opts) for opts in options)
    return tables.model_seconds / (tables.remainder + fastest)


class TargetUnreachable(ValueError):
    """A target speedup above what this model can reach here; ``best`` is the best reachable one."""

    def __init__(self, message: str, target: float, best: float):
        super().__init__(message)
        self.target, self.best = target, best


def check_reachable(tables: TimeTables, target: float, best: Optional[float] = None) -> None:
    """ValueError, saying the best reachable speedup, for a target <= 1 or beyond it."""
    target = check_target(target)
    best = best_speedup(tables) if best is None else best
    base = "the best dense path" if tables.baseline == "best_dense" else "torch eager"
    if target <= 1.0:
        raise ValueError(f"target_speedup must be greater than 1, got {target:g} (this model can reach up to "
                         f"{best:.2f}x vs {base} here)")
    if target > best * (1 - 1e-9):
        raise TargetUnreachable(f"target_speedup {target:g}x is not reachable: the best reachable speedup for this "
                                f"model is {best:.2f}x vs {base} on this machine ({tables.threads} threads; the rest "
                                f"of the model takes {tables.remainder * 1e3:.2f} of {tables.model_seconds * 1e3:.2f} "
                                f"ms and no pruning changes it)", target, best)


def _loss(table: Optional[SensitivityTable], name: str, sparsity: float) -> Optional[float]:
    if table is None or name not in table.errors:
        return None
    return table.error(name, sparsity) ** 2


def layer_options(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable],
                  patterns: Optional[Sequence[str]] = None) -> tuple:
    """``(names, [[Option]] per layer)``: dense plus every timed (pattern, sparsity) that is
    faster than dense and has a quality estimate; ``patterns`` limits the patterns."""
    names = list(tables.layers)
    options: list = []
    for name in names:
        lt = tables.layers[name]
        opts = [Option(lt.dense, 0.0, (None, 0.0, "dense"))]
        for pattern, pts in lt.options.items():
            if patterns is not None and pattern not in patterns:
                continue
            for s, (seconds, kind) in pts.items():
                loss = _loss(sensitivity.get(pattern), name, s)
                if loss is None or seconds >= lt.dense:
                    continue  # no quality estimate, or no faster than dense: never worth it
                opts.append(Option(seconds, loss, (pattern, s, kind)))
        options.append(opts)
    return names, options


def _layer_plans(tables: TimeTables, names: Sequence[str], chosen: Sequence[Option]) -> list:
    layers = []
    for name, o in zip(names, chosen):
        pattern, s, kind = o.label[:3]
        lt = tables.layers[name]
        layers.append(LayerPlan(name, pattern, float(s), kind, o.seconds, lt.baseline(tables.baseline),
                                0.0 if pattern is None else math.sqrt(o.loss), o.label[3] if len(o.label) > 3 else ""))
    return layers


# ---------------------------------------------------------------- fused groups
# The served model runs each group of tables.fused (Q/K/V, gate/up) as one call when its layers share a
# format (sparsert.convert.streamline.fuse_linears), whatever their sparsities: then each layer costs its
# rows' share of the fused Linear's time at its own point (its own time there over the group's), in that
# format, which the fused Linear must have been timed in at every point the layers are at. Layers of one
# format that the fused tables cannot price are still fused when served but predicted as separate calls:
# a conservative estimate.

def _fused_formats(fused: LayerTimes, pattern: str, sparsity: float) -> dict:
    """``{format: seconds}`` of the fused Linear at a point (tables without every format's times:
    the fastest one's)."""
    kinds = fused.formats.get(pattern, {}).get(sparsity)
    if kinds:
        return kinds
    pt = fused.options.get(pattern, {}).get(sparsity)
    return {} if pt is None else {pt[1]: pt[0]}


def _one_call(tables: TimeTables, group: tuple, parts: Sequence[Option], kind: Optional[str] = None) -> Optional[list]:
    """The group's layers at their points in ``parts`` (their own Options, labelled ``(pattern,
    sparsity, format)``) run as one call in format ``kind`` (None: the format timed at all their
    points whose call is quickest): one Option per layer, its share of the fused Linear's time at
    its point, labelled ``(pattern, sparsity, fused format, group)`` (losses kept). None where that
    cannot be priced: dense and sparse layers mixed, a point the fused Linear or a layer was not
    timed at, or no such format."""
    fused = tables.fused[group]
    tag = "+".join(group)
    if all(o.label[0] is None for o in parts):
        own = [tables.layers[n].dense for n in group]
        share = sum(own)
        return [Option(fused.dense * (t / share if share > 0 else 1 / len(group)), 0.0, (None, 0.0, "dense", tag))
                for t in own]
    if any(o.label[0] is None for o in parts):
        return None
    points = [o.label[:2] for o in parts]
    shares, timed = [], []
    for n, (pattern, s) in zip(group, points):
        own = [tables.layers[m].options.get(pattern, {}).get(s) for m in group]
        kinds = _fused_formats(fused, pattern, s)
        if not kinds or any(t is None for t in own):
            return None
        total = sum(t[0] for t in own)
        shares.append(tables.layers[n].options[pattern][s][0] / total if total > 0 else 1 / len(group))
        timed.append(kinds)
    common = set.intersection(*(set(t) for t in timed))
    if kind is not None:
        common &= {kind}
    if not common:
        return None
    best = min(sorted(common), key=lambda k: sum(t[k] * sh for t, sh in zip(timed, shares)))
    return [Option(t[best] * sh, o.loss, (pattern, s, best, tag))
            for t, sh, o, (pattern, s) in zip(timed, shares, parts, points)]


def _served_as_is(tables: TimeTables, group: tuple, parts: Sequence[Option]) -> Optional[list]:
    """Layers of one format (dense too) run as one call in it when served: that call, where the fused
    tables price it; None for layers of different formats, or a call that cannot be priced."""
    kinds = {o.label[2] for o in parts}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    return _one_call(tables, group, parts, None if kind == "dense" else kind)


def _at_point(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], group: tuple,
              point: tuple) -> Optional[list]:
    """The group's layers all at ``point`` (``(None, 0.0)``: dense) as their own Options, from the
    tables (also where a layer alone is no faster than dense); None where one was not timed or scored."""
    pattern, s = point
    if pattern is None:
        return [Option(tables.layers[n].dense, 0.0, (None, 0.0, "dense")) for n in group]
    try:
        return [_point_option(tables, sensitivity, n, pattern, s) for n in group]
    except KeyError:
        return None


def _pareto(opts: list) -> list:
    """The options no other is both faster (or as fast) and less lossy than."""
    out, least = [], math.inf
    for o in sorted(opts, key=lambda o: (o.seconds, o.loss)):
        if o.loss < least - 1e-15:
            out.append(o)
            least = o.loss
    return out


def _items(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], names: Sequence[str],
           options: list, allowed=None) -> tuple:
    """The solver's items: each layer alone, and each fused group of ``tables.fused`` as one item whose
    options are its layers' own combinations, as separate calls and (where :func:`_one_call` prices it)
    as one call, plus the group in one call at every point its layers were all timed at
    (``allowed(pattern, sparsity)``), also where a layer alone is no faster than dense (SmolLM2's 192-row
    k_proj may not pay alone, but in one call with q and v). Each option's label is the list of its
    layers' Options. Returns ``(layers per item, [[Option]] per item)``."""
    index = {n: i for i, n in enumerate(names)}
    groups = [g for g in tables.fused if all(n in index for n in g)]
    grouped = {n for g in groups for n in g}
    members = [(n,) for n in names if n not in grouped]
    items = [[Option(o.seconds, o.loss, [o]) for o in options[index[n]]] for (n,) in members]

    def add(opts: list, parts: Sequence[Option]) -> None:
        opts.append(Option(sum(o.seconds for o in parts), sum(o.loss for o in parts), list(parts)))

    for g in groups:
        own = [options[index[n]] for n in g]
        opts: list = []
        combos = [(parts, True) for parts in itertools.product(*own)]  # (parts, offered alone too)
        timed = [{(p, x) for p, pts in tables.layers[n].options.items() for x in pts
                  if allowed is None or allowed(p, x)} for n in g]
        if all(any(o.label[0] is None for o in opts_n) for opts_n in own):  # dense is a choice here
            timed = [t | {(None, 0.0)} for t in timed]
        have = {tuple(o.label[:2] for o in parts) for parts, _ in combos}
        for point in set.intersection(*timed):
            if (point,) * len(g) not in have:  # a point some layer alone was not offered at
                parts = _at_point(tables, sensitivity, g, point)
                if parts is not None:
                    combos.append((tuple(parts), False))
        for parts, offered in combos:
            one = _one_call(tables, g, parts)  # repacked in the quickest format the fused Linear has there
            if one is not None:
                add(opts, one)
            if offered:  # as chosen: one call where they share a format, else separate calls
                add(opts, _served_as_is(tables, g, parts) or parts)
        members.append(g)
        items.append(_pareto(opts))
    return members, items


def _solve_items(members: list, items: list, names: Sequence[str], budget: float, bins: int) -> tuple:
    """Solves over :func:`_items`' output: ``(Solution, the chosen Option per layer of names)``."""
    sol = solve(items, budget, bins=bins)
    picked = {}
    for m, opts, j in zip(members, items, sol.choice):
        picked.update(zip(m, opts[j].label))
    return sol, [picked[n] for n in names]


def _as_served(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], names: Sequence[str],
               chosen: list) -> list:
    """``chosen`` (one Option per layer) as the served model runs it: a fused group whose layers share
    one format runs as one call in it where the fused tables price it (:func:`_served_as_is`), and
    is repacked into the fused Linear's quickest format at their points where that call is quicker
    still (or quicker than the separate calls of layers in different formats). Everything else as
    chosen."""
    index = {n: i for i, n in enumerate(names)}
    out = list(chosen)
    for g in tables.fused:
        if not all(n in index for n in g):
            continue
        parts = [out[index[n]] for n in g]
        served = _served_as_is(tables, g, parts) or parts
        quickest = _one_call(tables, g, parts)  # repacked in the quickest format the fused Linear has
        if quickest is not None and sum(o.seconds for o in quickest) < sum(o.seconds for o in served):
            served = quickest
        for n, o in zip(g, served):
            out[index[n]] = o
    return out


def uniform_points(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable]) -> list:
    """``[(pattern, sparsity, predicted speedup, summed loss)]``: every timed layer at one
    pattern and sparsity (only the points every layer was timed and scored at)."""
    names = list(tables.layers)
    out = []
    for pattern in sorted({p for lt in tables.layers.values() for p in lt.options}):
        for s in sorted({s for lt in tables.layers.values() for s in lt.options.get(pattern, {})}):
            chosen = []
            for name in names:
                pt = tables.layers[name].options.get(pattern, {}).get(s)
                l = _loss(sensitivity.get(pattern), name, s)
                if pt is None or l is None:
                    break
                chosen.append(Option(pt[0], l, (pattern, s, pt[1])))
            else:
                chosen = _as_served(tables, sensitivity, names, chosen)
                t = tables.remainder + sum(o.seconds for o in chosen)
                out.append((pattern, float(s), tables.model_seconds / t, sum(o.loss for o in chosen)))
    return out


def _point_option(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], name: str, pattern: str,
                  sparsity: float) -> Option:
    """Layer ``name`` at one timed ``(pattern, sparsity)`` as a solver option labelled
    ``(pattern, sparsity, format)``; ``KeyError`` if that point was not timed or scored."""
    seconds, kind = tables.layers[name].options[pattern][sparsity]
    loss = _loss(sensitivity.get(pattern), name, sparsity)
    if loss is None:
        raise KeyError(f"{name}: no {pattern} sensitivity")
    return Option(seconds, loss, (pattern, sparsity, kind))


def fixed_plan(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float,
               choice: Mapping[str, Optional[tuple]], *, sensitivity_note: str = "") -> Plan:
    """Each layer of the tables at the timed ``(pattern, sparsity)`` that ``choice`` gives it, or
    dense (``None``, ``(None, 0.0)`` or absent), as a Plan (the solver's frontier left empty); ``KeyError`` if a
    chosen point was not timed or scored for that layer."""
    names = list(tables.layers)
    unknown = [n for n in choice if n not in tables.layers]
    if unknown:
        raise KeyError(f"not in the time tables: {unknown[:5]}")
    chosen = []
    for name in names:
        lt = tables.layers[name]
        point = choice.get(name)
        if point is None or point[0] is None:
            chosen.append(Option(lt.dense, 0.0, (None, 0.0, "dense")))
            continue
        chosen.append(_point_option(tables, sensitivity, name, *point))
    chosen = _as_served(tables, sensitivity, names, chosen)
    return Plan(_layer_plans(tables, names, chosen), float(target), tables.baseline, tables.model_seconds,
                tables.remainder, best_speedup(tables), sum(o.loss for o in chosen), [],
                [(f"{p}@{s:g}", sp, l) for p, s, sp, l in uniform_points(tables, sensitivity)], sensitivity_note)


def uniform_plan(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float, pattern: str,
                 sparsity: float, *, sensitivity_note: str = "") -> Plan:
    """Every layer of the tables at ``pattern`` and ``sparsity`` (a timed point), as a Plan
    (the solver's frontier left empty); ``KeyError`` if a layer was not timed or scored there."""
    return fixed_plan(tables, sensitivity, target, {n: (pattern, sparsity) for n in tables.layers},
                      sensitivity_note=sensitivity_note)


def two_level_plan(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float, pattern: str,
                   low: float, high: float, *, bins: int = 4000, sensitivity_note: str = "") -> Plan:
    """Every layer at ``pattern`` and one of two adjacent timed sparsities: ``high`` (whose uniform
    plan reaches ``target``) where the solver needs it and ``low`` elsewhere, so the plan lands on
    the target instead of overshooting it by a step of the grid (one step between 0.75 and 0.8
    moves MiniLM's predicted speedup by ~8%). ``KeyError`` if a layer lacks either point;
    ``ValueError`` if uniform ``high`` does not reach the target."""
    target = check_target(target)
    names = list(tables.layers)
    options = [[_point_option(tables, sensitivity, n, pattern, s) for s in (low, high)] for n in names]
    members, items = _items(tables, sensitivity, names, options, lambda p, x: p == pattern and x in (low, high))
    _, chosen = _solve_items(members, items, names, tables.model_seconds / target - tables.remainder, bins)
    return fixed_plan(tables, sensitivity, target, {n: o.label[:2] for n, o in zip(names, chosen)},
                      sensitivity_note=sensitivity_note)


def _group_options(names: Sequence[str], options: list, groups: Mapping[str, Sequence[str]]) -> tuple:
    """Options per group of layers that must share one (pattern, sparsity) or stay dense
    together: the points every member has, their times and losses summed. Layers in no group
    are groups of one. Returns ``(members per group, [[Option]] per group)``."""
    index = {n: i for i, n in enumerate(names)}
    grouped = [list(m) for m in groups.values()]
    seen = {n for m in grouped for n in m}
    unknown = sorted(seen - set(index))
    if unknown:
        raise ValueError(f"groups name layers that are not in the tables: {unknown[:5]}")
    if sum(len(m) for m in grouped) != len(seen):
        raise ValueError("a layer is in more than one group")
    grouped += [[n] for n in names if n not in seen]
    out = []
    for members in grouped:
        by_point = [{o.label[:2]: o for o in options[index[n]]} for n in members]
        common = set(by_point[0]).intersection(*by_point[1:])
        opts = []
        for point in sorted(common, key=lambda p: (p[0] is not None, p[0] or "", p[1])):
            parts = [bp[point] for bp in by_point]
            opts.append(Option(sum(o.seconds for o in parts), sum(o.loss for o in parts), (point, parts)))
        out.append((members, opts))
    return [m for m, _ in out], [o for _, o in out]


def build_plan(tables: TimeTables, sensitivity: Mapping[str, SensitivityTable], target: float, *,
               bins: int = 4000, sensitivity_note: str = "", patterns: Optional[Sequence[str]] = None,
               groups: Optional[Mapping[str, Sequence[str]]] = None) -> Plan:
    """Solves for the per-layer choice (see :mod:`sparsert.planner.solver`); ``patterns``
    limits the patterns the solver may give a layer (default: every timed one); ``groups``
    (``{name: [layer, ...]}``) makes the layers of each group share one pattern and sparsity
    (or stay dense together): the solver then chooses per group, e.g. per kind of layer of a
    transformer block (:func:`sparsert.planner.scoring.layer_groups`). Layers the served model runs
    as one call (``tables.fused``) are solved as one item (see :func:`_items`); with ``groups`` they
    are solved apart and then timed as served.

    Raises ``ValueError`` for a target <= 1 or beyond the best reachable speedup (saying it).
    """
    target = check_target(target)
    names, options = layer_options(tables, sensitivity, patterns)
    remainder, total = tables.remainder, tables.model_seconds
    if groups is not None:
        members, group_opts = _group_options(names, options, groups)
        check_reachable(tables, target, best_speedup(tables, group_opts))
        sol = solve(group_opts, total / target - remainder, bins=bins)
        picked = {}
        for m, opts, j in zip(members, group_opts, sol.choice):
            picked.update(zip(m, opts[j].label[1]))
        layers = _layer_plans(tables, names, _as_served(tables, sensitivity, names, [picked[n] for n in names]))
        frontier = [(total / (remainder + t), loss) for t, loss in sol.frontier if remainder + t > 0]
        uniform = [(f"{p}@{s:g}", sp, l) for p, s, sp, l in uniform_points(tables, sensitivity)]
        return Plan(layers, target, tables.baseline, total, remainder, best_speedup(tables, group_opts), sol.loss,
                    frontier, uniform, sensitivity_note)
    members, items = _items(tables, sensitivity, names, options,
                            None if patterns is None else (lambda p, _: p in patterns))
    check_reachable(tables, target, best_speedup(tables, items))
    sol, chosen = _solve_items(members, items, names, total / target - remainder, bins)
    layers = _layer_plans(tables, names, chosen)
    frontier = [(total / (remainder + t), loss) for t, loss in sol.frontier if remainder + t > 0]
    uniform = [(f"{p}@{s:g}", sp, l) for p, s, sp, l in uniform_points(tables, sensitivity)]
    return Plan(layers, target, tables.baseline, total, remainder, best_speedup(tables, items), sol.loss, frontier,
                uniform, sensitivity_note)
