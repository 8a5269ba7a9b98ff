"""Importance criteria: one small class per signal, one interface.

``criterion.scores(model, layers, data, loss_fn, progress)`` returns
``{layer_name: score}`` with ``score`` shaped like the layer's weight; larger
means more important. ``data`` is any re-iterable of batches (a DataLoader or
a list; see :mod:`sparsert.prune._data` for batch forms).

Gradient-based criteria compute gradients with :func:`torch.autograd.grad`, so
they never write ``.grad`` (whatever was there before stays untouched), never
modify weights, run the model in eval mode (no dropout, no batch-norm
statistic updates) and restore the train/eval mode the model had.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._data import objective, progress_enabled, run

__all__ = [
    "Criterion",
    "Magnitude",
    "Gradient",
    "Taylor",
    "Activation",
    "Hessian",
    "Fisher",
    "Wanda",
    "CRITERIA",
    "get_criterion",
]


@contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.train(t)


@contextmanager
def _requires_grad(weights: list[torch.Tensor]):
    old = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w, r in zip(weights, old):
            w.requires_grad_(r)


def _token_mask(batch) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch (Hugging Face style), else ``None``."""
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m
    return None


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of a ``(B, T, F)`` activation that are real tokens (padding dropped)."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def _bar(data: Iterable, desc: str, progress: bool | None):
    return tqdm(data, desc=desc, disable=not progress_enabled(progress), leave=False)


def _run_hooked(model: nn.Module, data: Iterable, run, handles: list, current: list, desc: str,
                progress: bool | None) -> None:
    """Runs every calibration batch (eval mode, no grad) while the forward hooks in
    ``handles`` collect statistics, then removes the hooks. ``current[0]`` holds the
    batch's token mask for the hooks to read."""
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in _bar(data, desc, progress):
                current[0] = _token_mask(batch)
                run(model, batch)
    finally:
        for h in handles:
            h.remove()


