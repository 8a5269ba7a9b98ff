"""Pruning schedules: how much sparsity each ``Pruner.step()`` reaches.

``schedule.sparsity_at(step, target)`` returns the sparsity to reach at the
given step (0-based), or ``None`` when nothing is pruned at that step.
``schedule.num_steps`` is the number of steps after which the target is reached.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "OneShot", "Iterative", "Gradual", "get_schedule"]


class Schedule:
    num_steps = 1

    def sparsity_at(self, step: int, target: float) -> float | None:
        raise NotImplementedError


@dataclass
class OneShot(Schedule):
    """Everything at the first step."""

    num_steps: int = 1

    def sparsity_at(self, step, target):
        return target if step == 0 else None


@dataclass
class Iterative(Schedule):
    """``rounds`` rounds of prune → fine-tune; the density shrinks geometrically.

    Round ``i`` (0-based) reaches sparsity ``1 - (1 - target)^((i + 1) / rounds)``,
    so each round removes the same fraction of the weights that are left.
    """

    rounds: int = 3

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError("Iterative schedule needs rounds >= 1")

    @property
    def num_steps(self):
        return self.rounds

    def sparsity_at(self, step, target):
        if step >= self.rounds:
            return None
        return 1.0 - (1.0 - target) ** ((step + 1) / self.rounds)


@dataclass
class Gradual(Schedule):
    """Gradual magnitude pruning, cubic schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))³`` for
    ``t0 <= t <= t0 + n·Δt``, pruning every ``frequency`` (Δt) steps from
    ``begin_step`` (t0) to ``end_step`` (t0 + n·Δt), starting at
    ``initial_sparsity`` (s_i) and ending at the Pruner's target (s_f).
    Call ``Pruner.step()`` once per training step (``finetune(..., pruner=p)``
    does this).
    """

    begin_step: int = 0
    end_step: int = 100
    frequency: int = 10
    initial_sparsity: float = 0.0

    def __post_init__(self):
        if self.end_step <= self.begin_step or self.begin_step < 0:
            raise ValueError("Gradual schedule needs 0 <= begin_step < end_step")
        if self.frequency < 1:
            raise ValueError("Gradual schedule needs frequency >= 1")
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError("initial_sparsity must be in [0, 1)")

    @property
    def num_steps(self):
        return self.end_step + 1

    def cubic(self, step: int, target: float) -> float:
        t = min(max(step, self.begin_step), self.end_step)
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        return target + (self.initial_sparsity - target) * (1.0 - frac) ** 3

    def sparsity_at(self, step, target):
        if step < self.begin_step or step > self.end_step:
            return None
        if (step - self.begin_step) % self.frequency and step != self.end_step:
            return None
        return self.cubic(step, target)


def get_schedule(schedule: "str | Schedule") -> Schedule:
    """``"oneshot"``, ``"iterative"`` (3 rounds), ``"gradual"`` (defaults) or an instance."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        key = schedule.strip().lower().replace("-", "").replace("_", "")
        if key == "oneshot":
            return OneShot()
        if key == "iterative":
            return Iterative()
        if key in ("gradual", "cubic", "zhugupta"):
            return Gradual()
    raise ValueError(
        f"unknown schedule {schedule!r}: use 'oneshot', 'iterative', 'gradual' or a Schedule instance"
    )
