"""Fine-tuning that keeps the masks, with optional knowledge distillation."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._data import objective, output_tensor, progress_enabled, run
from .masks import apply_masks

__all__ = ["finetune", "kd_loss"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the last dim."""
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable | None = None,
    epochs: int = 3,
    optimizer: "torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None" = None,
    lr: float = 1e-3,
    teacher: nn.Module | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    distill_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    pruner: Any = None,
    progress: bool | None = None,
) -> list[float]:
    """Train ``model`` on ``data`` for ``epochs``; pruned weights stay exactly zero.

    Args:
        data: re-iterable of batches (``(x, y)`` tuples, tensors or dicts).
        loss_fn: ``loss_fn(output, target)``; default cross-entropy / MSE
            (see :func:`sparsert.prune._data.objective`).
        optimizer: an optimizer over ``model``'s parameters, or a factory
            called as ``optimizer(params)`` (e.g. ``torch.optim.AdamW``);
            default ``Adam(lr=lr)``. Any torch optimizer keeps the zeros.
        teacher: optional dense model; adds distillation,
            ``loss = alpha · distill + (1 - alpha) · task`` (``distill`` only
            when batches have no target and there is no ``loss_fn``).
        distill_fn: ``distill_fn(student_out, teacher_out)``; default
            :func:`kd_loss` at ``temperature`` (for logits). Use e.g.
            ``F.mse_loss`` for embeddings.
        pruner: a scheduled :class:`~sparsert.prune.Pruner` whose ``step()`` is
            called after every optimizer step until it is done (gradual pruning).
        progress: tqdm bars (``None``: only on a TTY).

    Returns the mean loss of each epoch. The model is left in the
    train/eval mode it had.
    """
    if epochs < 0:
        raise ValueError("epochs must be >= 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif optimizer is None:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    elif callable(optimizer):
        opt = optimizer([p for p in model.parameters() if p.requires_grad])
    else:
        raise TypeError("optimizer must be an Optimizer, a factory or None")
    was_training = model.training
    if teacher is not None:
        teacher_training = teacher.training
        teacher.eval()
    show = progress_enabled(progress)
    history: list[float] = []
    model.train()
    try:
        for epoch in tqdm(range(epochs), desc="finetune", disable=not show):
            total, count = 0.0, 0
            for batch in tqdm(data, desc=f"epoch {epoch + 1}", disable=not show, leave=False):
                out, target = run(model, batch)
                has_task = target is not None or loss_fn is not None
                loss = objective(out, target, loss_fn) if has_task else None
                if teacher is not None:
                    with torch.no_grad():
                        t_out, _ = run(teacher, batch)
                    s, t = output_tensor(out), output_tensor(t_out)
                    d = distill_fn(s, t) if distill_fn is not None else kd_loss(s, t, temperature)
                    loss = d if loss is None else alpha * d + (1.0 - alpha) * loss
                if loss is None:
                    raise ValueError("batches have no target: give a loss_fn or a teacher")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if pruner is not None and not pruner.done:
                    pruner.step()
                total += float(loss.detach())
                count += 1
            history.append(total / max(count, 1))
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
        opt.zero_grad(set_to_none=True)
        apply_masks(model)
    return history