class Criterion:
    """Base class. Subclasses set ``name`` and implement :meth:`scores`."""

    name = "base"
    needs_data = False
    #: selection scope used when the Pruner is given ``scope=None``
    preferred_scope = "layer"

    def scores(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        data: Iterable | None = None,
        loss_fn: Callable | None = None,
        progress: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Magnitude(Criterion):
    """``|w|`` — no data needed."""

    name = "magnitude"

    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        return {n: m.weight.detach().abs().float() for n, m in layers.items()}


class _GradientCriterion(Criterion):
    """Accumulates a function of per-batch gradients ``g_b = ∂L_b/∂w``."""

    needs_data = True
    default_objective = "sum"

    def _init(self, w: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(w, dtype=torch.float32)

    def _accumulate(self, acc, w, g) -> None:
        raise NotImplementedError

    def _finish(self, acc, w, nbatches) -> torch.Tensor:
        return acc / max(nbatches, 1)

    def _grads(self, model, weights, batch, loss_fn):
        out, target = run(model, batch)
        loss = objective(out, target, loss_fn, self.default_objective)
        return torch.autograd.grad(loss, weights, allow_unused=True)

    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        if data is None:
            raise ValueError(f"criterion {self.name!r} needs calibration data")
        names = list(layers)
        weights = [layers[n].weight for n in names]
        acc = [self._init(w) for w in weights]
        nb = 0
        with _eval_mode(model), _requires_grad(weights):
            for batch in _bar(data, f"{self.name} scores", progress):
                grads = self._grads(model, weights, batch, loss_fn)
                for a, w, g in zip(acc, weights, grads):
                    if g is None:
                        g = torch.zeros_like(w)
                    self._accumulate(a, w.detach().float(), g.detach().float())
                nb += 1
        if nb == 0:
            raise ValueError(f"criterion {self.name!r} got an empty calibration set")
        return {n: self._finish(a, w.detach().float(), nb) for n, a, w in zip(names, acc, weights)}


class Gradient(_GradientCriterion):
    """Weight contribution ``mean_b |∂y/∂w|`` (the seed's ∂y/∂θ_i).

    ``y`` is the model output summed (no labels, no ``loss_fn``) or the loss
    when labels / ``loss_fn`` are given.
    """

    name = "gradient"

    def _accumulate(self, acc, w, g):
        acc.add_(g.abs())


class Taylor(_GradientCriterion):
    """First-order Taylor ``mean_b |w · ∂L_b/∂w|`` (Molchanov et al.)."""

    name = "taylor"

    def _accumulate(self, acc, w, g):
        acc.add_((w * g).abs())


class Fisher(_GradientCriterion):
    """Diagonal empirical Fisher saliency ``½ · F_ii · w²`` with ``F_ii = mean_b g_b²``.

    Gradients are per *batch*; smaller calibration batches give a closer
    estimate of the per-sample Fisher.
    """

    name = "fisher"

    def _accumulate(self, acc, w, g):
        acc.add_(g * g)

    def _finish(self, acc, w, nb):
        return 0.5 * (acc / nb) * w * w


class Hessian(_GradientCriterion):
    """Optimal Brain Damage saliency ``½ · h_ii · w²``.

    ``estimator`` selects how the Hessian diagonal ``h_ii`` of the loss is estimated:

    * ``"hutchinson"`` (default): Hutchinson's method, ``h ≈ E[z ⊙ Hz]`` with
      Rademacher vectors ``z`` and exact Hessian-vector products (double
      backward), ``samples`` draws per batch. The estimate can be negative
      away from a minimum; ``|h_ii|`` is used.
    * ``"sqgrad"``: the squared-gradient (Gauss-Newton / Fisher)
      approximation ``h_ii ≈ mean_b g_b²``.

    Without labels and ``loss_fn`` the loss is ``½‖y‖²`` of the model output.
    """

    name = "hessian"
    default_objective = "sq"

    def __init__(self, estimator: str = "hutchinson", samples: int = 1, seed: int = 0):
        if estimator not in ("hutchinson", "sqgrad"):
            raise ValueError(f"unknown Hessian estimator {estimator!r}: use 'hutchinson' or 'sqgrad'")
        if samples < 1:
            raise ValueError("samples must be >= 1")
        self.estimator, self.samples, self.seed = estimator, samples, seed

    def __repr__(self):
        return f"Hessian(estimator={self.estimator!r}, samples={self.samples})"

    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        self._gen = torch.Generator().manual_seed(self.seed)
        return super().scores(model, layers, data, loss_fn, progress)

    def _grads(self, model, weights, batch, loss_fn):
        if self.estimator == "sqgrad":
            g = super()._grads(model, weights, batch, loss_fn)
            return [None if x is None else x * x for x in g]
        out, target = run(model, batch)
        loss = objective(out, target, loss_fn, self.default_objective)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        est = [None] * len(weights)
        for s in range(self.samples):
            zs = [
                (torch.randint(0, 2, weights[i].shape, generator=self._gen) * 2 - 1).to(
                    weights[i].device, weights[i].dtype
                )
                for i in used
            ]
            hz = torch.autograd.grad(
                [grads[i] for i in used], [weights[i] for i in used], grad_outputs=zs,
                retain_graph=s + 1 < self.samples, allow_unused=True,
            )
            for i, z, h in zip(used, zs, hz):
                if h is None:
                    continue
                e = (z * h).detach() / self.samples
                est[i] = e if est[i] is None else est[i] + e
        return est

    def _accumulate(self, acc, w, h):
        acc.add_(h)

    def _finish(self, acc, w, nb):
        return 0.5 * (acc / nb).abs() * w * w


class Activation(Criterion):
    """Activation frequency of each output unit (neuron / conv channel).

    From forward hooks over the calibration data, per output unit ``i``:

    * ``mode="apoz"``: the fraction of outputs that are positive, i.e.
      non-zero after a following ReLU (1 − APoZ, Hu et al. 2016);
    * ``mode="mean"``: the mean ``|activation|``.

    For dict batches with an ``attention_mask``, padding tokens are left out.

    The unit score ``a_i`` is broadcast to the unit's weights. With
    ``weighted=True`` (default) the weight score is ``a_i · |w_ij|`` so that
    element/block patterns still rank weights inside a unit; with
    ``weighted=False`` it is ``a_i`` alone (pure unit ranking, meant for
    ``pattern="channel"``).
    """

    name = "activation"
    needs_data = True

    def __init__(self, mode: str = "mean", weighted: bool = True):
        if mode not in ("mean", "apoz"):
            raise ValueError(f"unknown activation mode {mode!r}: use 'mean' or 'apoz'")
        self.mode, self.weighted = mode, weighted

    def __repr__(self):
        return f"Activation(mode={self.mode!r}, weighted={self.weighted})"

    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        if data is None:
            raise ValueError("criterion 'activation' needs calibration data")
        sums = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in layers.items()}
        counts = {n: 0 for n in layers}
        handles = []
        current: list = [None]  # attention mask of the batch being run

        def make_hook(name, module):
            conv = isinstance(module, nn.modules.conv._ConvNd)

            def hook(mod, inp, out):
                o = out.detach()
                if conv:
                    o = o.transpose(0, 1).reshape(o.shape[1], -1)
                else:
                    o = _real_tokens(o, current[0]).t()
                v = (o > 0).double() if self.mode == "apoz" else o.abs().double()
                sums[name] += v.sum(1).cpu()
                counts[name] += o.shape[1]

            return hook

        for n, m in layers.items():
            handles.append(m.register_forward_hook(make_hook(n, m)))
        _run_hooked(model, data, run, handles, current, "activation scores", progress)
        out = {}
        for n, m in layers.items():
            if counts[n] == 0:
                raise ValueError(f"layer {n!r} was never called on the calibration data")
            a = (sums[n] / counts[n]).float().to(m.weight.device)
            shape = (-1,) + (1,) * (m.weight.dim() - 1)
            s = a.reshape(shape).expand_as(m.weight)
            out[n] = (s * m.weight.detach().abs().float()) if self.weighted else s.clone()
        return out


class Wanda(Criterion):
    """Wanda (Sun et al. 2023): ``|w_ij| · ‖x_j‖₂``, compared within each output row.

    ``‖x_j‖₂`` is the L2 norm of input feature ``j`` over every token/position
    of the calibration data (for a Conv, over the unfolded input patches;
    for dict batches with an ``attention_mask``, padding tokens are left out). No
    gradients, no retraining; with ``scope=None`` the Pruner ranks weights per
    output row, as in the paper.
    """

    name = "wanda"
    needs_data = True
    preferred_scope = "row"

    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        if data is None:
            raise ValueError("criterion 'wanda' needs calibration data")
        sq: dict[str, torch.Tensor | None] = {n: None for n in layers}
        handles = []
        current: list = [None]  # attention mask of the batch being run

        def make_hook(name, module):
            def hook(mod, args):
                x = args[0].detach().float()
                if isinstance(mod, nn.Conv2d):
                    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                        raise ValueError(f"wanda supports Conv2d with numeric zero padding only ({name})")
                    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                    g = mod.groups
                    v = cols.pow(2).sum(dim=(0, 2)).reshape(g, -1)  # (groups, cin/g*kh*kw)
                elif isinstance(mod, nn.Linear):
                    v = _real_tokens(x, current[0]).pow(2).sum(0).reshape(1, -1)
                else:
                    raise TypeError(f"wanda supports Linear and Conv2d, not {type(mod).__name__}")
                sq[name] = v if sq[name] is None else sq[name] + v

            return hook

        for n, m in layers.items():
            handles.append(m.register_forward_pre_hook(make_hook(n, m)))
        _run_hooked(model, data, run, handles, current, "wanda scores", progress)
        out = {}
        for n, m in layers.items():
            if sq[n] is None:
                raise ValueError(f"layer {n!r} was never called on the calibration data")
            w = m.weight.detach().float()
            rows = w.shape[0]
            norms = sq[n].sqrt().to(w.device)
            norms = norms.repeat_interleave(rows // norms.shape[0], 0)  # (rows, cols)
            out[n] = w.reshape(rows, -1).abs() * norms
            out[n] = out[n].reshape(w.shape)
        return out


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c for c in (Magnitude, Gradient, Taylor, Activation, Hessian, Fisher, Wanda)
}


def get_criterion(importance: "str | Criterion", **kwargs) -> Criterion:
    """A criterion instance from a name (``kwargs`` go to its constructor) or an instance."""
    if isinstance(importance, Criterion):
        if kwargs:
            raise TypeError("criterion options can only be given with a criterion name")
        return importance
    if not isinstance(importance, str):
        raise TypeError(f"importance must be a name or a Criterion, got {type(importance).__name__}")
    key = importance.strip().lower()
    if key not in CRITERIA:
        raise ValueError(f"unknown importance criterion {importance!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[key](**kwargs)
