"""How long a run trains, and when it evaluates and checkpoints.

A budget is ``schedule.epochs`` passes over the data, or ``schedule.iterations`` optimizer
steps (segmentation recipes: "80k iterations"), in which case epochs roll over as the data runs
out and the last one stops at the budget. Evaluation runs every ``engine.eval_every`` epochs,
or every ``engine.eval_every_iterations`` steps when that is set, and always at the end.
Checkpoints: at every epoch end in an epoch budget, every ``checkpoint.every_iterations``
steps when set, at a stop request, and every ``checkpoint.every_minutes`` (decided at sync
points, on rank 0's clock). Every decision here depends on step numbers only, so all ranks
take it identically without communicating.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    steps_per_epoch: int          # optimizer steps in one epoch
    total_steps: int
    by_iterations: bool
    eval_every_epochs: int
    eval_every_steps: int         # 0: evaluate by epochs
    save_every_steps: int         # 0: no step-count checkpoints

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int) -> "Budget":
        iterations = cfg.schedule.iterations
        total = iterations if iterations > 0 else cfg.schedule.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, iterations > 0, cfg.engine.eval_every,
                   cfg.engine.eval_every_iterations, cfg.checkpoint.every_iterations)

    @property
    def epochs(self) -> int:
        """Epochs the run touches (the last may be partial in an iteration budget)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def schedule_epochs(self) -> float:
        """The length of the learning-rate schedule, in (fractional) epochs."""
        return self.total_steps / self.steps_per_epoch

    def done(self, step: int) -> bool:
        return step >= self.total_steps

    def eval_after_step(self, step: int) -> bool:
        return self.eval_every_steps > 0 and step % self.eval_every_steps == 0

    def eval_after_epoch(self, epoch: int) -> bool:
        """After 0-based ``epoch`` ends. (The run also evaluates once at its end.)"""
        if self.eval_every_steps:
            return False
        return (epoch + 1) % self.eval_every_epochs == 0 or epoch + 1 == self.epochs

    def save_after_step(self, step: int) -> bool:
        return self.save_every_steps > 0 and step % self.save_every_steps == 0

    @property
    def save_after_epoch(self) -> bool:
        return not self.by_iterations
