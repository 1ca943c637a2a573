"""Selective convolution: training-step time of DenseNet-40 (batch 64, 32², CPU) against the
plain DenseNet-40, before any re-allocation and after 20% of the channels of every K > 0 unit
are re-allocated (shifted copies). The authors' unit costs 1.08× and 1.47×; target ≤ 1.05× and
≤ 1.20×. The re-allocated model is also timed with the grid_sample copy instead of the fused
CPU kernels (``grid_sample_ratio``)."""
from __future__ import annotations

import copy

import torch

from benchmarks.common import emit, median_seconds, train_step
from pipeline.methods.extensions import cpu_extension
from pipeline.methods.selectconv import epoch_generator, selective_units
from pipeline.models.registry import build_model

ARCH = "cifar_densenet40"


def reallocate_fraction(model: torch.nn.Module, fraction: float, seed: int = 0) -> int:
    """Close ``fraction`` of every K > 0 unit's channels at random and re-allocate them."""
    generator = epoch_generator(seed, 0)
    moved = 0
    for _, unit in selective_units(model):
        if unit.K == 0:
            continue
        count = round(fraction * unit.in_channels)
        closing = torch.randperm(unit.in_channels, generator=generator)[:count]
        unit.is_open[closing] = 0
        unit.realloc(generator)
        moved += unit.num_copies
    return moved


def run(quick: bool) -> list[dict]:
    batch, size = (16, 32) if quick else (64, 32)
    repeats = 3 if quick else 20
    torch.manual_seed(0)
    baseline = build_model(ARCH, 10)
    fresh = build_model(ARCH, 10, method="selectconv")
    moved = build_model(ARCH, 10, method="selectconv")
    copies = reallocate_fraction(moved, 0.2)
    moved_grid_sample = copy.deepcopy(moved)
    for _, unit in selective_units(moved_grid_sample):
        unit.fused_kernels = False
    times = median_seconds({
        "baseline": train_step(baseline, batch, size),
        "selectconv": train_step(fresh, batch, size),
        "selectconv_20pct": train_step(moved, batch, size),
        "selectconv_20pct_grid_sample": train_step(moved_grid_sample, batch, size),
    }, repeats=repeats)
    common = {"arch": ARCH, "batch": batch, "image_size": size, "device": "cpu",
              "threads": torch.get_num_threads(), "baseline_s": times["baseline"]}
    return [
        {"bench": "selectconv_step_ratio", "state": "before_realloc", **common,
         "method_s": times["selectconv"], "ratio": times["selectconv"] / times["baseline"],
         "target": 1.05, "authors": 1.08},
        {"bench": "selectconv_step_ratio", "state": "20pct_reallocated", **common,
         "copied_channels": copies, "method_s": times["selectconv_20pct"],
         "ratio": times["selectconv_20pct"] / times["baseline"], "target": 1.20,
         "authors": 1.47, "kernels": "fused" if cpu_extension("copy_slots") else "grid_sample",
         "grid_sample_ratio": times["selectconv_20pct_grid_sample"] / times["baseline"]},
    ]


if __name__ == "__main__":
    import sys

    for record in run(quick="--quick" in sys.argv):
        emit(record)
