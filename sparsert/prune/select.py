"""Selection: turn scores into keep-masks for one layer, per row, or globally."""

from __future__ import annotations

import math

import torch

__all__ = ["prune_lowest", "rowwise_keep", "global_counts"]


def prune_lowest(score: torch.Tensor, size: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (shape of ``score``) that prunes the lowest-score groups.

    Groups are removed in ascending score order while the number of removed
    elements (sum of ``size``) stays ``<= k``.
    """
    flat, sz = score.reshape(-1), size.reshape(-1)
    order = torch.argsort(flat, stable=True)
    pruned_sorted = torch.cumsum(sz[order], 0) <= k + 1e-6
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[pruned_sorted]] = False
    return keep.reshape(score.shape)


def rowwise_keep(score: torch.Tensor, size: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune each row of group scores (a block-row) to ``sparsity`` of its elements."""
    order = torch.argsort(score, dim=1, stable=True)
    sz = torch.gather(size, 1, order)
    k = torch.round(size.sum(1, keepdim=True) * sparsity)
    pruned_sorted = torch.cumsum(sz, 1) <= k + 1e-6
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(1, order, ~pruned_sorted)
    return keep


def global_counts(
    groups: list[tuple[torch.Tensor, torch.Tensor]],
    sparsity: float,
    lo: list[int],
    hi: list[int],
) -> list[int]:
    """Elements to prune per layer for one global ranking with per-layer bounds.

    ``groups[l] = (score, size)``; layer ``l`` must prune between ``lo[l]`` and
    ``hi[l]`` elements. Water-filling: rank all free layers' groups together,
    clamp the layers that leave their bounds, re-rank the rest, repeat.
    Raises ``ValueError`` if the bounds make the target infeasible.
    """
    n = [int(s.sum().item()) for _, s in groups]
    total_k = int(round(sparsity * sum(n)))
    if total_k < sum(lo) or total_k > sum(hi):
        raise ValueError(
            f"global sparsity {sparsity:.3f} cannot be reached with the per-layer density "
            f"bounds (prunable range {sum(lo)}..{sum(hi)} of {sum(n)} weights, need {total_k})"
        )
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(groups)) if i not in fixed]
        k = total_k - sum(fixed.values())
        counts = dict.fromkeys(free, 0)
        if free and k > 0:
            sc = torch.cat([groups[i][0].reshape(-1).float().cpu() for i in free])
            sz = torch.cat([groups[i][1].reshape(-1).float().cpu() for i in free])
            owner = torch.cat(
                [torch.full((groups[i][0].numel(),), j, dtype=torch.long) for j, i in enumerate(free)]
            )
            order = torch.argsort(sc, stable=True)
            sel = torch.cumsum(sz[order], 0) <= k + 1e-6
            per = torch.zeros(len(free), dtype=torch.float64).index_add_(
                0, owner[order[sel]], sz[order[sel]].double()
            )
            counts = {i: int(per[j].item()) for j, i in enumerate(free)}
        bad = {i: c for i, c in counts.items() if c < lo[i] or c > hi[i]}
        if not bad:
            counts.update(fixed)
            return [counts[i] for i in range(len(groups))]
        for i, c in bad.items():
            fixed[i] = min(max(c, lo[i]), hi[i])


def density_bounds(n: int, min_density: float, max_density: float) -> tuple[int, int]:
    """(min, max) elements to prune in a layer of ``n`` weights."""
    return math.ceil((1.0 - max_density) * n - 1e-9), math.floor((1.0 - min_density) * n + 1e-9)
