"""When an op may skip the torch.library dispatcher."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def eager_cpu_call(*tensors: Optional[Tensor]) -> bool:
    """True when calling an op's CPU implementation directly is indistinguishable
    from calling the registered op: every tensor given is a plain CPU tensor,
    none needs autograd, and nothing traces, compiles, exports or intercepts
    (dispatch and function modes). Eager CPU calls then skip the dispatcher's
    Python layers, which cost tens of microseconds per call (more than a small
    sparse layer's kernel). ``None`` entries (e.g. no bias) are ignored."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack() > 0):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        plain = type(t) is Tensor or type(t) is torch.nn.Parameter  # no subclass (fake, functional...)
        if not plain or not t.is_cpu:  # (is_cpu: t.device.type costs 4x as much, per call)
            return False
        if grad and t.requires_grad:
            return False
    return True
