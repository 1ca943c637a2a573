"""Semantic segmentation: per-pixel cross-entropy (label 255 ignored) with an auxiliary head,
and mIoU from a confusion matrix accumulated over the whole evaluation set.

Loss (torchvision / mmsegmentation):  L = CE(out, y) + aux_weight · CE(aux, y), both over the
pixels with y ≠ 255, ``out`` and ``aux`` at the label's resolution.

Metrics, from the confusion matrix M (rows: ground truth, columns: prediction) over every
pixel whose ground truth is not 255, summed over all images and all ranks:
    IoU_c = M[c,c] / (Σ_j M[c,j] + Σ_i M[i,c] − M[c,c])      (TP / (TP + FP + FN))
    mIoU  = mean of IoU_c over the classes with TP + FP + FN > 0
    pixel accuracy = Σ_c M[c,c] / Σ M
which is what Cityscapes' official ``evalPixelLevelSemanticLabeling`` computes (FP counted only
on non-ignored ground truth, classes absent from both prediction and ground truth skipped).

Evaluation forward (``val_mode``): ``whole`` runs the full image; ``slide`` runs ``crop``-sized
windows every ``stride`` pixels (the last window flush with the border, images smaller than a
window zero-padded) and averages the overlapping logits, as mmsegmentation's slide inference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError

IGNORE = 255


def _logits(output) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def confusion_matrix(logits_or_pred: torch.Tensor, target: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts (ground truth × prediction) of the pixels whose target is not
    255. Takes logits ``[N, C, H, W]`` or predictions ``[N, H, W]``; stays on the device, with
    no data-dependent shapes (no boolean indexing, which would read back to the host)."""
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 4 else logits_or_pred
    valid = target != IGNORE
    cell = torch.where(valid, target.long() * num_classes + pred.long(),
                       torch.full_like(target, num_classes * num_classes, dtype=torch.long))
    counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.long, device=target.device)
    counts.index_add_(0, cell.reshape(-1), torch.ones_like(cell.reshape(-1)))
    return counts[:-1].view(num_classes, num_classes)


def iou_from_confusion(matrix: torch.Tensor) -> tuple[list[float], float, float]:
    """(per-class IoU, NaN where TP + FP + FN = 0; their mean over the rest; pixel accuracy)."""
    m = matrix.double().cpu()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = [tp[c].item() / union[c].item() if union[c] > 0 else math.nan for c in range(len(tp))]
    present = [v for v in iou if not math.isnan(v)]
    miou = sum(present) / len(present) if present else math.nan
    total = m.sum().item()
    return iou, miou, tp.sum().item() / total if total else math.nan


class SegmentationMeter:
    def __init__(self, classes: list[str], device: torch.device):
        self.classes = classes
        n = len(classes)
        self.matrix = torch.zeros(n, n, dtype=torch.long, device=device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = _logits(logits).float()
        self.matrix += confusion_matrix(logits, target, len(self.classes))
        # per image: the mean CE over its labelled pixels (0 when it has none)
        per_pixel = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="none")
        labelled = (target != IGNORE).flatten(1).sum(1).clamp(min=1)
        self.loss += (per_pixel.flatten(1).sum(1) / labelled).sum().double()
        self.count += target.shape[0]

    def sums(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.matrix, "loss": self.loss, "count": self.count}

    def summarize(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        iou, miou, accuracy = iou_from_confusion(sums["confusion"])
        n = max(sums["count"].item(), 1.0)
        result = {"miou": miou, "pixel_acc": accuracy, "loss": sums["loss"].item() / n,
                  "samples": int(sums["count"].item())}
        result.update({f"iou/{name}": value for name, value in zip(self.classes, iou)
                       if not math.isnan(value)})
        return result


def _windows(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every ``stride``, the last flush with the
    end (one window at 0 when the axis is no longer than ``crop``)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - crop), 0) for i in range(count)]


def slide_inference(model: nn.Module, images: torch.Tensor, num_classes: int,
                    crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits ``[N, C, H, W]`` averaged over ``crop`` windows every ``stride`` pixels."""
    n, _, height, width = images.shape
    logits = images.new_zeros((n, num_classes, height, width), dtype=torch.float32)
    hits = torch.zeros((1, 1, height, width), dtype=torch.float32, device=images.device)
    for top in _windows(height, crop[0], stride[0]):
        for left in _windows(width, crop[1], stride[1]):
            window = images[:, :, top:top + crop[0], left:left + crop[1]]
            h, w = window.shape[2:]
            padded = F.pad(window, (0, max(crop[1] - w, 0), 0, max(crop[0] - h, 0)))
            out = _logits(model(padded)).float()[:, :, :h, :w]
            logits[:, :, top:top + h, left:left + w] += out
            hits[:, :, top:top + h, left:left + w] += 1
    return logits / hits


class Segmentation:
    name = "segmentation"
    final_keys = ("miou", "pixel_acc")

    def __init__(self, classes: list[str], aux_weight: float = 0.4, val_mode: str = "whole",
                 crop: tuple[int, int] = (512, 1024), stride: tuple[int, int] = (341, 682)):
        if val_mode not in ("whole", "slide"):
            raise ConfigError(f"segmentation.val_mode must be 'whole' or 'slide', got {val_mode!r}")
        if val_mode == "slide" and (min(crop) <= 0 or min(stride) <= 0):
            raise ConfigError("segmentation.crop and segmentation.stride must be positive")
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.aux_weight = aux_weight
        self.val_mode, self.crop, self.stride = val_mode, tuple(crop), tuple(stride)

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        loss = F.cross_entropy(_logits(output).float(), target, ignore_index=IGNORE)
        if isinstance(output, dict) and "aux" in output and self.aux_weight:
            loss = loss + self.aux_weight * F.cross_entropy(output["aux"].float(), target,
                                                            ignore_index=IGNORE)
        return loss

    def infer(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.val_mode == "slide":
            return slide_inference(model, images, self.num_classes, self.crop, self.stride)
        return _logits(model(images))

    def count(self, target: torch.Tensor) -> torch.Tensor:
        return torch.full((), target.shape[0], dtype=torch.float64, device=target.device)

    def train_stats(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = _logits(output).detach().argmax(1)
        valid = target != IGNORE
        return {"pixels_correct": ((pred == target) & valid).sum().double(),
                "pixels": valid.sum().double()}

    def train_summary(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"pixel_acc": sums["pixels_correct"].item() / max(sums["pixels"].item(), 1.0)}

    def meter(self, device: torch.device) -> SegmentationMeter:
        return SegmentationMeter(self.classes, device)

    def log_line(self, result: dict[str, float]) -> str:
        return (f"val mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}  "
                f"loss {result['loss']:.4f}")

    def artifacts(self, result: dict[str, float]) -> dict[str, str]:
        rows = [f"| {name} | {result[f'iou/{name}']:.4f} |" if f"iou/{name}" in result
                else f"| {name} | n/a |" for name in self.classes]
        table = "\n".join(["| class | IoU |", "|---|---|", *rows,
                           f"| **mean** | {result['miou']:.4f} |"])
        return {"per_class_iou.md": table + "\n"}
