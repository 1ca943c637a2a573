"""The DeepSpeed engine of a run: its config (micro-batch, accumulation, clipping, ZeRO stage,
autocast) and ``deepspeed.initialize`` over the optimizer and per-iteration schedule built from
the config; and the refresh a method's in-place parameter edits need."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from pipeline.config import ConfigError
from pipeline.methods import Method

from .budget import Budget
from .evaluate import AUTOCAST
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups


def deepspeed_config(cfg: DictConfig) -> dict:
    e = cfg.engine
    if e.precision == "fp16" and e.zero_stage > 0:
        raise ConfigError("engine.precision=fp16 needs engine.zero_stage=0: DeepSpeed's "
                          "torch_autocast scales the loss only without ZeRO (use bf16)")
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.grad_clip,  # explicit: DeepSpeed's default is 1.0
        # Without clipping ZeRO 1/2 need no gradient norm, whose overflow check reads the
        # device back every step.
        "zero_optimization": {"stage": e.zero_stage, **(
            {"compute_grad_norm": False} if e.zero_stage and not e.grad_clip else {})},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    if AUTOCAST[e.precision] is not None:
        config["torch_autocast"] = {"enabled": True,
                                    "dtype": str(AUTOCAST[e.precision]).split(".")[-1]}
    return config


def build_engine(cfg: DictConfig, model: torch.nn.Module, method: Method, budget: Budget,
                  world_size: int):
    import deepspeed

    o, s = cfg.optim, cfg.schedule
    global_batch = cfg.data.batch_size * world_size * cfg.engine.grad_accum
    lr = o.lr * global_batch / o.reference_batch if o.reference_batch else o.lr
    groups = param_groups(model, o.weight_decay, o.no_decay_norm_bias,
                          method.param_groups(model), dict(o.lr_mult))
    optimizer = build_optimizer(groups, o.name, lr, o.momentum, o.nesterov, list(o.betas))
    factor = lr_factor(s.name, budget.schedule_epochs, s.warmup_epochs, s.warmup_start,
                       list(s.milestones), s.step_size, s.gamma, s.power, s.min_lr / lr)
    scheduler = build_scheduler(optimizer, factor, budget.steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine


def apply_edits(engine, method: Method, edits: dict) -> None:
    """After a method edited parameters in place: refresh ZeRO's fp32 master copies and,
    if the method asks, zero the optimizer state of the edited entries."""
    if not edits:
        return
    if engine.zero_optimization():
        engine.optimizer.refresh_fp32_params()
    if method.reset_optimizer_state:
        if engine.zero_optimization():
            raise ConfigError("method option reset_optimizer_state needs engine.zero_stage=0 "
                              "(ZeRO keeps optimizer state in flat partitions)")
        for param, mask in edits.items():
            for value in engine.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[mask] = 0
