"""Timing helpers shared by the benchmarks: every figure is measured, alternatives are
interleaved in one run and reported as ratios, so that machine load affects both sides alike."""
from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int = 10,
                   warmup: int = 2) -> dict[str, float]:
    """Median wall time of each callable, the callables run round-robin (interleaved)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model: nn.Module, batch_size: int, image_size: int,
               extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
               num_classes: int = 10) -> Callable[[], None]:
    """A closure running one SGD training step (forward, loss, backward, update)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, num_classes, (batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()

    return step


def inference(model: nn.Module, batch_size: int, image_size: int) -> Callable[[], None]:
    model.eval()
    x = torch.randn(batch_size, 3, image_size, image_size)

    @torch.no_grad()
    def run() -> None:
        model(x)

    return run


def emit(record: dict) -> None:
    """One JSON line on stdout per benchmark."""
    print(json.dumps(record), flush=True)
