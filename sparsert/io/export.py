"""``export``: a sparse model to a ``torch.export`` program (``.pt2``) that calls
``torch.ops.sparsert.*``."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Mapping

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

__all__ = ["export", "sparse_op_count", "input_shapes", "load_program", "PickleRefused"]


def _plain(out):
    """Model outputs as built-in containers: a fresh process without the model's code
    (e.g. transformers' ``ModelOutput`` classes) can still rebuild them."""
    if isinstance(out, Mapping):
        return {str(k): _plain(v) for k, v in out.items() if v is not None}
    if isinstance(out, (tuple, list)):
        return tuple(_plain(v) for v in out)
    return out


class _PlainOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return _plain(self.model(*args, **kwargs))


def _wrap(model: nn.Module) -> tuple:
    """(the model with plain outputs, the model's forward signature or None).

    The wrapper's forward carries the model's signature, so that torch.export
    binds the inputs (and their dynamic shapes) to the model's own argument names."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return _PlainOutputs(model), None
    # *args / **kwargs of the model (e.g. Hugging Face's **kwargs) are left out: inputs bind by name
    sig = sig.replace(parameters=[p for p in sig.parameters.values()
                                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)])

    def forward(self, *args, **kwargs):
        return _plain(self.model(*args, **kwargs))

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    wrapper = type("PlainOutputs", (_PlainOutputs,), {"forward": forward})
    return wrapper(model), sig


def _split(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword inputs")


def _every_dim_auto(args: tuple, kwargs: dict) -> tuple:
    """Dim.AUTO on every dimension of every tensor input: torch.export keeps a size
    dynamic where the model allows it and pins it (without an error) where not.
    Sizes of 1 are left out: torch.export would pin them anyway, and log that it did."""
    auto = lambda t: ({i: Dim.AUTO for i in range(t.dim()) if t.shape[i] > 1}
                      if isinstance(t, torch.Tensor) else None)
    return tuple(pytree.tree_map(auto, a) for a in args), {k: pytree.tree_map(auto, v) for k, v in kwargs.items()}


def _spec(dynamic_shapes, example_inputs, args: tuple, kwargs: dict, sig, model_name: str):
    """torch.export's ``dynamic_shapes`` for the wrapper, from ours (see :func:`export`)."""
    if dynamic_shapes is None:
        return None
    if isinstance(dynamic_shapes, str):  # "auto"
        spec_args, spec_kwargs = _every_dim_auto(args, kwargs)
    elif isinstance(example_inputs, torch.Tensor):
        spec_args, spec_kwargs = (dynamic_shapes,), {}
    elif isinstance(example_inputs, Mapping):
        if not isinstance(dynamic_shapes, Mapping):
            raise TypeError("example_inputs is a dict: dynamic_shapes must be a dict by input name")
        spec_args, spec_kwargs = (), dict(dynamic_shapes)
    else:
        if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(args):
            raise TypeError(f"example_inputs is a tuple of {len(args)}: dynamic_shapes must be a tuple of "
                            f"{len(args)} specifications")
        spec_args, spec_kwargs = tuple(dynamic_shapes), {}
    if sig is not None:  # by the model's argument names
        return dict(sig.bind(*spec_args, **spec_kwargs).arguments)
    if not kwargs:
        return tuple(spec_args)
    raise TypeError(f"{model_name}.forward takes these keyword inputs through **kwargs, where torch.export "
                    "cannot name their dynamic shapes: export with positional example_inputs, or dynamic_shapes=None")


def _batch_of_two(args: tuple, kwargs: dict):
    """The inputs with a batch of 2 when every tensor has batch 1 (dim 0), else None:
    torch.export pins sizes 0 and 1 to the example's, so an example of one
    sentence would make a program that only takes one."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 or t.shape[0] != 1 for t in leaves):
        return None
    two = lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t
    return pytree.tree_map(two, args), pytree.tree_map(two, kwargs)


def export(sparse_model: nn.Module, example_inputs, path: "str | os.PathLike", *, dynamic_shapes="auto"):
    """Exports ``sparse_model`` with ``torch.export`` to a ``.pt2`` file.

    The graph calls ``torch.ops.sparsert.*`` for every sparse layer, with the
    packed arrays as constants of the program. In a fresh process,
    ``import sparsert`` (registers the ops) then ``torch.export.load(path)``
    runs it without any model code. ``example_inputs`` is a tensor, a tuple of
    positional inputs, or a dict of keyword inputs. Outputs become built-in
    containers (a ``ModelOutput`` becomes a dict of its tensors), so loading
    needs no model classes. Returns the ExportedProgram.

    ``dynamic_shapes``: which input sizes the program accepts.

    * ``"auto"`` (default): every size the model allows to vary (batch,
      sequence length, image size for a fully convolutional model) is
      dynamic; the others are fixed to the example's. A BERT exported with
      ``1x128`` token ids runs on any batch and on up to
      ``max_position_embeddings`` tokens. Sizes of 1 cannot be made dynamic
      by torch.export, so an example whose every input has batch 1 is traced
      with that row twice (the program still runs on a batch of 1).
    * ``None``: every size fixed to the example's.
    * torch.export's own specification, in the structure of
      ``example_inputs``: for a tensor, ``{0: Dim("batch")}``; for a tuple, a
      tuple of those; for a dict, a dict by input name, e.g.
      ``{"input_ids": {0: Dim("batch"), 1: Dim("seq", max=512)}, ...}``.
    """
    if not isinstance(sparse_model, nn.Module):
        raise TypeError(f"sparse_model must be an nn.Module, got {type(sparse_model).__name__}")
    import sparsert.ops  # noqa: F401  (registers the ops the graph calls)

    args, kwargs = _split(example_inputs)
    wrapper, sig = _wrap(sparse_model)
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError:  # inputs that only the model's *args / **kwargs take: torch's own binding
            wrapper, sig = _PlainOutputs(sparse_model), None
    attempts = [(args, kwargs)]
    if isinstance(dynamic_shapes, str):
        if dynamic_shapes != "auto":
            raise ValueError(f"dynamic_shapes must be 'auto', None or torch.export's specification, "
                             f"got {dynamic_shapes!r}")
        two = _batch_of_two(args, kwargs)
        if two is not None:
            attempts.insert(0, two)  # falls back to the example itself if the model will not take two rows
    was = sparse_model.training
    sparse_model.eval()
    try:
        for i, (a, kw) in enumerate(attempts):
            spec = _spec(dynamic_shapes, example_inputs, a, kw, sig, type(sparse_model).__name__)
            try:
                with torch.no_grad():
                    program = torch.export.export(wrapper, a, kw, dynamic_shapes=spec)
                break
            except Exception:
                if i == len(attempts) - 1:
                    raise
    finally:
        sparse_model.train(was)
    torch.export.save(program, str(path))
    return program


def input_shapes(program) -> dict:
    """What an exported program takes: input name -> its sizes in words, e.g.
    ``{"input_ids": "any x up to 512"}`` (a number: fixed; "any": every size;
    "up to n": at most n). Works on an ExportedProgram (and on its ``.module()``
    as far as it keeps the input shapes)."""
    graph = program.graph
    ranges = getattr(program, "range_constraints", None) or {}
    if not ranges and hasattr(program, "meta"):
        ranges = program.meta.get("range_constraints", {}) or {}
    user = None
    if hasattr(program, "graph_signature"):
        user = set(program.graph_signature.user_inputs)
    out = {}
    for node in graph.nodes:
        if node.op != "placeholder" or (user is not None and node.name not in user):
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        out[node.name] = " x ".join(_size_words(d, ranges) for d in val.shape) or "scalar"
    return out


def _size_words(d, ranges) -> str:
    import sympy
    from torch.utils._sympy.numbers import int_oo

    if isinstance(d, int):
        return str(d)
    expr = getattr(getattr(d, "node", None), "expr", None)
    if expr is not None and expr.is_number:  # a size fixed while tracing
        return str(int(expr))
    vr = ranges.get(expr) if expr is not None else None
    if vr is None:
        return "any"
    hi = vr.upper
    bounded = hi not in (int_oo, sympy.oo)
    return f"up to {int(hi)}" if bounded else "any"


def sparse_op_count(program) -> int:
    """How many nodes of an ExportedProgram's graph call sparsert ops."""
    return sum(1 for n in program.graph.nodes
               if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "sparsert")


class PickleRefused(ValueError):
    """A ``.pt2`` archive holds a part that only ``pickle`` can read (and pickle runs code)."""


@contextlib.contextmanager
def _without_pickle(path: str):
    """Everything ``torch.export.load`` could unpickle, refused for the duration:
    ``torch.load`` only in ``weights_only`` mode (torch's restricted unpickler,
    which builds tensors and containers and calls nothing else), and torch's
    other unpicklers (TorchScript objects, plain ``pickle.loads`` of opaque
    constants) not at all. ``torch.export.load`` falls back to full pickle for
    example inputs that weights_only cannot read, and uses it outright for
    weights and constants saved with ``use_pickle``: a crafted archive runs
    code there."""
    import pickle as _pickle
    import types

    from torch.export.pt2_archive import _package

    def refuse(*_args, **_kwargs):
        raise PickleRefused(f"{path}: refused: the archive holds a pickled part, and unpickling can run code "
                            "(load it with trust_pickle=True / --trust-pickle only if you trust the file)")

    real_load = torch.load

    def weights_only_load(f, *args, weights_only=None, **kwargs):
        if weights_only is False:
            refuse()
        return real_load(f, *args, weights_only=True, **kwargs)

    stub_pickle = types.SimpleNamespace(**{k: getattr(_pickle, k) for k in dir(_pickle) if not k.startswith("__")})
    stub_pickle.loads = stub_pickle.load = refuse
    saved = (torch.load, torch._C._pickle_load_obj, _package.pickle)
    torch.load, torch._C._pickle_load_obj, _package.pickle = weights_only_load, refuse, stub_pickle
    try:
        yield
    finally:
        torch.load, torch._C._pickle_load_obj, _package.pickle = saved


def load_program(path: "str | os.PathLike", *, trust_pickle: bool = False):
    """``torch.export.load(path)`` that never unpickles unless ``trust_pickle``:
    an archive with a part only pickle can read (example inputs, weights or
    constants saved with pickle, custom objects) raises :class:`PickleRefused`.
    Archives written by :func:`export` need no pickle. ``import sparsert`` has
    registered the ops the program calls."""
    path = str(path)
    if trust_pickle:
        return torch.export.load(path)
    with _without_pickle(path):
        return torch.export.load(path)
