"""Pruning: score importance, remove the least important share, fine-tune the rest.

```python
from sparsert.prune import Pruner, prune, finetune, report
pruner = Pruner(model, importance="taylor", pattern="4x1", sparsity=0.9,
                scope="global", exclude=["classifier"])
# or importance="sparsegpt" (OBS masks + weight updates), allocation="owl"|"sensitivity"
pruner.calibrate(batches, loss_fn=None)   # when the criterion needs data
pruner.step()                             # one-shot masks or the next scheduled step
finetune(model, train_batches, loss_fn, epochs=3, teacher=dense_model)
recover(model, dense_model, unlabeled_batches, steps=1000, pruner=gradual_pruner,
        checkpoint="run.pt", time_budget=600)   # distillation, resumable
print(report(model))
```

This layer knows nothing about kernels: it leaves exact zeros in the weights
(plus a mask that keeps them zero through fine-tuning) and later stages read
the zeros.
"""

from .allocation import (SensitivityTable, allocate_from_table, owl_sparsities, sensitivity_grid,
                         sensitivity_table, sensitivity_tables)
from .criteria import (
    CRITERIA,
    Activation,
    Criterion,
    Fisher,
    Gradient,
    Hessian,
    Magnitude,
    Taylor,
    Wanda,
    get_criterion,
)
from .finetune import finetune, kd_loss
from .masks import apply_mask, apply_masks, get_mask, masked_modules, masks_from_zeros, remove_masks
from .patterns import Pattern, parse_pattern, weight_2d_shape
from .pruner import DEFAULT_LAYER_TYPES, Pruner, prune
from .reconstruct import reconstruct
from .recover import RecoveryResult, distill_loss, recover
from .report import LayerReport, PruneReport, report
from .sparsegpt import SparseGPT, sparsegpt_weight
from .schedules import Gradual, Iterative, OneShot, Schedule, get_schedule

__all__ = [
    "CRITERIA",
    "DEFAULT_LAYER_TYPES",
    "Activation",
    "Criterion",
    "Fisher",
    "Gradient",
    "Gradual",
    "Hessian",
    "Iterative",
    "LayerReport",
    "Magnitude",
    "OneShot",
    "Pattern",
    "PruneReport",
    "RecoveryResult",
    "Pruner",
    "Schedule",
    "SensitivityTable",
    "SparseGPT",
    "Taylor",
    "Wanda",
    "allocate_from_table",
    "apply_mask",
    "apply_masks",
    "distill_loss",
    "finetune",
    "get_criterion",
    "get_mask",
    "get_schedule",
    "kd_loss",
    "masked_modules",
    "masks_from_zeros",
    "owl_sparsities",
    "parse_pattern",
    "prune",
    "reconstruct",
    "recover",
    "remove_masks",
    "report",
    "sensitivity_grid",
    "sensitivity_table",
    "sensitivity_tables",
    "sparsegpt_weight",
    "weight_2d_shape",
]


# ``sparsert.prune`` is both this sub-package and the one-call shorthand
# ``sparsert.prune(model, ...)``. Importing the sub-package rebinds the
# attribute ``sparsert.prune`` to the module, so make the module callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``sparsert.prune(model, ...)`` is :func:`sparsert.prune.prune`."""
        return prune(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
