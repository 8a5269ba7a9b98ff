"""Layer inputs in execution order, on the model as it is being pruned.

Layer-wise solvers (SparseGPT, sensitivity tables) need, for each layer, the
Gram matrix ``X^T X`` of the inputs it sees *in the partly pruned model*: the
layers before it are already pruned, so it is fitted to what it will really
receive. :func:`sequential_grams` is a generator that yields one group of
layers at a time (layers that read the very same input tensor, such as Q/K/V
or gate/up, form one group), with their Gram matrices; the caller prunes the
group before asking for the next one, and the next capture sees the change.

Two ways to get there:

* **blocks** (transformers): when the layers sit in one ``nn.ModuleList`` of
  repeated blocks, the inputs of the first block are captured once and then
  each block is run on its own, its output feeding the next block — as in
  the SparseGPT reference code. A check on the unpruned model (block 0's
  output must equal block 1's captured input) guards the assumption that the
  blocks chain; when it fails, the whole-model path is used.
* **whole model**: otherwise every group costs one forward pass of the model
  per calibration batch, stopped as soon as the group has its input.

Conv2d inputs are unfolded into patches (``groups == 1``), Linear inputs are
the real tokens (padding dropped using the batch's ``attention_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterable, Iterator

import torch
from torch import nn

from ._data import _to, model_device, run
from .criteria import _bar, _eval_mode, _token_mask
from .reconstruct import _Captured, _execution_order, _input_rows, _supported

__all__ = ["sequential_grams", "find_blocks"]

_NO_LIMIT = 1 << 62


def _gram(module: nn.Module, x: torch.Tensor, mask) -> tuple[torch.Tensor, int]:
    rows = _input_rows(module, x, mask, _NO_LIMIT, 0)  # float64, (positions, cols)
    return rows.T @ rows, rows.shape[0]


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` (name, module) holding the most of ``names`` in >= 2 children."""
    best, best_count = None, 1
    for lname, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        prefix = lname + "." if lname else ""
        count = sum(1 for n in names if n.startswith(prefix))
        children = {n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)}
        if len(children) >= 2 and count > best_count:
            best, best_count = (lname, mod), count
    return best


