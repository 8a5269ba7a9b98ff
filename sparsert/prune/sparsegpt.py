"""SparseGPT (Frantar & Alistarh, 2023): prune and compensate, layer by layer.

For a layer with weight ``W`` (rows x cols) and calibration inputs ``X``
(positions x cols), the loss of a change ``dW`` is ``tr(dW H dW^T) / 2`` with
``H = 2 X^T X``. Optimal Brain Surgeon removes weight ``(r, q)`` at the cost
``w_rq^2 / [H^-1]_qq`` and moves the rest of row ``r`` by
``-w_rq / [H^-1]_qq * H^-1[q, :]``. SparseGPT makes this affordable: columns
are processed left to right, and when column ``q`` is reached only the
columns to its right are updated, with the inverse Hessian of the remaining
columns — whose rows are exactly the rows of the upper Cholesky factor of
``H^-1`` (one factorisation per layer, in float64). Updates are applied
lazily: within a block of ``blocksize`` columns one by one, to the columns
right of the block in one matrix product.

The mask is chosen at the start of each column block from the scores
``w^2 / [H^-1]_qq`` of the partly updated weights (adaptive mask selection):
unstructured and RxC blocks prune the block's lowest groups to the target;
N:M chooses each group of M columns when its first column is reached.
``H`` is dampened by ``damp`` times its mean diagonal. (For ``"channel"``
the update cannot help — a removed output row has no kept weights to move —
so SparseGPT is then only an OBS-scored channel choice.)

``Pruner(model, importance="sparsegpt", sparsity=0.5).calibrate(batches).step()``
prunes every layer in the order the model runs them, each layer on the
inputs of the model with the earlier layers already pruned
(see :mod:`sparsert.prune.sequential`).

``target="dense"`` (default) aims every layer at the output the *unpruned*
model gave at that point, not at the layer's own output on the drifted
inputs: the weight is first refit by ridge least squares from the pruned
inputs to the unpruned outputs (:func:`dense_target_weight`), then pruned
with SparseGPT on the same Hessian; this undoes the drift of the earlier
layers as :mod:`sparsert.prune.reconstruct` does, inside the same pass.
``target="pruned"`` is the paper's objective.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import nn

from .criteria import CRITERIA, Criterion
from .masks import get_mask
from .patterns import Pattern, parse_pattern, weight_2d_shape
from .select import prune_lowest
from .sequential import sequential_grams

__all__ = ["SparseGPT", "sparsegpt_weight", "layer_error"]


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H)*I)^-1`` (``H^-1 = U^T U``)."""
    h = h.clone()
    diag = h.diagonal()
    dead = diag <= 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = mean  # inputs that are always zero: any finite curvature will do
    diag += damp * mean
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        try:
            if extra:
                h.diagonal().add_(extra * mean)
            lower = torch.linalg.cholesky(h)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("the layer's Hessian is not positive definite even after dampening")


