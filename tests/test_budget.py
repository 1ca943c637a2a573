"""Run budgets: epochs or iterations, and when a run evaluates and checkpoints."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.config import Config
from pipeline.engine.budget import Budget

pytestmark = pytest.mark.unit


def budget(steps_per_epoch: int = 10, **keys) -> Budget:
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(
        [f"{k.replace('__', '.')}={v}" for k, v in keys.items()]))
    return Budget.from_config(cfg, steps_per_epoch)


def test_epoch_budget_evaluates_every_n_epochs_and_at_the_last():
    b = budget(schedule__epochs=5, engine__eval_every=2)
    assert b.total_steps == 50 and b.epochs == 5 and not b.by_iterations
    assert [e for e in range(5) if b.eval_after_epoch(e)] == [1, 3, 4]
    assert b.save_after_epoch and not any(b.save_after_step(s) for s in range(51))


def test_iteration_budget_rolls_over_epochs_and_ends_mid_epoch():
    b = budget(steps_per_epoch=7, schedule__iterations=30, engine__eval_every_iterations=10,
               checkpoint__every_iterations=15)
    assert b.total_steps == 30 and b.epochs == 5 and b.schedule_epochs == pytest.approx(30 / 7)
    assert [s for s in range(1, 31) if b.eval_after_step(s)] == [10, 20, 30]
    assert [s for s in range(1, 31) if b.save_after_step(s)] == [15, 30]
    assert not any(b.eval_after_epoch(e) for e in range(5))   # by iterations only
    assert not b.save_after_epoch and b.done(30) and not b.done(29)


def test_iteration_budget_without_eval_interval_evaluates_by_epochs():
    b = budget(steps_per_epoch=7, schedule__iterations=30, engine__eval_every=2)
    # epoch 4 never ends (the budget stops inside it); the run evaluates once at its end
    assert [e for e in range(5) if b.eval_after_epoch(e)] == [1, 3, 4]
