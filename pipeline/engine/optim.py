"""Optimizer, parameter groups and per-iteration learning-rate schedules."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def _is_norm_or_bias(module: nn.Module, param_name: str) -> bool:
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return param_name == "bias" or isinstance(module, norms)


def _split_by_lr_mult(group: dict, mult_of: dict[int, float]) -> list[dict]:
    parts: dict[float, list] = {}
    for p in group["params"]:
        parts.setdefault(mult_of.get(id(p), 1.0), []).append(p)
    return [dict(group, params=params, **({"lr_mult": m} if m != 1.0 else {}))
            for m, params in parts.items()]


def _lr_mults(model: nn.Module, lr_mult: dict[str, float]) -> dict[int, float]:
    """id(parameter) → the multiplier of the longest name prefix in ``lr_mult`` it falls under
    (``{"head": 10}`` matches ``head.…`` but not ``heads.…``)."""
    out = {}
    for name, p in model.named_parameters():
        hits = [k for k in lr_mult if name == k or name.startswith(k + ".")]
        if hits:
            out[id(p)] = float(lr_mult[max(hits, key=len)])
    return out


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool,
                 overrides: list[dict], lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Default groups (decay / no decay on norm and bias), with a method's overrides taken out
    of them and appended as groups of their own; every group split by ``lr_mult`` (parameter
    name prefix → learning-rate multiplier, e.g. 10× for segmentation heads), the multiplier
    kept as the group's ``lr_mult``. Frozen parameters are left out."""
    overridden = {id(p) for group in overrides for p in group["params"]}
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in overridden:
                continue
            skip = no_decay_norm_bias and _is_norm_or_bias(module, name)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups += [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in overrides]
    mult_of = _lr_mults(model, lr_mult or {})
    return [part for g in groups if g["params"] for part in _split_by_lr_mult(g, mult_of)]


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float, nesterov: bool,
                    betas: list[float]) -> torch.optim.Optimizer:
    """SGD or AdamW at ``lr``, a group with ``lr_mult`` at that multiple of it (the schedule
    scales every group alike)."""
    groups = [dict(g, lr=lr * g["lr_mult"]) if "lr_mult" in g else g for g in groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def lr_factor(name: str, epochs: float, warmup_epochs: float, warmup_start: float,
              milestones: list[float], step_size: float, gamma: float, power: float,
              min_ratio: float) -> Callable[[float], float]:
    """The learning-rate multiplier as a function of the (fractional) epoch.

    Warm-up multiplies the schedule linearly from ``warmup_start`` to 1 over ``warmup_epochs``;
    cosine and poly decay over the epochs after warm-up, step and multistep count absolute
    epochs (as in the papers' recipes: ×0.1 at epochs 30/60/90).
    """
    span = max(epochs - warmup_epochs, 1e-8)

    def decay(e: float) -> float:
        t = min(max((e - warmup_epochs) / span, 0.0), 1.0)
        if name == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "poly":
            return max((1 - t) ** power, min_ratio)
        if name == "step":
            return gamma ** math.floor(e / step_size)
        if name == "multistep":
            return gamma ** sum(e >= m for m in milestones)
        return 1.0

    def factor(e: float) -> float:
        if e < warmup_epochs:
            return (warmup_start + (1 - warmup_start) * e / warmup_epochs) * decay(e)
        return decay(e)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[float], float],
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step (DeepSpeed steps it with the optimizer)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: factor(step / steps_per_epoch))