def _block_size(pattern: Pattern, cols: int, blocksize: int) -> int:
    """A lazy-update block holds whole pattern groups (C columns, or M for N:M)."""
    if pattern.kind == "channel":
        return cols
    unit = pattern.b
    return max(unit, (blocksize // unit) * unit)


@torch.no_grad()
def sparsegpt_weight(weight: torch.Tensor, hessian: torch.Tensor, pattern: "str | Pattern" = "unstructured",
                     sparsity: float = 0.5, *, forced: torch.Tensor | None = None, blocksize: int = 128,
                     damp: float = 0.01, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes one ``(rows, cols)`` weight matrix with SparseGPT.

    Args:
        weight: the matrix (any float dtype; the work is done in float64).
        hessian: ``(cols, cols)`` ``X^T X`` of the layer's inputs (any positive scale).
        pattern: ``"unstructured"``, ``"RxC"``, ``"N:M"`` or ``"channel"``.
        sparsity: the fraction of weights to remove (ignored for N:M).
        forced: optional bool ``(rows, cols)``; True where a weight must be pruned
            (an earlier step's zeros). Counted within ``sparsity``.
        blocksize: columns per lazy-update block (rounded down to whole groups).
        damp: dampening, as a fraction of the mean diagonal of ``hessian``.
        mask: optional bool keep-mask; when given, no selection is done and only
            the compensating update for this fixed mask is computed.

    Returns:
        ``(new weight in float64 with exact zeros, keep-mask)``.
    """
    pattern = parse_pattern(pattern)
    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be {cols}x{cols}, got {tuple(hessian.shape)}")
    pattern.check(rows, cols)
    u = _inverse_cholesky(hessian.to(torch.float64), damp)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    forced = torch.zeros_like(pruned) if forced is None else forced.reshape(rows, cols).bool().cpu()
    bs = _block_size(pattern, cols, blocksize)
    total_k = 0 if pattern.kind == "nm" else int(round(sparsity * rows * cols))
    done_k = 0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        err1 = torch.zeros_like(w1)
        if mask is not None:
            prune1 = ~mask.reshape(rows, cols)[:, i1:i2].bool().cpu()
        elif pattern.kind == "nm":
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            # this block's share of the layer's count, rounded cumulatively so the total is exact
            k = int(round(total_k * i2 / cols)) - done_k
            score = (w1 * w1) / (d1 * d1).reshape(1, -1)
            score = score.masked_fill(forced[:, i1:i2], float("-inf"))
            gs, sz = pattern.group_scores(score)
            k = max(k, int(sz[torch.isneginf(gs)].sum()))  # earlier zeros stay zero
            keep = prune_lowest(gs, sz, k)
            prune1 = ~pattern.expand(keep, rows, i2 - i1)
            done_k += int(prune1.sum())
        for i in range(i2 - i1):
            if mask is None and pattern.kind == "nm" and i % pattern.b == 0:
                m = pattern.b
                score = w1[:, i:i + m] ** 2 / (d1[i:i + m] ** 2).reshape(1, -1)
                score = score.masked_fill(forced[:, i1 + i:i1 + i + m], float("-inf"))
                low = torch.topk(score, m - pattern.a, dim=1, largest=False).indices
                prune1[:, i:i + m].scatter_(1, low, True)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        pruned[:, i1:i2] = prune1
    w[pruned] = 0.0
    return w, ~pruned


def dense_target_weight(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight that best maps the pruned model's inputs ``X`` to what the unpruned
    layer gave on the unpruned inputs ``X_ref``: ``argmin ||X W'^T - X_ref W^T||^2 +
    lam ||W' - W||^2`` with ``gram = X^T X``, ``cross = X^T X_ref`` and ``lam`` =
    ``damp`` times the mean diagonal of ``gram``. Since this objective equals
    ``||X (W* - W')^T||^2`` plus a constant, pruning ``W*`` with SparseGPT on
    ``gram`` targets the unpruned model's outputs, not the drifted ones."""
    w = weight.double()
    g = gram.double()
    lam = damp * float(g.diagonal().mean()) if float(g.diagonal().mean()) > 0 else damp
    lhs = g + lam * torch.eye(g.shape[0], dtype=torch.float64)
    rhs = cross.double() @ w.T + lam * w.T  # (cols, rows)
    return torch.linalg.solve(lhs, rhs).T.contiguous()


def layer_error(w_old: torch.Tensor, w_new: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(dW H dW^T) / tr(W H W^T))`` on the calibration inputs."""
    w_old, w_new, h = w_old.double(), w_new.double(), hessian.double()
    dw = w_new - w_old
    num = float(((dw @ h) * dw).sum())
    den = float(((w_old @ h) * w_old).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


class SparseGPT(Criterion):
    """SparseGPT as a Pruner criterion: masks *and* compensating weight updates.

    ``Pruner(model, importance="sparsegpt", pattern=..., sparsity=...,
    blocksize=128, damp=0.01)``; needs ``calibrate(batches)``. The work happens
    in ``Pruner.step()``, layer after layer in execution order. Each layer is
    pruned to its own target (``scope`` must not be ``"global"``); the
    selection inside a layer is SparseGPT's own (per column block).
    ``errors`` holds each layer's relative output error on the calibration
    inputs after the last step.
    """

    name = "sparsegpt"
    needs_data = True
    preferred_scope = "layer"
    updates_weights = True

    def __init__(self, blocksize: int = 128, damp: float = 0.01, use_blocks: bool = True, target: str = "dense",
                 correction_damp: float = 0.1):
        if blocksize < 1:
            raise ValueError("blocksize must be >= 1")
        if not 0.0 <= damp or not 0.0 <= correction_damp:
            raise ValueError("damp and correction_damp must be >= 0")
        if target not in ("dense", "pruned"):
            raise ValueError("target must be 'dense' or 'pruned'")
        self.blocksize, self.damp, self.use_blocks = int(blocksize), float(damp), bool(use_blocks)
        self.target, self.correction_damp = target, float(correction_damp)
        self.errors: dict[str, float] = {}

    def __repr__(self):
        return f"SparseGPT(blocksize={self.blocksize}, damp={self.damp}, target={self.target!r})"

    @torch.no_grad()
    def scores(self, model, layers, data=None, loss_fn=None, progress=None):
        """OBS saliency ``w^2 / [H^-1]_jj`` on the unpruned inputs, without updates.

        Only :meth:`prune` (what ``Pruner.step()`` calls) also moves the kept
        weights; these scores serve ``compute_masks()`` and reports.
        """
        if data is None:
            raise ValueError("criterion 'sparsegpt' needs calibration data")
        out = {}
        for group, grams, _, _ in sequential_grams(model, dict(layers), data, progress, self.use_blocks):
            for name in group:
                w = layers[name].weight
                rows, cols = weight_2d_shape(w)
                u = _inverse_cholesky(grams[name], self.damp)
                inv_diag = (u * u).sum(0)  # diag(U^T U) = diag(H^-1)
                w2 = w.detach().reshape(rows, cols).double().cpu()
                out[name] = (w2 * w2 / inv_diag.reshape(1, -1)).float().reshape(w.shape).to(w.device)
        return out

    @torch.no_grad()
    def prune(self, model: nn.Module, layers: dict[str, nn.Module], targets: dict[str, tuple[Pattern, float]],
              data: Iterable, progress: bool | None = None) -> dict[str, torch.Tensor]:
        """Prunes ``layers`` (only those in ``targets``: ``{name: (pattern, sparsity)}``)
        in place, sequentially; returns their keep-masks (weight-shaped)."""
        todo = {n: layers[n] for n in layers if n in targets}
        masks: dict[str, torch.Tensor] = {}
        reference = copy.deepcopy(model) if self.target == "dense" else None
        for group, grams, _, cross in sequential_grams(model, todo, data, progress, self.use_blocks, reference):
            for name in group:
                module = todo[name]
                pattern, sparsity = targets[name]
                weight = module.weight
                rows, cols = weight_2d_shape(weight)
                old = get_mask(module)
                forced = None if old is None else ~old.reshape(rows, cols).cpu()
                w2 = weight.detach().reshape(rows, cols).cpu()
                if cross is not None:
                    w2 = dense_target_weight(w2, grams[name], cross[name], self.correction_damp)
                new, keep = sparsegpt_weight(w2, grams[name], pattern, sparsity, forced=forced,
                                             blocksize=self.blocksize, damp=self.damp)
                self.errors[name] = layer_error(w2, new, grams[name])
                weight.copy_(new.reshape(weight.shape).to(weight.device, weight.dtype))
                masks[name] = keep.reshape(weight.shape)
        return masks


CRITERIA[SparseGPT.name] = SparseGPT  # importance="sparsegpt" (sparsert.prune imports this module)
