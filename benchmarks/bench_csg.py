"""Associative convolution (CSG) benchmarks: training-step cost against the baseline at batch 64
and batch 1 (batched kernel generation, and per-layer generation as the authors do it), inference
latency of the CSG model and of its materialised export, and checkpoint sizes of codes + CSG
against the materialised model."""
from __future__ import annotations

import torch

from benchmarks.common import emit, inference, median_seconds, train_step
from pipeline.methods import get_method
from pipeline.methods.csg import storage_report
from pipeline.models.diagnostics import calibrate_batch_norm
from pipeline.models.registry import build_model

SIZE = 32
# (architecture, training batch): the target's setting, and a smaller one for quick runs
FULL, QUICK = ("cifar_resnet56", 64), ("cifar_resnet20", 16)
# (architecture, classes): the reference configurations whose sizes are reported
STORAGE = (("cifar_resnet20", 10), ("cifar_resnet56", 10), ("cifar_densenet_bc_40_48", 10),
           ("cifar_mobilenet_v2", 10), ("cifar_shufflenet_v2_x0_5", 10), ("resnet18", 1000),
           ("resnet50", 1000))


def _per_layer(model: torch.nn.Module) -> torch.nn.Module:
    """Without the model's batching pre-hook each generated conv generates its own kernel."""
    model._forward_pre_hooks.clear()
    return model


def bench_train_step(arch: str, batch: int, quick: bool) -> dict:
    torch.manual_seed(0)
    models = {"baseline": build_model(arch, 10), "csg": build_model(arch, 10, method="csg"),
              "csg_per_layer": _per_layer(build_model(arch, 10, method="csg"))}
    repeats = (3 if quick else 10) if batch > 1 else (10 if quick else 40)
    times = median_seconds({k: train_step(m, batch, SIZE) for k, m in models.items()},
                           repeats=repeats)
    return {"bench": "csg/train_step", "model": arch, "batch": batch, "image_size": SIZE,
            "threads": torch.get_num_threads(), **{f"{k}_s": v for k, v in times.items()},
            "csg_over_baseline": times["csg"] / times["baseline"],  # target ≤ 1.03 at batch 64
            "per_layer_over_baseline": times["csg_per_layer"] / times["baseline"]}


def bench_inference(arch: str, batch: int, quick: bool) -> dict:
    torch.manual_seed(0)
    calibration = torch.randn(64, 3, SIZE, SIZE)
    baseline = calibrate_batch_norm(build_model(arch, 10), calibration)
    csg = calibrate_batch_norm(build_model(arch, 10, method="csg"), calibration)
    exported = get_method("csg").export(csg)
    times = median_seconds({"baseline": inference(baseline, batch, SIZE),
                            "csg": inference(csg, batch, SIZE),
                            "exported": inference(exported, batch, SIZE)},
                           repeats=10 if quick else 40)
    return {"bench": "csg/inference", "model": arch, "batch": batch, "image_size": SIZE,
            "threads": torch.get_num_threads(), **{f"{k}_s": v for k, v in times.items()},
            "csg_over_baseline": times["csg"] / times["baseline"],
            "exported_over_baseline": times["exported"] / times["baseline"]}  # target 1.00


def storage(arch: str, num_classes: int) -> dict:
    report = storage_report(build_model(arch, num_classes, method="csg"))
    return {"bench": "csg/storage", "model": arch, "num_classes": num_classes, **report,
            "param_reduction": report["materialized_params"] / report["params"],
            "checkpoint_reduction": (report["materialized_checkpoint_mb"]
                                     / report["checkpoint_mb"])}


def run(quick: bool) -> list[dict]:
    arch, batch = QUICK if quick else FULL
    records = [bench_train_step(arch, batch, quick), bench_train_step(arch, 1, quick),
               bench_inference(arch, 1, quick), bench_inference(arch, batch, quick)]
    records += [storage(arch, n) for arch, n in (STORAGE[:2] if quick else STORAGE)]
    return records


if __name__ == "__main__":
    import sys

    for record in run(quick="--quick" in sys.argv):
        emit(record)
