"""One-shot layer-wise reconstruction: refit the weights pruning kept.

After one-shot pruning (no fine-tuning), every pruned layer's output drifts
from the unpruned model's, and the drift compounds through the network
(EfficientNet-Lite0 with its pointwise convs at 80%: the top-1 class agrees
with the unpruned model on no test crop). Without labels or training, most of
it can be undone: for each pruned layer, in the order the model runs them,
the kept weights (and the bias) are refit by ridge least squares so that the
layer's output *on the pruned model's own inputs* matches the unpruned
layer's output *on the unpruned model's inputs*. Later layers therefore also
correct what earlier ones could not. The sparsity pattern does not change: a
zero stays zero, so CSR, block and N:M layouts hold (this is the fixed-mask
reconstruction step of SparseGPT / OBC, solved exactly per output row).

```python
from sparsert.prune import Pruner, reconstruct
pruned = copy.deepcopy(model)
Pruner(pruned, importance="wanda", sparsity=0.8).calibrate(batches).step()
errors = reconstruct(pruned, model, batches)   # {layer: (error before, after)}
```

Supports ``nn.Linear`` and ``nn.Conv2d`` (``groups == 1``, numeric zero
padding; the input is unfolded into patches). Other pruned layers are left
as they are and reported with ``None``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._data import run
from .criteria import _bar, _eval_mode, _real_tokens, _token_mask


class _Captured(Exception):
    """Stops a forward pass once the layer being refit has seen its input."""


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _input_rows(module: nn.Module, x: torch.Tensor, token_mask, rows: int, seed: int) -> torch.Tensor:
    """Up to ``rows`` rows of the layer's input, one per output position (a token
    for Linear, an unfolded patch for Conv2d), in float64. The positions are drawn
    from ``seed``, so the same seed picks the same positions in both models."""
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        pointwise = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0))
        if pointwise:  # the patches are the pixels: no unfold copy
            flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        else:
            cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            flat = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        flat = _real_tokens(x, token_mask)
    if flat.shape[0] > rows:
        flat = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]]
    return flat.double().cpu()


def _layer_inputs(model: nn.Module, module: nn.Module, batch, token_mask, rows: int, seed: int) -> torch.Tensor:
    """Runs ``model`` on ``batch`` until ``module`` is called; returns its sampled input rows."""
    got: list = []

    def hook(mod, args):
        got.append(_input_rows(mod, args[0], token_mask, rows, seed))
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        run(model, batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError("a pruned layer was never called on the calibration data")
    return got[0]


def _execution_order(model: nn.Module, names: list[str], batch) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
               for n in names]
    try:
        run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


@torch.no_grad()
def reconstruct(model: nn.Module, reference: nn.Module, batches: Iterable, *,
                include: Iterable[str] | None = None, rows_per_batch: int = 2048, damp: float = 0.1,
                seed: int = 0, progress: bool | None = None) -> dict[str, tuple[float, float] | None]:
    """Refits the kept weights of ``model``'s pruned layers to match ``reference``.

    Args:
        model: the pruned model (exact zeros in its weights), changed in place.
        reference: the unpruned model, with the same module names.
        batches: a re-iterable of calibration batches (as for ``Pruner.calibrate``);
            a few dozen images or a few thousand tokens are enough.
        include: names of the layers to refit (default: every Linear/Conv2d
            of ``model`` that has zeros in its weight).
        rows_per_batch: output positions (tokens, pixels) sampled per batch and
            layer for the fit; the same positions are taken in both models.
        damp: strength of the pull toward the pruned weights, as a fraction of the
            mean diagonal of the Gram matrix (0: plain least squares).
        seed: seeds the position sampling.
        progress: a progress bar over layers (default: when stderr is a terminal).

    Returns:
        ``{layer name: (relative output error before, after)}`` on the
        calibration data, or ``None`` for a pruned layer of an unsupported kind.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("reconstruct needs at least one calibration batch")
    ref_modules = dict(reference.named_modules())
    modules = dict(model.named_modules())
    if include is None:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))
                 and bool((m.weight == 0).any())]
    else:
        names = list(include)
    for n in names:
        if n not in modules or n not in ref_modules:
            raise ValueError(f"layer {n!r} is not in both models")
        if modules[n].weight.shape != ref_modules[n].weight.shape:
            raise ValueError(f"layer {n!r}: weight shapes differ between the models")
    results: dict[str, tuple[float, float] | None] = {n: None for n in names if not _supported(modules[n])}
    names = [n for n in names if _supported(modules[n])]
    with _eval_mode(model), _eval_mode(reference):
        order = _execution_order(model, names, batches[0]) if names else []
        for name in _bar(order, "reconstruct", progress):
            results[name] = _refit(modules[name], ref_modules[name], model, reference, batches,
                                   rows_per_batch, damp, seed + order.index(name))
    return results


