"""Distributed-exact evaluation: every rank sums, one all-reduce, then ratios."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import EvalMeter

from .distributed import all_reduce_sum


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             meters: list[EvalMeter] = (),
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole evaluation set (all ranks), plus the meters'
    summaries. Every rank must call it (it ends in a collective)."""
    was_training = model.training
    model.eval()
    for meter in meters:
        meter.attach(model)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros(2, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    try:
        for images, labels in batches:
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += torch.tensor(topk_correct(logits, labels, (1, 5)), dtype=torch.float64)
            count += labels.numel()
        sums = {"loss": loss_sum, "correct": correct, "count": count}
        meter_sums = [meter.sums() for meter in meters]
    finally:
        for meter in meters:
            meter.detach()
        model.train(was_training)
    keyed = {f"{i}/{k}": v for i, s in enumerate(meter_sums) for k, v in s.items()}
    total = all_reduce_sum({**sums, **keyed}, device)
    n = max(total["count"].item(), 1.0)
    result = {"loss": total["loss"].item() / n, "top1": total["correct"][0].item() / n,
              "top5": total["correct"][1].item() / n, "samples": int(total["count"].item())}
    for i, meter in enumerate(meters):
        prefix = f"{i}/"
        result.update(meter.summarize({k[len(prefix):]: v for k, v in total.items()
                                       if k.startswith(prefix)}))
    return result
