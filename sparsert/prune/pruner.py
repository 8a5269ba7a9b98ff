"""The Pruner: score importance, remove the least important share, on a schedule."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .allocation import (ALLOCATIONS, DEFAULT_MAX_SHIFT, MAX_SPARSITY, SensitivityTable, allocate_from_table,
                         owl_sparsities, sensitivity_grid, sensitivity_table)
from .criteria import Criterion, get_criterion
from .masks import apply_mask, get_mask
from .patterns import Pattern, parse_pattern, weight_2d_shape
from .schedules import Schedule, get_schedule
from .select import density_bounds, global_counts, prune_lowest, rowwise_keep

__all__ = ["Pruner", "prune", "DEFAULT_LAYER_TYPES"]

DEFAULT_LAYER_TYPES = (nn.Linear, nn.Conv2d)
_SCOPES = ("layer", "global", "row")
_OVERRIDE_KEYS = {"sparsity", "pattern", "min_density", "max_density", "exclude"}


def _matches(name: str, key: str) -> bool:
    """Exact module name, a dotted prefix (``"encoder"`` matches ``"encoder.fc"``), or a regex."""
    if name == key or name.startswith(key + "."):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _check_sparsity(s: Any, what: str = "sparsity") -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {s!r}")
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {s}")
    return s


class Pruner:
    """Prune the Linear/Conv2d layers of ``model`` in place.

    Args:
        model: the model to prune (modified in place by :meth:`step`).
        importance: criterion name (``"magnitude"``, ``"gradient"``, ``"taylor"``,
            ``"activation"``, ``"hessian"``, ``"fisher"``, ``"wanda"``, ``"sparsegpt"``
            (masks and compensating weight updates, layer by layer)) or a
            :class:`~sparsert.prune.criteria.Criterion` instance.
        pattern: ``"unstructured"``, ``"RxC"``, ``"N:M"`` or ``"channel"``
            (see :mod:`sparsert.prune.patterns`). N:M layers always get sparsity
            ``1 - N/M``; ``sparsity`` does not apply to them.
        sparsity: target fraction of weights removed, in ``[0, 1)``.
        scope: ``"layer"`` (each layer to the target), ``"global"`` (one
            ranking across layers, bounded by ``min_density``/``max_density``),
            ``"row"`` (each output row / block-row to the target), or ``None``
            for the criterion's preference (``"row"`` for wanda unless the
            pattern is ``"channel"``, else ``"layer"``).
        exclude: module names / dotted prefixes / regexes never pruned.
        include: if given, only matching modules are considered.
        overrides: ``{name_or_regex: {"sparsity": .., "pattern": .., "min_density": ..,
            "max_density": .., "exclude": bool}}``; the first matching key wins.
            Layers with their own sparsity (or an N:M pattern) are pruned to it
            on their own, outside the global ranking.
        min_density, max_density: per-layer bounds on the kept fraction (global scope).
        schedule: ``"oneshot"``, ``"iterative"``, ``"gradual"`` or a Schedule.
        layer_types: module types to prune.
        progress: tqdm bars for calibration loops (``None``: only on a TTY).
        allocation: how the target is spread over the layers (not with
            ``scope="global"``): ``"uniform"`` (each layer to ``sparsity``),
            ``"owl"`` (outlier-weighted, needs data), ``"sensitivity"``
            (measured per-layer error table, needs data) or a ready
            :class:`~sparsert.prune.allocation.SensitivityTable`. The mean over
            the allocated layers (weighted by size) is ``sparsity``; layers with
            their own sparsity override or an N:M pattern keep theirs.
            ``pruner.layer_sparsity`` shows the result after the first step.
            The ``"sensitivity"`` table measures this pruner's pattern on a grid
            reaching ``sparsity + max_shift`` (:func:`~sparsert.prune.allocation.sensitivity_grid`).
        allocation_options: keyword arguments for the allocation
            (:func:`~sparsert.prune.allocation.owl_sparsities`,
            :func:`~sparsert.prune.allocation.sensitivity_table` and
            :func:`~sparsert.prune.allocation.allocate_from_table`).
        **criterion_options: passed to the criterion's constructor
            (e.g. ``estimator="sqgrad"`` for ``hessian``).

    Every argument is validated here, before anything is modified.
    """

    def __init__(
        self,
        model: nn.Module,
        importance: "str | Criterion" = "magnitude",
        pattern: "str | Pattern" = "unstructured",
        sparsity: float = 0.5,
        scope: str | None = None,
        exclude: Sequence[str] = (),
        include: Sequence[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        min_density: float = 0.0,
        max_density: float = 1.0,
        schedule: "str | Schedule" = "oneshot",
        layer_types: tuple = DEFAULT_LAYER_TYPES,
        progress: bool | None = None,
        allocation: "str | Any" = "uniform",
        allocation_options: Mapping[str, Any] | None = None,
        **criterion_options: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.criterion = get_criterion(importance, **criterion_options)
        self.pattern = parse_pattern(pattern)
        self.sparsity = _check_sparsity(sparsity)
        if scope is None:
            scope = self.criterion.preferred_scope
            if scope == "row" and self.pattern.kind == "channel":
                scope = "layer"

        if scope not in _SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {_SCOPES}")
        self.scope = scope
        if getattr(self.criterion, "updates_weights", False) and scope == "global":
            raise ValueError(f"criterion {self.criterion.name!r} prunes each layer to its own target: "
                             "use scope='layer'")
        if isinstance(allocation, str):
            allocation = allocation.strip().lower()
            if allocation not in ALLOCATIONS:
                raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
        elif not isinstance(allocation, SensitivityTable):
            raise TypeError("allocation must be a name or a SensitivityTable")
        if allocation != "uniform" and scope == "global":
            raise ValueError("a layer allocation and scope='global' both decide per-layer sparsity: pick one")
        self.allocation = allocation
        self.allocation_options = dict(allocation_options or {})
        #: the sparsity each layer is pruned to (filled at the first step)
        self.layer_sparsity: dict[str, float] = {}
        #: the sensitivity table computed for ``allocation="sensitivity"``
        self.sensitivity: SensitivityTable | None = None
        if isinstance(exclude, str):
            exclude = [exclude]
        if isinstance(include, str):
            include = [include]
        self.schedule = get_schedule(schedule)
        self.progress = progress
        for v, what in ((min_density, "min_density"), (max_density, "max_density")):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], got {v}")
        if min_density > max_density:
            raise ValueError("min_density must be <= max_density")
        overrides = dict(overrides or {})
        for key, ov in overrides.items():
            unknown = set(ov) - _OVERRIDE_KEYS
            if unknown:
                raise ValueError(f"override {key!r} has unknown keys {sorted(unknown)}")

        # Resolve the layers and their settings.
        self.layers: dict[str, nn.Module] = {}
        self.settings: dict[str, dict[str, Any]] = {}
        for name, module in model.named_modules():
            if not isinstance(module, layer_types) or getattr(module, "weight", None) is None:
                continue
            if include is not None and not any(_matches(name, k) for k in include):
                continue
            if any(_matches(name, k) for k in exclude):
                continue
            ov = next((o for k, o in overrides.items() if _matches(name, k)), {})
            if ov.get("exclude", False):
                continue
            st = {
                "pattern": parse_pattern(ov.get("pattern", self.pattern)),
                "sparsity": _check_sparsity(ov["sparsity"], f"sparsity override for {name}")
                if "sparsity" in ov
                else self.sparsity,
                "own": "sparsity" in ov,
                "min_density": float(ov.get("min_density", min_density)),
                "max_density": float(ov.get("max_density", max_density)),
            }
            rows, cols = weight_2d_shape(module.weight)
            st["pattern"].check(rows, cols, name)
            if self.scope == "row" and st["pattern"].kind == "channel":
                raise ValueError(f"scope='row' cannot be used with the channel pattern ({name})")
            self.layers[name] = module
            self.settings[name] = st
        if not self.layers:
            raise ValueError("no prunable layers found (check layer_types, include and exclude)")
        self._data: Iterable | None = None
        self._loss_fn: Callable | None = None
        self._step = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------ calibration
    def calibrate(self, batches: Iterable, loss_fn: Callable | None = None) -> "Pruner":
        """Give the criterion its calibration data (kept for every scheduled step).

        ``batches`` is any re-iterable of batches; a one-shot iterator is
        materialised into a list. ``loss_fn(output, target)`` (or
        ``loss_fn(output)`` for target-less batches) defines the objective of
        gradient-based criteria; see :func:`sparsert.prune._data.objective`.
        """
        if isinstance(batches, Iterator):
            batches = list(batches)
        if batches is None or (hasattr(batches, "__len__") and len(batches) == 0):
            raise ValueError("calibrate() needs at least one batch")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        self._data, self._loss_fn = batches, loss_fn
        return self

    # ------------------------------------------------------------------ steps
    @property
    def done(self) -> bool:
        """True once the schedule has reached its last step."""
        return self._step >= self.schedule.num_steps

    def step(self) -> dict[str, float] | None:
        """Apply the one-shot masks or the next scheduled step.

        Returns ``{layer: sparsity}`` after a pruning step, ``None`` when the
        schedule prunes nothing at this step.
        """
        if self.criterion.needs_data and self._data is None:
            raise ValueError(
                f"criterion {self.criterion.name!r} needs calibration data: call "
                "pruner.calibrate(batches) before pruner.step()"
            )
        t = self._step
        if self.schedule.sparsity_at(t, self.sparsity) is None:
            self._step += 1
            return None
        self._allocate()
        if getattr(self.criterion, "updates_weights", False):
            targets = {}
            for name in self.layers:
                st = self.settings[name]
                pat = st["pattern"]
                s = self.schedule.sparsity_at(t, self.layer_sparsity[name])
                if s is not None or pat.kind == "nm":
                    targets[name] = (pat, s or 0.0)
            masks = self.criterion.prune(self.model, self.layers, targets, self._data, self.progress)
        else:
            masks = self.compute_masks(t)
        for name, keep in masks.items():
            apply_mask(self.layers[name], keep)
        self._step += 1
        result = {n: 1.0 - get_mask(m).float().mean().item() for n, m in self.layers.items()}
        self.history.append(result)
        return result

    def _allocate(self) -> None:
        """Resolves ``layer_sparsity`` once (the allocation looks at the unpruned model)."""
        if self.layer_sparsity:
            return
        fixed = {n: st["sparsity"] for n, st in self.settings.items() if st["own"] or st["pattern"].kind == "nm"}
        free = {n: m for n, m in self.layers.items() if n not in fixed}
        alloc = {n: self.sparsity for n in free}
        opts = dict(self.allocation_options)
        if free and self.allocation != "uniform":
            if self._data is None and not isinstance(self.allocation, SensitivityTable):
                raise ValueError("allocation needs calibration data: call pruner.calibrate(batches) first")
            if self.allocation == "owl":
                alloc = owl_sparsities(self.model, free, self._data, self.sparsity, progress=self.progress, **opts)
            else:
                table = self.allocation
                if not isinstance(table, SensitivityTable):
                    keys = ("sparsities", "pattern", "method", "damp")
                    table_opts = {k: opts.pop(k) for k in keys if k in opts}
                    # the errors of the masks this pruner will make, measured wherever the allocation may go
                    table_opts.setdefault("pattern", self.pattern)
                    reach = sensitivity_grid(self.sparsity, opts.get("max_shift", DEFAULT_MAX_SHIFT),
                                             opts.get("hi", MAX_SPARSITY))
                    table_opts.setdefault("sparsities", reach)
                    table = sensitivity_table(self.model, free, self._data, progress=self.progress, **table_opts)
                    self.sensitivity = table
                alloc = allocate_from_table(table, self.sparsity, list(free), **opts)
        self.layer_sparsity = {**alloc, **fixed}

    def compute_masks(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """Keep-masks for the given schedule step, without modifying the model."""
        step = self._step if step is None else step
        self._allocate()
        scores = self.criterion.scores(self.model, self.layers, self._data, self._loss_fn, self.progress)
        masks: dict[str, torch.Tensor] = {}
        pool: list[str] = []
        grouped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in self.layers.items():
            st = self.settings[name]
            pat: Pattern = st["pattern"]
            w = module.weight
            rows, cols = weight_2d_shape(w)
            s = torch.nan_to_num(scores[name].detach().float().reshape(rows, cols), nan=0.0)
            old = get_mask(module)
            if old is not None:
                s = s.masked_fill(~old.reshape(rows, cols).to(s.device), float("-inf"))
            target = self.schedule.sparsity_at(step, self.layer_sparsity[name])
            if pat.kind == "nm":
                masks[name] = pat.nm_mask(s)
                continue
            gs, sz = pat.group_scores(s)
            if self.scope == "global" and not st["own"]:
                pool.append(name)
                grouped[name] = (gs, sz)
                continue
            if self.scope == "row":
                keep = rowwise_keep(gs, sz, target)
            else:
                keep = prune_lowest(gs, sz, int(round(target * rows * cols)))
            masks[name] = pat.expand(keep, rows, cols)
        if pool:
            target = self.schedule.sparsity_at(step, self.sparsity)
            bounds = [
                density_bounds(
                    int(grouped[n][1].sum().item()),
                    self.settings[n]["min_density"],
                    self.settings[n]["max_density"],
                )
                for n in pool
            ]
            counts = global_counts(
                [grouped[n] for n in pool], target, [b[0] for b in bounds], [b[1] for b in bounds]
            )
            for name, k in zip(pool, counts):
                gs, sz = grouped[name]
                rows, cols = weight_2d_shape(self.layers[name].weight)
                keep = prune_lowest(gs, sz, k)
                masks[name] = self.settings[name]["pattern"].expand(keep, rows, cols)
        return {n: m.reshape(self.layers[n].weight.shape) for n, m in masks.items()}

    def __repr__(self) -> str:
        return (
            f"Pruner({self.criterion!r}, pattern={self.pattern}, sparsity={self.sparsity}, "
            f"scope={self.scope!r}, layers={len(self.layers)})"
        )


def prune(
    model: nn.Module,
    importance: "str | Criterion" = "magnitude",
    pattern: "str | Pattern" = "unstructured",
    sparsity: float = 0.5,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    **kwargs: Any,
) -> nn.Module:
    """One-call one-shot pruning: ``Pruner(...)``, ``calibrate(data)``, ``step()``.

    Returns ``model`` (pruned in place, with masks attached).
    """
    kwargs.setdefault("schedule", "oneshot")
    p = Pruner(model, importance=importance, pattern=pattern, sparsity=sparsity, **kwargs)
    if data is not None:
        p.calibrate(data, loss_fn)
    while True:
        p.step()
        if p.done:
            break
    return model
