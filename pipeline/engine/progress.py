"""Rank 0's progress report: a tqdm bar over the whole run on a terminal; a log line every
``engine.log_every`` steps otherwise (SLURM logs, output redirected to a file), so that a log
never stays silent for an epoch. Both show the loss and the ETA of the run, not of the epoch.
"""
from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("pipeline")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    def __init__(self, enabled: bool, total_steps: int, done_steps: int, epochs: int,
                 steps_per_epoch: int):
        self.enabled, self.total, self.epochs = enabled, total_steps, epochs
        self.steps_per_epoch = steps_per_epoch
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=done_steps, disable=not self.terminal,
                        file=sys.stderr, dynamic_ncols=True, unit="step")
        self.started, self.start_step = time.monotonic(), done_steps

    def step(self) -> None:
        self.bar.update()

    def eta(self, step: int) -> float:
        rate = (time.monotonic() - self.started) / max(step - self.start_step, 1)
        return rate * (self.total - step)

    def report(self, step: int, epoch: int, in_epoch: int, metrics: dict[str, float]) -> None:
        """``in_epoch``: optimizer steps done in ``epoch``; ``metrics``: this log interval's
        ``train/*`` values (loss, lr, images/s)."""
        if not self.enabled:
            return
        loss, lr = metrics["train/loss"], metrics["train/lr"]
        if self.terminal:
            self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}")
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
            return
        log.info("epoch %d/%d  step %d/%d  run %d/%d  loss %.4f  lr %.4g  %.1f img/s  ETA %s",
                 epoch + 1, self.epochs, in_epoch, self.steps_per_epoch, step, self.total,
                 loss, lr, metrics["train/images_per_s"], _clock(self.eta(step)))

    def close(self) -> None:
        self.bar.close()
