"""The interface between the training loop and a task.

The loop is the same for every task; what differs sits behind ``Task``:

    output = task.infer(model, images)        evaluation forward (whole image, sliding window)
    loss   = task.loss(output, target)        from the model's output: a tensor, or a dict
                                              with "out" (and "aux" in training)
    stats  = task.train_stats(output, target) additive device tensors, summed over log steps
    meter  = task.meter(device)               the evaluation meter (update per batch)

Every value a task returns inside a step stays on the device of its inputs: no ``.item()``,
no host copies, no data-dependent shapes. The loop sums, all-reduces and reads them back only
at logging and evaluation boundaries.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Meter(Protocol):
    """Evaluation sums on one rank: ``update`` per batch, ``sums`` (additive, on the device)
    all-reduced by the engine, then ``summarize`` on the global sums."""

    def update(self, output, target: torch.Tensor) -> None: ...
    def sums(self) -> dict[str, torch.Tensor]: ...
    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]: ...


class Task(Protocol):
    name: str
    # The evaluation result keys that the final JSON line carries, as ``val_<key>``.
    final_keys: tuple[str, ...]

    def loss(self, output, target: torch.Tensor) -> torch.Tensor: ...
    def infer(self, model: nn.Module, images: torch.Tensor): ...
    def count(self, target: torch.Tensor) -> torch.Tensor:
        """Samples (images, not pixels) in a batch, as a device scalar."""
    def train_stats(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def train_summary(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """``train/<key>`` metrics from summed ``train_stats`` (and the summed ``count``)."""
    def meter(self, device: torch.device) -> Meter: ...
    def log_line(self, result: dict[str, float]) -> str:
        """The evaluation summary as a short human-readable line."""
    def artifacts(self, result: dict[str, float]) -> dict[str, str]:
        """Files (name → text) to keep beside the run and in MLflow, e.g. a per-class table."""
