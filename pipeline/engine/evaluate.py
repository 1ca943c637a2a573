"""Distributed-exact evaluation: every rank sums on its device, one all-reduce, then ratios.

The task supplies the forward (whole image or sliding window) and the meter (top-k counts, a
confusion matrix); method meters (dynamic MACs, inhibited channels) ride along. Nothing is
read back to the host until the sums of all ranks are in. ``evaluate_checkpoint`` is
``pipeline eval``: the same evaluation of saved weights, reading only the val split.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.data import DataError, build_val_loader
from pipeline.methods import EvalMeter, Method, get_method
from pipeline.models.diagnostics import InhibitedChannels
from pipeline.tasks import Task, build_task

from . import artifacts
from .distributed import all_reduce_sum, place, setup, teardown

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def eval_meters(cfg: DictConfig, method: Method, model: nn.Module) -> list:
    """The inhibited-channel diagnostic (every model) and the method's own meters."""
    return [InhibitedChannels(cfg.engine.inhibited_threshold), *method.eval_meters(model)]


def memory_format(cfg: DictConfig, device: torch.device) -> torch.memory_format:
    """channels_last (NHWC) on CUDA by default: cuDNN's fastest convolutions and tensor cores
    want it; on the CPU oneDNN gains little and our fused CPU kernels expect NCHW."""
    wanted = cfg.engine.channels_last
    on = device.type == "cuda" if wanted is None else wanted
    return torch.channels_last if on else torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, task: Task, device: torch.device,
             meters: list[EvalMeter] = (), autocast_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """The task's metrics over the whole evaluation set (all ranks), plus the meters'
    summaries. Every rank must call it (it ends in a collective)."""
    was_training = model.training
    model.eval()
    for meter in meters:
        meter.attach(model)
    task_meter = task.meter(device)
    try:
        for images, target in batches:
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                output = task.infer(model, images.contiguous(memory_format=memory_format))
            task_meter.update(output, target)
        parts = [task_meter.sums(), *(meter.sums() for meter in meters)]
    finally:
        for meter in meters:
            meter.detach()
        model.train(was_training)
    keyed = {f"{i}/{k}": v for i, sums in enumerate(parts) for k, v in sums.items()}
    total = all_reduce_sum(keyed, device)
    result: dict[str, float] = {}
    for i, meter in enumerate([task_meter, *meters]):
        prefix = f"{i}/"
        result.update(meter.summarize({k[len(prefix):]: v for k, v in total.items()
                                       if k.startswith(prefix)}))
    return result


def val_classes(val_data) -> list[str]:
    """The class names of a val loader: its class folders, or a segmentation split's label
    table (``SegValLoader`` has no ``classes``)."""
    if hasattr(val_data, "classes"):
        return list(val_data.classes)
    return list(val_data.split.table.classes)


def evaluate_checkpoint(cfg: DictConfig, checkpoint: artifacts.Checkpoint) -> dict | None:
    """Validation metrics of saved weights (``artifacts.read_checkpoint``) under ``cfg``; the
    result on rank 0, None elsewhere. Reads only the val split; its class folders are the
    classes. The method's meters and metrics describe its training form, so an exported.pt
    gets the task's metrics (and the inhibited-channel diagnostic) only."""
    where = place()
    val_data = build_val_loader(cfg.data, rank=where.rank, world_size=where.world_size,
                                device=where.device)
    classes = val_classes(val_data)
    if checkpoint.classes and list(checkpoint.classes) != classes:
        raise DataError(f"the class folders of {cfg.data.root}/val differ from the classes "
                        f"{checkpoint.path} was trained on ({len(checkpoint.classes)} classes, "
                        f"first {checkpoint.classes[:3]})")
    task = build_task(cfg, classes)
    model = artifacts.build_saved_model(
        checkpoint, cfg, artifacts.num_classes_of(cfg, checkpoint, len(classes)))
    method = get_method(cfg.method.name, **cfg.method.opts)
    meters = [InhibitedChannels(cfg.engine.inhibited_threshold)] if checkpoint.exported else \
        eval_meters(cfg, method, model)
    dist = setup()
    try:
        fmt = memory_format(cfg, dist.device)
        model.to(dist.device, memory_format=fmt)
        result = evaluate(model, val_data, task, dist.device, meters,
                          AUTOCAST[cfg.engine.precision], fmt)
        if not checkpoint.exported:
            result.update({f"method/{k}": v for k, v in method.metrics(model).items()})
        return result if dist.is_main else None
    finally:
        teardown()
