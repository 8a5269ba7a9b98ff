"""Ask for a speedup, get the model that reaches it with the least estimated loss.

The planner sits above pruning (:mod:`sparsert.prune`, which knows no kernels)
and conversion (:mod:`sparsert.convert`, :mod:`sparsert.nn`, which know them):

* :mod:`~sparsert.planner.tables` — measured time per layer x pattern x sparsity
  on this machine, on each layer's real input shape, cached on disk;
* :mod:`~sparsert.planner.solver` — a multiple-choice knapsack over those times
  minimising the summed sensitivity (from ``sparsert.prune.allocation``);
* :mod:`~sparsert.planner.plan` — the plan as a table and a frontier plot;
* :mod:`~sparsert.planner.scoring` — candidate plans that reach the target (the solver's,
  uniform per pattern, ...) pruned on a copy and scored by the model's output error;
* :mod:`~sparsert.planner.pruner` — ``sparsert.Pruner(..., target_speedup=2)``.

```python
pruner = sparsert.Pruner(model, importance="wanda", target_speedup=2.0, example_inputs=x)
pruner.calibrate(batches)
print(pruner.plan)
pruner.step()
fast = pruner.sparsify()
```
"""

from .plan import LayerPlan, Plan, build_plan
from .pruner import Pruner, plannable_layers, sparsify_planned
from .solver import Option, Solution, solve
from .tables import DEFAULT_PATTERNS, DEFAULT_SPARSITIES, LayerTimes, TimeTables, cache_dir, time_tables

__all__ = ["Pruner", "Plan", "LayerPlan", "build_plan", "sparsify_planned", "plannable_layers", "Option",
           "Solution", "solve", "TimeTables", "LayerTimes", "time_tables", "cache_dir", "DEFAULT_PATTERNS",
           "DEFAULT_SPARSITIES"]
