"""The optimiser: one option per layer, least summed loss within a time budget.

A multiple-choice knapsack solved by dynamic programming over discretised
time. Every option's time is rounded *up* to whole quanta, so a solution the
program finds always fits the budget in real seconds; with times that are
whole multiples of the quantum the result is the exact optimum.

``best[b]`` after the last layer is the least loss of any choice whose
quantised time is at most ``b`` quanta — for every ``b`` at once, which is
the speed/quality frontier the plan plots.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

__all__ = ["Option", "Solution", "solve", "DEFAULT_BINS"]

#: quanta the budget is divided into (a finer grid costs memory and time linearly)
DEFAULT_BINS = 4000


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to run one layer: its time (seconds) and its estimated loss."""

    seconds: float
    loss: float
    label: object = None


@dataclasses.dataclass
class Solution:
    choice: list            # index of the chosen option per layer
    loss: float             # summed loss of the choice
    seconds: float          # summed (unquantised) time of the choice
    frontier: list          # [(seconds, least loss)] over every budget on the grid, Pareto points only


def _quantise(seconds: float, quantum: float) -> int:
    return max(0, math.ceil(seconds / quantum - 1e-9))


def solve(options: Sequence[Sequence[Option]], budget: float, *, quantum: float | None = None,
          bins: int = DEFAULT_BINS) -> Solution:
    """Picks one option per layer minimising the summed loss with the summed time <= ``budget``.

    ``quantum``: the time grid (default ``budget / bins``). Raises ``ValueError`` when
    no choice fits (the message gives the least reachable time).
    """
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("every layer needs at least one option")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    fastest = sum(min(o.seconds for o in opts) for opts in options)
    if budget <= 0 or fastest > budget * (1 + 1e-12):
        raise ValueError(f"no choice fits the time budget {budget:.6g} s: the fastest choice takes {fastest:.6g} s")
    q = float(quantum) if quantum is not None else budget / bins
    if not q > 0:
        raise ValueError("quantum must be positive")
    times = [[_quantise(o.seconds, q) for o in opts] for opts in options]
    limit = sum(max(t) for t in times)          # enough to reach every choice: the whole frontier
    cap = int(math.floor(budget / q + 1e-9))   # quantised times summing to <= cap fit the budget
    size = max(limit, cap) + 1
    best = np.zeros(size)                       # least loss with quantised time <= b (no layer yet: 0)
    picks = []
    for opts, ts in zip(options, times):
        new = np.full(size, np.inf)
        arg = np.full(size, -1, dtype=np.int64)
        for j, (o, t) in enumerate(zip(opts, ts)):
            if t >= size:
                continue
            cand = np.full(size, np.inf)
            cand[t:] = best[:size - t] + o.loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
        picks.append(arg)
    b = cap
    if not math.isfinite(best[b]):
        # quantisation made the budget too tight for the fastest choice
        raise ValueError(f"no choice fits the time budget {budget:.6g} s on a grid of {q:.3g} s "
                         f"(the fastest choice takes {fastest:.6g} s)")
    total = float(best[b])
    choice = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        j = int(picks[i][b])
        choice[i] = j
        b -= times[i][j]
    frontier = []
    last = math.inf
    for k in range(size):
        if best[k] < last - 1e-15:
            frontier.append((k * q, float(best[k])))
            last = best[k]
    seconds = sum(options[i][j].seconds for i, j in enumerate(choice))
    return Solution(choice, total, seconds, frontier)
