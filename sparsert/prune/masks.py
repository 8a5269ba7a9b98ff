"""Masks that keep pruned weights exactly zero.

After pruning, the weight tensor itself holds exact zeros at pruned positions
(later stages detect sparsity by looking at the weights), and a boolean mask
is kept as a *non-persistent* buffer ``sparsert_mask`` on the module: it moves
with ``.to()``, survives ``copy.deepcopy`` and never appears in
``state_dict`` (no ``weight_orig``/``weight_mask`` doubling on disk).

Zeros survive any ``torch.optim`` optimizer (SGD momentum, Adam, AdamW weight
decay, ...): one global optimizer *pre*-step hook zeroes the gradients at
pruned positions and one *post*-step hook multiplies the weights by their mask
again. The hooks only touch parameters of the optimizer being stepped that
belong to masked modules. No forward hook modifies weights, so several
forwards before one backward stay valid.

After ``load_state_dict`` of a pruned checkpoint into a fresh model the zeros
are in the weights; :func:`masks_from_zeros` re-attaches the masks.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

__all__ = [
    "MASK_BUFFER",
    "apply_mask",
    "apply_masks",
    "get_mask",
    "masked_modules",
    "masks_from_zeros",
    "remove_masks",
]

MASK_BUFFER = "sparsert_mask"

_REGISTRY: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_HOOKS: list = []


def _register(module: nn.Module) -> None:
    _REGISTRY.add(module)
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _HOOKS.append(register_optimizer_step_post_hook(_post_step))


def _mask_pre_hook(module: nn.Module, args) -> None:
    # Copies made by deepcopy/pickle carry the buffer and this hook but are not
    # in the registry yet; a forward registers them (cheap set insertion).
    if module not in _REGISTRY and getattr(module, MASK_BUFFER, None) is not None:
        _register(module)
    return None


def _masked_params(optimizer: torch.optim.Optimizer):
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for module in list(_REGISTRY):
        mask = getattr(module, MASK_BUFFER, None)
        w = getattr(module, "weight", None)
        if mask is not None and w is not None and id(w) in ids:
            yield w, mask


def _pre_step(optimizer, args, kwargs) -> None:
    with torch.no_grad():
        for w, mask in _masked_params(optimizer):
            if w.grad is not None:
                w.grad.mul_(mask.to(device=w.grad.device, dtype=w.grad.dtype))


def _post_step(optimizer, args, kwargs) -> None:
    with torch.no_grad():
        for w, mask in _masked_params(optimizer):
            w.mul_(mask.to(device=w.device, dtype=w.dtype))


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's boolean keep-mask (shape of its weight), or ``None``."""
    return getattr(module, MASK_BUFFER, None)


def apply_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Attach ``keep`` (bool, weight-shaped) to ``module`` and zero its pruned weights.

    An existing mask is intersected with ``keep`` (pruning is monotone).
    """
    w = module.weight
    keep = keep.to(device=w.device, dtype=torch.bool).reshape(w.shape)
    old = get_mask(module)
    if old is not None:
        keep = keep & old.to(keep.device)
        setattr(module, MASK_BUFFER, keep)
    else:
        module.register_buffer(MASK_BUFFER, keep, persistent=False)
    if _mask_pre_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_mask_pre_hook)
    _register(module)
    with torch.no_grad():
        w.mul_(keep.to(w.dtype))


def apply_masks(model: nn.Module) -> None:
    """Multiply every masked weight in ``model`` by its mask again."""
    with torch.no_grad():
        for m in model.modules():
            mask = get_mask(m)
            if mask is not None:
                m.weight.mul_(mask.to(m.weight.dtype))


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for every module of ``model`` that carries a mask."""
    return {n: m for n, m in model.named_modules() if get_mask(m) is not None}


def remove_masks(model: nn.Module) -> None:
    """Drop all mask bookkeeping; the zeros stay in the weights."""
    for m in model.modules():
        if MASK_BUFFER in m._buffers:
            del m._buffers[MASK_BUFFER]
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _mask_pre_hook:
                del m._forward_pre_hooks[key]
        _REGISTRY.discard(m)


def masks_from_zeros(model: nn.Module, types=(nn.Linear, nn.Conv1d, nn.Conv2d)) -> dict[str, float]:
    """Attach a mask ``weight != 0`` to every layer of ``types`` that has zeros.

    Use after loading a pruned ``state_dict`` into a fresh model so fine-tuning
    keeps the zeros. Returns ``{name: sparsity}`` of the layers that got a mask.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, types) and getattr(m, "weight", None) is not None:
            keep = m.weight.detach() != 0
            if not bool(keep.all()):
                apply_mask(m, keep)
                out[name] = 1.0 - keep.float().mean().item()
    return out
