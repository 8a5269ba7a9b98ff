"""Recovery: gradual pruning interleaved with distillation from the dense teacher.

One-shot pruning at high sparsity loses too much; training the sparse model
to imitate the dense one on unlabeled text wins most of it back (oBERT,
Sanh et al.'s movement pruning, Zhu & Gupta's gradual schedule). Here:

* the student is pruned by a scheduled :class:`~sparsert.prune.Pruner`
  (typically ``schedule=Gradual(...)``, the cubic schedule), whose
  ``step()`` is called after every optimizer step;
* the loss is distillation from the teacher, chosen from what the model
  returns: KL divergence of the logits (language models, classifiers) and/or
  the mean squared error of the hidden states normalised by the teacher's
  scale (encoders: every layer's hidden state when the model returns
  ``hidden_states``, else the main output);
* the learning rate warms up linearly and decays with a cosine;
* a checkpoint (weights, masks, optimizer, schedule, RNG, pruner position)
  is written every ``checkpoint_every`` steps and when the time budget runs
  out; calling :func:`recover` again with the same ``checkpoint`` continues
  exactly where it stopped.

```python
pruner = Pruner(student, importance="wanda", sparsity=0.8,
                schedule=Gradual(begin_step=0, end_step=600, frequency=50)).calibrate(calib)
result = recover(student, teacher, train_batches, pruner=pruner, steps=1000, lr=1e-4,
                 checkpoint="run.pt", checkpoint_every=100, time_budget=600)
result.done   # False if the budget ran out: call again to continue
```
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._data import _to, model_device, output_tensor, progress_enabled, split_batch
from .masks import MASK_BUFFER, apply_mask, apply_masks, get_mask

__all__ = ["recover", "RecoveryResult", "distill_loss", "warmup_cosine"]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    rest = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / rest)))


def _get(out: Any, key: str):
    if isinstance(out, dict) or hasattr(out, "keys"):
        try:
            return out[key]
        except (KeyError, TypeError):
            return None
    return getattr(out, key, None)


def _token_weights(batch) -> torch.Tensor | None:
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    return m if isinstance(m, torch.Tensor) else None


def _masked_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over real tokens, normalised by the teacher's mean square (scale-free)."""
    d = (s.float() - t.float()).pow(2)
    scale = t.float().pow(2)
    if mask is not None and s.dim() == 3 and tuple(mask.shape) == tuple(s.shape[:2]):
        w = mask.to(s.device, torch.float32).unsqueeze(-1)
        return (d * w).sum() / (scale * w).sum().clamp_min(1e-12)
    return d.sum() / scale.sum().clamp_min(1e-12)


