"""The one interface through which the engine talks to a channel method.

The engine calls these hooks and knows nothing else of a method; a method knows nothing of the
engine (no ranks, no DeepSpeed, no MLflow). Every hook has a no-op default, so the baseline is
the empty method. Per-batch state a loss needs (e.g. the gate logits of the current batch) lives
on the method's own modules, written during forward and read by ``extra_losses``.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class EvalMeter(Protocol):
    """Statistics gathered over the evaluation set, reduced exactly across ranks.

    ``attach`` registers forward hooks before evaluation; ``sums`` returns additive per-rank
    tensors (counts, sums) that the engine all-reduces with SUM; ``summarize`` turns the global
    sums into scalars to log. ``detach`` removes the hooks.
    """

    def attach(self, model: nn.Module) -> None: ...
    def detach(self) -> None: ...
    def sums(self) -> dict[str, torch.Tensor]: ...
    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]: ...


class Method:
    """A channel method's training hooks. Subclasses override what they need.

    ``opts`` are the method's training options from the config section ``method.opts``; a
    subclass declares the ones it accepts as keyword arguments of ``__init__`` so that an
    unknown key fails at construction with its name.
    """

    name = "baseline"
    # Evaluation metrics (from eval_meters) that also go into the final JSON line of a run.
    final_keys: tuple[str, ...] = ()
    # Whether the optimizer state (momentum, …) of entries edited by on_epoch_end is zeroed.
    reset_optimizer_state: bool = False

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Parameter-group overrides, e.g. ``[{"params": shifts, "weight_decay": 1e-5}]``.

        The engine puts every parameter not listed here in its default groups.
        """
        return []

    def extra_losses(self, model: nn.Module, epoch: float) -> dict[str, torch.Tensor]:
        """Loss terms added to the task loss after each forward (``epoch`` is fractional)."""
        return {}

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step."""

    def on_epoch_end(self, model: nn.Module, epoch: int, epochs: int,
                     seed: int) -> dict[nn.Parameter, torch.Tensor]:
        """Called on every rank after evaluation of ``epoch`` (0-based) of ``epochs``.

        Must act identically on every rank (derive randomness from ``seed`` and ``epoch``).
        Returns the parameters it edited in place, each with a boolean mask (its shape) of the
        edited entries, so that the engine refreshes optimizer-held master copies and, with
        ``reset_optimizer_state``, zeroes those entries' optimizer state.
        """
        return {}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Scalars to log at each evaluation (identical on every rank)."""
        return {}

    def eval_meters(self, model: nn.Module) -> list[EvalMeter]:
        """Meters run over the evaluation set (e.g. dynamic MACs of a gated model)."""
        return []

    def export(self, model: nn.Module) -> nn.Module:
        """The plain inference form of a trained model (eval mode, same outputs)."""
        return model
