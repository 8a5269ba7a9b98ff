"""``report(model)``: per-layer and total sparsity, parameters, FLOPs removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._data import run

__all__ = ["report", "LayerReport", "PruneReport"]


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    flops: int  # dense multiply-adds × 2 (per forward of the example input, else per row/position)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    @property
    def flops_removed(self) -> int:
        return round(self.flops * self.sparsity)


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    total_params: int = 0  # every parameter of the model
    total_nonzero: int = 0
    per: str = "output row / position"

    @property
    def prunable_params(self) -> int:
        return sum(l.params for l in self.layers)

    @property
    def prunable_nonzero(self) -> int:
        return sum(l.nonzero for l in self.layers)

    @property
    def sparsity(self) -> float:
        """Sparsity over the reported (Linear/Conv) weights."""
        p = self.prunable_params
        return 1.0 - self.prunable_nonzero / p if p else 0.0

    @property
    def flops(self) -> int:
        return sum(l.flops for l in self.layers)

    @property
    def flops_removed(self) -> int:
        return sum(l.flops_removed for l in self.layers)

    def to_markdown(self) -> str:
        lines = [
            f"| layer | type | shape | params | nonzero | sparsity | FLOPs ({self.per}) | FLOPs removed |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for l in self.layers:
            lines.append(
                f"| {l.name} | {l.kind} | {'x'.join(map(str, l.shape))} | {l.params} | {l.nonzero} "
                f"| {l.sparsity:.1%} | {l.flops} | {l.flops_removed} |"
            )
        lines.append(
            f"| **total** | | | {self.prunable_params} | {self.prunable_nonzero} | {self.sparsity:.1%} "
            f"| {self.flops} | {self.flops_removed} ({self.flops_removed / max(self.flops, 1):.1%}) |"
        )
        lines.append(
            f"\nAll parameters: {self.total_params}, nonzero: {self.total_nonzero} "
            f"({1 - self.total_nonzero / max(self.total_params, 1):.1%} zero)."
        )
        return "\n".join(lines)

    __str__ = to_markdown


def report(
    model: nn.Module,
    example_input: Any = None,
    layer_types: tuple = (nn.Linear, nn.Conv1d, nn.Conv2d),
) -> PruneReport:
    """Sparsity of every Linear/Conv weight (zeros counted in the weight itself).

    FLOPs are ``2 · nonzero-or-dense MACs``. With ``example_input`` (a batch, as
    for calibration) they are for one forward of it; without, per output row
    (Linear: per token) and per output position (Conv).
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, layer_types)}
    positions: dict[str, int] = {n: 1 for n in layers}
    per = "per row / output position"
    if example_input is not None:
        per = "per forward"
        handles = []

        def make(name):
            def hook(mod, inp, out):
                positions[name] = out.numel() // out.shape[1 if isinstance(mod, nn.modules.conv._ConvNd) else -1]

            return hook

        for n, m in layers.items():
            handles.append(m.register_forward_hook(make(n)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                run(model, example_input)
        finally:
            model.train(was)
            for h in handles:
                h.remove()
    rep = PruneReport(per=per)
    for n, m in layers.items():
        w = m.weight.detach()
        rep.layers.append(
            LayerReport(
                name=n,
                kind=type(m).__name__,
                shape=tuple(w.shape),
                params=w.numel(),
                nonzero=int((w != 0).sum().item()),
                flops=2 * w.numel() * positions[n],
            )
        )
    for p in model.parameters():
        rep.total_params += p.numel()
        rep.total_nonzero += int((p.detach() != 0).sum().item())
    return rep
