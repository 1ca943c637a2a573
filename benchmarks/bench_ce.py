"""Channel Equilibrium: training-step time and step memory of each model with and without CE.

Time: median wall time of one SGD step (benchmarks.common), baseline and CE interleaved in one
run, reported as the ratio CE / baseline (target ≤ 1.3 on CPU for resnet50, batch 8, 224²).
Memory: the peak of live tensor bytes allocated during one step (after the warm-up steps, so
optimizer state already exists), from the torch profiler's memory timeline
(``profile_memory=True``; tracemalloc does not see torch's allocator); the ratio CE / baseline
(target ≤ 1.25).
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile

from benchmarks.common import emit, median_seconds, train_step
from pipeline.models import build_model

CASES = [  # (model, batch, image size, classes)
    ("cifar_resnet56", 64, 32, 10),
    ("resnet50", 8, 224, 1000),
]
QUICK_CASES = [("cifar_resnet20", 16, 32, 10), ("resnet18", 2, 112, 1000)]


def step_peak_bytes(step) -> int:
    """Peak of bytes allocated minus bytes freed during one call of ``step``, from the
    profiler's memory timeline (tensors alive before the step are not counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True, with_stack=False) as prof:
        step()
    timeline = MemoryProfile(prof.profiler.kineto_results).timeline
    sign = {Action.CREATE: 1, Action.DESTROY: -1}
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda event: event[0]):
        live += sign.get(action, 0) * size
        peak = max(peak, live)
    return peak


def compare(arch: str, batch: int, size: int, classes: int, repeats: int) -> dict:
    torch.manual_seed(0)
    steps = {method: train_step(build_model(arch, classes, method=method), batch, size,
                                num_classes=classes)
             for method in ("baseline", "ce")}
    seconds = median_seconds(steps, repeats=repeats, warmup=1)
    peaks = {method: step_peak_bytes(step) for method, step in steps.items()}
    return {"bench": "ce_train_step", "model": arch, "batch": batch, "image_size": size,
            "threads": torch.get_num_threads(),
            "baseline_s": round(seconds["baseline"], 4), "ce_s": round(seconds["ce"], 4),
            "time_ratio": round(seconds["ce"] / seconds["baseline"], 3),
            "baseline_step_mb": round(peaks["baseline"] / 2**20, 1),
            "ce_step_mb": round(peaks["ce"] / 2**20, 1),
            "memory_ratio": round(peaks["ce"] / peaks["baseline"], 3),
            "memory_measure": "torch.profiler memory timeline: peak live bytes within one step"}


def run(quick: bool) -> list[dict]:
    cases, repeats = (QUICK_CASES, 2) if quick else (CASES, 5)
    return [compare(*case, repeats=repeats) for case in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for record in run(args.quick):
        emit(record)


if __name__ == "__main__":
    main()
