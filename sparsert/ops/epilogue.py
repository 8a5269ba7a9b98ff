"""The one table of fused epilogues: what runs on a sparse product's output.

Every layer and file names its epilogue by ``name``; the ops take the
``code`` (saved files and the op schemas use these numbers, so they never
change). The native kernels (CPU Linear, CPU conv, CUDA) fuse only ReLU
(their own code 1, see ``csrc``); whatever a kernel does not fuse runs after
it in torch:

========  ====  =============  ===========================
name      code  kernel fuses   then in torch
========  ====  =============  ===========================
None      0     nothing (0)    -
"relu"    1     ReLU (1)       -
"gelu"    2     nothing (0)    ``F.gelu``
"relu6"   3     ReLU (1)       ``clamp(max=6)``
========  ====  =============  ===========================

:func:`grad_before` is the epilogue's derivative: what the ops' autograd
formulas use to take a gradient back through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Epilogue", "EPILOGUES", "NAMES", "code_of", "name_of", "kernel_code", "split", "finish", "reference", "as_module",
           "grad_before"]

#: the native kernels' own activation codes (csrc: 0 none, 1 relu)
KERNEL_NONE, KERNEL_RELU = 0, 1


@dataclass(frozen=True)
class Epilogue:
    name: Optional[str]
    code: int                                   # op / file code
    kernel: int                                 # what the native kernel fuses (KERNEL_*)
    after: Optional[Callable[[Tensor], Tensor]]  # what runs after the kernel, in torch (in place only
    #                                            where the kernel fuses something, so y is its own output)


EPILOGUES = (
    Epilogue(None, 0, KERNEL_NONE, None),
    Epilogue("relu", 1, KERNEL_RELU, None),
    Epilogue("gelu", 2, KERNEL_NONE, F.gelu),
    Epilogue("relu6", 3, KERNEL_RELU, lambda y: y.clamp_max_(6.0)),
)
_BY_CODE = {e.code: e for e in EPILOGUES}
_BY_NAME = {e.name: e for e in EPILOGUES}
_BY_NAME["none"] = _BY_NAME[None]
_MODULES = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "relu6": torch.nn.ReLU6}
#: every accepted name (None and "none" are the same: no epilogue)
NAMES = tuple(_BY_NAME)


def code_of(name) -> int:
    """``"relu6"`` -> 3; ValueError naming the accepted names otherwise."""
    try:
        return _BY_NAME[name].code
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {', '.join(map(repr, NAMES))}; got {name!r}") from None


def name_of(code: int) -> Optional[str]:
    """3 -> ``"relu6"`` (None for no epilogue)."""
    return _get(code).name


def kernel_code(code: int) -> int:
    """What a native kernel fuses for op code ``code``."""
    return _get(code).kernel


_SPLIT = {e.code: (e.kernel, e.after) for e in EPILOGUES}


def split(code: int) -> tuple:
    """(what a native kernel fuses, what then runs in torch or None) for op code
    ``code``: :func:`kernel_code` and :func:`finish`'s function in one lookup (per call)."""
    parts = _SPLIT.get(code) if type(code) is int else None
    if parts is None:  # (an int-like code, or an unknown one: _get says which codes exist)
        e = _get(code)
        parts = e.kernel, e.after
    return parts


def finish(y: Tensor, code: int) -> Tensor:
    """Runs what the kernel did not fuse on the kernel's output ``y`` (may modify ``y``)."""
    after = _get(code).after
    return y if after is None else after(y)


def as_module(code: int) -> Optional[torch.nn.Module]:
    """The epilogue as a torch layer (``nn.ReLU6()`` for relu6), None for no epilogue:
    what a densified layer appends to stay equal to the sparse one."""
    name = _get(code).name
    return None if name is None else _MODULES[name]()


def reference(y: Tensor, code: int) -> Tensor:
    """The whole epilogue in torch (the pure-torch paths and dense layers); ``y`` is not modified."""
    e = _get(code)
    if e.kernel == KERNEL_RELU:
        y = torch.relu(y)  # a new tensor: an in-place ``after`` (relu6) cannot touch the caller's y
    return y if e.after is None else e.after(y)


def grad_before(code: int, grad_y: Tensor, y: Tensor, pre_activation: Callable[[], Tensor]) -> Tensor:
    """The gradient with respect to the product before the epilogue, from the
    gradient ``grad_y`` with respect to the op's output ``y``: what torch's own
    ReLU / ReLU6 / GELU backward compute. ReLU and ReLU6 read the mask off ``y``
    (``y`` is in (0, 6) exactly where the product is); GELU needs the product
    itself, which ``pre_activation()`` recomputes (only then)."""
    name = _get(code).name
    if name is None:
        return grad_y
    if name == "relu":
        return grad_y.masked_fill(y <= 0, 0)
    if name == "relu6":
        return grad_y.masked_fill((y <= 0) | (y >= 6), 0)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad_y, pre_activation())
    raise AssertionError(f"no derivative for epilogue {name!r}")  # every entry of EPILOGUES has one above


def _get(code: int) -> Epilogue:
    try:
        return _BY_CODE[code]
    except (KeyError, TypeError):
        raise ValueError(f"unknown epilogue code {code!r}; known: {sorted(_BY_CODE)}") from None