def mean_errors(results: dict[str, tuple[float, float] | None]) -> tuple[int, float, float]:
    """(refit layers, mean relative error before, after) of :func:`reconstruct`'s result."""
    done = [e for e in results.values() if e is not None]
    if not done:
        return 0, 0.0, 0.0
    return len(done), sum(e[0] for e in done) / len(done), sum(e[1] for e in done) / len(done)


def _refit(module, ref_module, model, reference, batches, rows_per_batch, damp, seed):
    weight = module.weight
    rows = weight.shape[0]
    w_ref = ref_module.weight.detach().double().reshape(rows, -1).to("cpu")
    b_ref = (ref_module.bias.detach().double().to("cpu") if ref_module.bias is not None
             else torch.zeros(rows, dtype=torch.float64))
    has_bias = module.bias is not None
    cols = w_ref.shape[1] + int(has_bias)
    gram = torch.zeros(cols, cols, dtype=torch.float64)
    cross = torch.zeros(cols, rows, dtype=torch.float64)
    target_sq = 0.0
    for i, batch in enumerate(batches):
        mask = _token_mask(batch)
        x_ref = _layer_inputs(reference, ref_module, batch, mask, rows_per_batch, seed * 100_003 + i)
        x = _layer_inputs(model, module, batch, mask, rows_per_batch, seed * 100_003 + i)
        if x.shape != x_ref.shape:
            raise ValueError("the pruned and the reference layer saw inputs of different shapes")
        target = x_ref @ w_ref.T + b_ref  # what the unpruned layer produced
        if has_bias:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        gram += x.T @ x
        cross += x.T @ target
        target_sq += float(target.pow(2).sum())

    w_now = weight.detach().double().reshape(rows, -1).cpu()
    b_now = module.bias.detach().double().cpu() if has_bias else None
    theta_now = torch.cat([w_now, b_now[:, None]], 1) if has_bias else w_now

    def error(theta):  # ||target - x theta^T||^2 from the accumulated statistics
        return float(target_sq - 2 * (theta * cross.T).sum() + ((theta @ gram) * theta).sum())

    before = error(theta_now)
    # Ridge toward the pruned weights (not toward zero): with little or narrow
    # calibration data the fit cannot wander far from what pruning left.
    lam = damp * float(gram.diagonal().mean())
    ridge = gram + lam * torch.eye(cols, dtype=torch.float64)
    pull = cross + lam * theta_now.T
    kept = w_now != 0
    theta = torch.zeros_like(theta_now)
    bias_col = torch.tensor([cols - 1]) if has_bias else torch.zeros(0, dtype=torch.long)
    for r in range(rows):
        s = torch.cat([kept[r].nonzero().flatten(), bias_col])
        if s.numel():
            theta[r, s] = torch.linalg.solve(ridge[s][:, s], pull[s, r])
    after = error(theta)
    if after > before:  # never make a layer worse than it was
        theta, after = theta_now, before
    w_new = theta[:, :w_now.shape[1]]
    weight.copy_(w_new.reshape(weight.shape).to(weight.device, weight.dtype))
    if has_bias:
        module.bias.copy_(theta[:, -1].to(module.bias.device, module.bias.dtype))
    scale = max(target_sq, 1e-300) ** 0.5
    return (max(before, 0.0) ** 0.5 / scale, max(after, 0.0) ** 0.5 / scale)
