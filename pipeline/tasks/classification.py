"""Image classification: cross-entropy on ``[N, C]`` logits, top-1 / top-5 accuracy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def topk_correct(logits: torch.Tensor, labels: torch.Tensor,
                 ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (device scalars)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def _images(target: torch.Tensor) -> torch.Tensor:
    # A shape is known on the host: no device read-back.
    return torch.full((), target.shape[0], dtype=torch.float64, device=target.device)


class ClassificationMeter:
    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros(2, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, labels, reduction="sum")
        self.correct += torch.stack(topk_correct(logits, labels, (1, 5)))
        self.count += labels.shape[0]

    def sums(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss, "correct": self.correct, "count": self.count}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        n = max(sums["count"].item(), 1.0)
        return {"loss": sums["loss"].item() / n, "top1": sums["correct"][0].item() / n,
                "top5": sums["correct"][1].item() / n, "samples": int(sums["count"].item())}


class Classification:
    name = "classification"
    final_keys = ("top1", "top5")

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def count(self, labels: torch.Tensor) -> torch.Tensor:
        return _images(labels)

    def train_stats(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"correct": topk_correct(logits.detach(), labels, (1,))[0].double()}

    def train_summary(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"top1": sums["correct"].item() / max(sums["count"].item(), 1.0)}

    def meter(self, device: torch.device) -> ClassificationMeter:
        return ClassificationMeter(device)

    def log_line(self, result: dict[str, float]) -> str:
        return (f"val top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                f"loss {result['loss']:.4f}")

    def artifacts(self, result: dict[str, float]) -> dict[str, str]:
        return {}