def _pooled(out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the last hidden state over real tokens (a sentence embedding); 2-D outputs as they are."""
    h = _get(out, "last_hidden_state")
    h = (h if isinstance(h, torch.Tensor) else output_tensor(out)).float()
    if h.dim() != 3:
        return h.reshape(h.shape[0], -1)
    if mask is not None and tuple(mask.shape) == tuple(h.shape[:2]):
        w = mask.to(h.device, torch.float32).unsqueeze(-1)
        return (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
    return h.mean(1)


def distill_loss(student_out: Any, teacher_out: Any, batch: Any = None, *, logit_weight: float = 1.0,
                 hidden_weight: float = 1.0, temperature: float = 1.0,
                 embedding_weight: float = 0.0) -> torch.Tensor:
    """Distillation loss fitted to what the model returns (see the module docstring).

    ``embedding_weight`` adds ``1 - cosine`` between the student's and the teacher's
    mean-pooled last hidden states (sentence embeddings), the quantity an encoder is
    judged by.
    """
    mask = _token_weights(batch)
    loss = None
    if embedding_weight:
        cos = F.cosine_similarity(_pooled(student_out, mask), _pooled(teacher_out, mask), dim=-1)
        loss = embedding_weight * (1.0 - cos).mean()
    s_logits, t_logits = _get(student_out, "logits"), _get(teacher_out, "logits")
    use_logits = bool(logit_weight) and isinstance(s_logits, torch.Tensor) and isinstance(t_logits, torch.Tensor)
    if use_logits:
        s = F.log_softmax(s_logits.float() / temperature, -1)
        t = F.log_softmax(t_logits.float() / temperature, -1)
        kl = (t.exp() * (t - s)).sum(-1)  # per token
        if mask is not None and kl.shape == mask.shape:
            kl = (kl * mask.to(kl.device)).sum() / mask.sum().clamp_min(1)
        else:
            kl = kl.mean()
        kl = logit_weight * temperature**2 * kl
        loss = kl if loss is None else loss + kl
    if hidden_weight:
        s_h, t_h = _get(student_out, "hidden_states"), _get(teacher_out, "hidden_states")
        if isinstance(s_h, (tuple, list)) and isinstance(t_h, (tuple, list)) and len(s_h) == len(t_h) > 1:
            pairs = list(zip(s_h[1:], t_h[1:]))  # [0] is the embedding output, not pruned
        elif not use_logits:
            pairs = [(output_tensor(student_out), output_tensor(teacher_out))]
        else:
            pairs = []
        if pairs:
            h = sum(_masked_mse(s, t, mask) for s, t in pairs) / len(pairs)
            loss = hidden_weight * h if loss is None else loss + hidden_weight * h
    if loss is None:
        raise ValueError("nothing to distill: no logits and no hidden states "
                         "(set logit_weight/hidden_weight/embedding_weight)")
    return loss


@dataclass
class RecoveryResult:
    """What :func:`recover` did: ``step`` reached of ``steps``, ``done``, the loss per step."""

    step: int
    steps: int
    done: bool
    losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    resumed_from: int = 0


def _forward(model: nn.Module, batch: Any, hidden: bool):
    batch = _to(batch, model_device(model))
    args, kwargs, _ = split_batch(batch)
    if hidden and isinstance(batch, dict):
        kwargs = {**kwargs, "output_hidden_states": True}
    return model(*args, **kwargs)


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint


def recover(student: nn.Module, teacher: nn.Module, batches: Sequence, *, steps: int, pruner: Any = None,
            lr: float = 1e-4, weight_decay: float = 0.0, warmup: int | None = None,
            loss_fn: Callable[[Any, Any, Any], torch.Tensor] | None = None, logit_weight: float = 1.0,
            hidden_weight: float = 1.0, temperature: float = 1.0, hidden_states: bool = True,
            checkpoint: "str | Path | None" = None, checkpoint_every: int = 100, resume: bool = True,
            time_budget: float | None = None, stop_after: int | None = None, max_grad_norm: float | None = 1.0,
            progress: bool | None = None, embedding_weight: float = 0.0, dropout: bool = True,
            train: str = "all") -> RecoveryResult:
    """Distils ``teacher`` into ``student`` for ``steps`` optimizer steps (AdamW), calling
    ``pruner.step()`` after each one until the pruner's schedule is done.

    Args:
        batches: a sequence of batches (unlabeled: tensors or dicts of model inputs);
            step ``i`` uses ``batches[i % len(batches)]``, so a resumed run sees
            the same data as an uninterrupted one.
        steps: total optimizer steps of the run (the LR schedule spans them).
        pruner: a scheduled Pruner over ``student`` (or ``None`` to only recover).
        warmup: LR warm-up steps (default: 5% of ``steps``).
        loss_fn: ``loss_fn(student_out, teacher_out, batch)``; default :func:`distill_loss`.
        hidden_states: ask dict-input (Hugging Face) models for every hidden state.
        checkpoint: file to write every ``checkpoint_every`` steps and at the end;
            with ``resume=True`` an existing file is loaded first and the run continues.
        time_budget: seconds; when spent, a checkpoint is written and the run stops
            (``done=False``). Every call makes at least one step, however small the budget.
        stop_after: stop (with a checkpoint) once this step is reached, before ``steps``.
        max_grad_norm: gradient clipping (``None``: off).
        embedding_weight: weight of the sentence-embedding cosine loss (see :func:`distill_loss`).
        dropout: train the student in train mode, dropout active (``False``: in eval mode, so it
            imitates the teacher deterministically, as it will run; batch norm keeps its statistics).
        train: ``"all"`` trainable parameters, or ``"pruned"``: only the weights and biases
            of the layers being pruned (the pruner's layers, else the masked ones); the rest
            (embeddings, norms) stays as the teacher has it.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not len(batches):
        raise ValueError("recover needs at least one batch")
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be >= 1")
    warmup = max(1, steps // 20) if warmup is None else int(warmup)
    if train not in ("all", "pruned"):
        raise ValueError(f"train must be 'all' or 'pruned', not {train!r}")
    if train == "pruned":
        layers = list(pruner.layers.values()) if pruner is not None else \
            [m for m in student.modules() if MASK_BUFFER in m._buffers]
        if not layers:
            raise ValueError("train='pruned' needs a pruner or masked layers")
        params = [p for m in layers for p in m.parameters(recurse=False) if p.requires_grad]
    else:
        params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    loss_fn = loss_fn or (lambda s, t, b: distill_loss(s, t, b, logit_weight=logit_weight,
                                                       hidden_weight=hidden_weight, temperature=temperature,
                                                       embedding_weight=embedding_weight))
    path = Path(checkpoint) if checkpoint is not None else None
    step, losses = 0, []
    if path is not None and resume and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["steps"] != steps:
            raise ValueError(f"the checkpoint is of a {state['steps']}-step run, not {steps}")
        student.load_state_dict(state["model"])
        modules = dict(student.named_modules())
        for name, keep in state["masks"].items():
            apply_mask(modules[name], keep)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, losses = int(state["step"]), list(state["losses"])
        if pruner is not None:
            pruner._step = int(state["pruner_step"])
            pruner.layer_sparsity = dict(state["layer_sparsity"])
    resumed_from = step

    def save():
        if path is None:
            return
        masks = {n: m._buffers[MASK_BUFFER].clone() for n, m in student.named_modules()
                 if MASK_BUFFER in m._buffers}
        _save(path, {"steps": steps, "step": step, "model": student.state_dict(), "masks": masks,
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                     "losses": losses, "pruner_step": 0 if pruner is None else pruner._step,
                     "layer_sparsity": {} if pruner is None else dict(pruner.layer_sparsity)})

    t0 = time.perf_counter()
    was_training, teacher_training = student.training, teacher.training
    teacher.eval()
    # dropout=False: eval mode (attention modules read their own `training` flag, not only nn.Dropout's)
    student.train(dropout)
    trained = {id(p) for p in params}
    frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:  # no gradient is computed for what is not trained (e.g. the word embeddings)
        p.requires_grad_(False)
    end = steps if stop_after is None else min(steps, int(stop_after))
    bar = tqdm(total=steps, initial=step, desc="recover", disable=not progress_enabled(progress))
    try:
        first = True
        while step < end:
            # every call makes at least one step, so a tiny budget still moves a resumed run on
            if not first and time_budget is not None and time.perf_counter() - t0 > time_budget:
                break
            first = False
            batch = batches[step % len(batches)]
            with torch.no_grad():
                t_out = _forward(teacher, batch, hidden_states)
            s_out = _forward(student, batch, hidden_states)
            loss = loss_fn(s_out, t_out, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()  # the mask hooks keep pruned weights at zero
            sched.step()
            if pruner is not None and not pruner.done:
                pruner.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}", lr=f"{sched.get_last_lr()[0]:.2g}")
            if step % checkpoint_every == 0 and step < end:
                save()
        save()
    finally:
        bar.close()
        student.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
        teacher.train(teacher_training)
        opt.zero_grad(set_to_none=True)
        apply_masks(student)
    return RecoveryResult(step, steps, step >= steps, losses, time.perf_counter() - t0, resumed_from)