class _GroupCapture:
    """Forward pre-hooks on ``pending`` layers: the first one called opens the group,
    later ones join while they read the same input tensor, any other stops the pass."""

    def __init__(self, modules: dict[str, nn.Module], pending: list[str], members: list[str] | None):
        self.modules, self.members = modules, members
        self.found: list[str] = []
        self.x: torch.Tensor | None = None
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in pending]

    def _hook(self, name):
        def hook(mod, args):
            x = args[0]
            if self.members is not None:  # the group is known: collect exactly its members
                if name not in self.members:
                    return None
                if self.x is None:
                    self.x = x
                self.found.append(name)
                if len(self.found) == len(self.members):
                    raise _Captured
                return None
            if self.x is None:
                self.x, self.found = x, [name]
            elif x is self.x or (x.data_ptr() == self.x.data_ptr() and x.shape == self.x.shape):
                self.found.append(name)
            else:
                raise _Captured
            return None

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _strip_cache(kwargs: dict) -> dict:
    """Blocks are re-run many times: a KV cache would grow with every run."""
    kwargs = dict(kwargs)
    for key in ("past_key_value", "past_key_values", "layer_past"):
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _block_inputs(model, blocks: nn.ModuleList, batches, upto: int):
    """``[[(args, kwargs) of block i for each batch] for i in 0..upto]`` from full runs."""
    got: list[list] = [[] for _ in range(upto + 1)]
    for batch in batches:
        seen: list = []

        def make(i):
            def hook(mod, args, kwargs):
                seen.append(i)
                got[i].append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                               _strip_cache(kwargs)))
                if i == upto:
                    raise _Captured
                return None

            return hook

        handles = [blocks[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in range(upto + 1)]
        try:
            with torch.no_grad():
                run(model, batch)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(seen) != upto + 1 or seen != list(range(upto + 1)):
            return None
    return got


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = h
    return args, kwargs


def _block_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and isinstance(out.get("hidden_states"), torch.Tensor):
        return out["hidden_states"]
    raise TypeError("cannot find the hidden state in a block's output")


def _groups_of(fwd, modules, pending, masks, progress, ref_fwd=None, ref_modules=None):
    """Drives :class:`_GroupCapture` over ``fwd(i)`` (the i-th calibration forward)
    until every pending layer was yielded. With ``ref_fwd`` (the unpruned model's
    forward), also the cross Gram ``X_pruned^T X_dense`` at the same positions."""
    pending = list(pending)
    while pending:
        gram: torch.Tensor | None = None
        cross: torch.Tensor | None = None
        count = 0
        group: list[str] | None = None
        for i, mask in enumerate(masks):
            cap = _GroupCapture(modules, pending, group)
            try:
                fwd(i)
            except _Captured:
                pass
            finally:
                cap.close()
            if cap.x is None:
                if group is None:  # none of the pending layers runs on this data
                    raise ValueError(f"layers {pending} were never called on the calibration data")
                raise ValueError(f"layers {group} were not all called on calibration batch {i}")
            if group is None:
                group = cap.found
            rows = _input_rows(modules[group[0]], cap.x, mask, _NO_LIMIT, 0)
            g = rows.T @ rows
            gram = g if gram is None else gram + g
            count += rows.shape[0]
            if ref_fwd is not None:
                ref = _GroupCapture(ref_modules, group, group)
                try:
                    ref_fwd(i)
                except _Captured:
                    pass
                finally:
                    ref.close()
                dense = _input_rows(ref_modules[group[0]], ref.x, mask, _NO_LIMIT, 0)
                c = rows.T @ dense
                cross = c if cross is None else cross + c
        yield group, {n: gram for n in group}, count, (None if cross is None else {n: cross for n in group})
        pending = [n for n in pending if n not in group]


@torch.no_grad()
def sequential_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                     progress: bool | None = None, use_blocks: bool = True, reference: nn.Module | None = None
                     ) -> Iterator[tuple[list[str], dict[str, torch.Tensor], int, dict | None]]:
    """Yields ``(group, {name: X^T X in float64}, positions, cross)`` in execution order.

    Modify the yielded layers' weights before advancing the generator: the
    inputs of every later group are captured on the model as modified.
    With ``reference`` (an unpruned copy of ``model``, same module names),
    ``cross`` is ``{name: X^T X_ref}``: the layer's inputs in the pruned model
    against the inputs the unpruned model gives it at the same positions;
    otherwise ``None``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("sequential pruning needs at least one calibration batch")
    modules = dict(model.named_modules())
    names = [n for n in layers if _supported(layers[n])]
    bad = [n for n in layers if n not in names]
    if bad:
        raise ValueError(f"layer-wise pruning supports Linear and Conv2d (groups=1, zero padding) only: {bad}")
    masks = [_token_mask(b) for b in batches]
    ref_modules = dict(reference.named_modules()) if reference is not None else None
    if reference is not None:
        reference.eval()
    with _eval_mode(model):
        order = _execution_order(model, names, batches[0])
        blocks = find_blocks(model, order) if use_blocks else None
        cached = None
        if blocks is not None:
            prefix = blocks[0] + "." if blocks[0] else ""
            cached = _block_inputs(model, blocks[1], batches, 1)
            if cached is not None:  # do the blocks chain? block 0 on its input must give block 1's input
                a, k = cached[0][0]
                h1 = _block_output(blocks[1][0](*a, **k))
                ref = _hidden(*cached[1][0])
                if h1.shape != ref.shape or not torch.allclose(h1, ref, rtol=1e-4, atol=1e-5):
                    cached = None
        if cached is None:
            device_batches = [_to(b, model_device(model)) for b in batches]
            ref_fwd = None if reference is None else (lambda i: run(reference, device_batches[i]))
            yield from _groups_of(lambda i: run(model, device_batches[i]), modules, order, masks, progress,
                                  ref_fwd, ref_modules)
            return

        inside = [n for n in order if n.startswith(prefix)]
        index = {n: int(n[len(prefix):].split(".")[0]) for n in inside}
        first_pos = order.index(inside[0])
        before = [n for n in order[:first_pos] if n not in index]
        after = [n for n in order if n not in index and n not in before]
        if before:
            yield from _groups_of(lambda i: run(model, batches[i]), modules, before, masks, progress,
                                  None if reference is None else (lambda i: run(reference, batches[i])), ref_modules)
        # Inputs of block 0, on the model with the layers before the blocks pruned.
        state = _block_inputs(model, blocks[1], batches, 0)[0]
        block_list = blocks[1]
        ref_blocks = ref_state = None
        if reference is not None:
            ref_blocks = dict(reference.named_modules())[blocks[0]]
            ref_state = _block_inputs(reference, ref_blocks, batches, 0)[0]
        last = max(index.values())
        for b in _bar(range(last + 1), "blocks", progress):
            block = block_list[b]
            pending = [n for n in inside if index[n] == b]
            ref_fwd = None
            if reference is not None:
                ref_block = ref_blocks[b]
                ref_fwd = lambda i: ref_block(*ref_state[i][0], **ref_state[i][1])  # noqa: E731
            if pending:
                yield from _groups_of(lambda i: block(*state[i][0], **state[i][1]), modules, pending, masks,
                                      progress, ref_fwd, ref_modules)
            if b < last:
                state = [_with_hidden(a, k, _block_output(block(*a, **k))) for a, k in state]
                if reference is not None:
                    ref_state = [_with_hidden(a, k, _block_output(ref_block(*a, **k))) for a, k in ref_state]
        if after:
            yield from _groups_of(lambda i: run(model, batches[i]), modules, after, masks, progress,
                                  None if reference is None else (lambda i: run(reference, batches[i])), ref_modules)


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable,
                progress: bool | None = None, *, per_token: bool = False):
    """``{name: X^T X in float64}`` of every layer's inputs on the *unmodified* model, in one
    forward pass per batch (padding positions masked as in :func:`sequential_grams`).

    For measurements that never change a weight (e.g. sensitivity tables), this replaces the
    group-by-group passes of :func:`sequential_grams`, which re-run the model per group.
    Layers fed the same tensor (q/k/v) share one Gram.

    ``per_token``: also return, as a second dict, ``sum_t x_t x_t^T / ||W x_t||^2`` per layer (W its
    weight): with it, ``tr(dW G dW^T) / tokens`` is the mean over tokens of each token's squared
    relative output error, which a few tokens with massive outputs cannot dominate.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("input_grams needs at least one calibration batch")
    bad = [n for n in layers if not _supported(layers[n])]
    if bad:
        raise ValueError(f"layer-wise statistics support Linear and Conv2d (groups=1, zero padding) only: {bad}")
    grams: dict[str, torch.Tensor] = {}
    weighted: dict[str, torch.Tensor] = {}
    state: dict = {"mask": None, "seen": {}}

    def hook_for(name):
        def hook(mod, args):
            x = args[0]
            conv = ((mod.kernel_size, mod.stride, mod.padding, mod.dilation) if isinstance(mod, nn.Conv2d)
                    else None)
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), conv)
            hit = state["seen"].get(key)
            if hit is not None and hit[0] is x:
                g, rows = hit[1], hit[2]
            else:
                rows = _input_rows(mod, x.detach(), state["mask"], _NO_LIMIT, 0)
                g = rows.T @ rows
                # holding x keeps its memory from being reused by a later tensor with the same key
                state["seen"][key] = (x, g, rows if per_token else None)
            grams[name] = g if name not in grams else grams[name] + g
            if per_token:
                w = mod.weight.detach().reshape(mod.weight.shape[0], -1).to(rows.dtype)
                out2 = (rows @ w.T).square().sum(1)
                # (a token the layer maps to ~0 would weigh without bound: floor at 1e-6 of the mean)
                scale = 1.0 / out2.clamp_min(1e-6 * float(out2.mean()) + 1e-30)
                gw = (rows * scale[:, None]).T @ rows
                weighted[name] = gw if name not in weighted else weighted[name] + gw
        return hook

    handles = [layers[n].register_forward_pre_hook(hook_for(n)) for n in layers]
    try:
        with _eval_mode(model):
            for i, batch in enumerate(_bar(batches, "grams", progress)):
                state["mask"], state["seen"] = _token_mask(batch), {}
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in grams]
    if missing:
        raise ValueError(f"layers {missing} were never called on the calibration data")
    return (grams, weighted) if per_token else grams
