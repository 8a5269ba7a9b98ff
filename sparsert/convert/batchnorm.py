"""Folding eval-mode BatchNorm2d into the Conv2d before it (so the pruned conv
weight, zeros kept, carries the normalisation)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..nn.surgery import swap
from .timing import call_model

__all__ = ["fold_batchnorm"]


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` in eval mode (zeros of the weight stay zeros)."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        w = conv.weight.to(torch.float64) * scale.reshape(-1, 1, 1, 1)
        b = shift if conv.bias is None else conv.bias.to(torch.float64) * scale + shift
        fused.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        fused.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and not bn.training
            and bn.track_running_stats and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _bn_pairs_from_hooks(model: nn.Module, run: Callable[[], Any]) -> list:
    """(conv name, bn name) where the BatchNorm's input is exactly the conv's output tensor,
    that conv output is used by nothing else, and each module runs once."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict = {}
    calls: dict = {}
    pairs = []
    handles = []

    def conv_hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        produced[id(out)] = (mod, out)

    def bn_hook(mod, args):
        calls[mod] = calls.get(mod, 0) + 1
        src = produced.get(id(args[0])) if args else None
        if src is not None and src[1] is args[0]:
            pairs.append((src[0], mod))

    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(conv_hook))
        elif type(m) is nn.BatchNorm2d:
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    seen = set()
    result = []
    for conv, bn in pairs:
        if calls.get(conv) == 1 and calls.get(bn) == 1 and conv not in seen and _foldable(conv, bn):
            seen.add(conv)
            result.append((names[conv], names[bn]))
    return result


def _bn_pairs_from_structure(model: nn.Module) -> list:
    """(conv name, bn name) for a Conv2d directly followed by a BatchNorm2d inside an nn.Sequential."""
    result = []
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            items = list(parent._modules.items())
            for (a, conv), (b, bn) in zip(items, items[1:]):
                if _foldable(conv, bn):
                    prefix = f"{pname}." if pname else ""
                    result.append((prefix + a, prefix + b))
    return result


def fold_batchnorm(model: nn.Module, example_inputs=None, *, _undo: Optional[list] = None) -> list:
    """Folds every eval-mode BatchNorm2d that directly follows a Conv2d into it
    (the conv is replaced by a fused copy and the BatchNorm by ``nn.Identity``).

    With ``example_inputs`` the pairs are found by running the model (the
    BatchNorm's input must be the conv's output tensor); without, only
    Conv2d -> BatchNorm2d neighbours inside an ``nn.Sequential`` are folded.
    Returns the folded ``(conv name, bn name)`` pairs.
    """
    undo = [] if _undo is None else _undo
    if example_inputs is not None:
        with torch.no_grad():
            pairs = _bn_pairs_from_hooks(model, lambda: call_model(model, example_inputs))
    else:
        pairs = _bn_pairs_from_structure(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        swap(model, conv_name, _fold_conv_bn(conv, bn), undo)
        swap(model, bn_name, nn.Identity(), undo)
    return pairs
