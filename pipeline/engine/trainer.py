"""The training loop: one run of one config, on one process or many (torchrun / SLURM).

    setup ranks → loaders → model (+ method) → deepspeed.initialize → resume?
    for each epoch: train steps (task loss + method losses) → average buffers → evaluate
                    → method.on_epoch_end → checkpoint
    → final checkpoint, exported model, one JSON line

Stopping: SIGTERM, SIGUSR1 or the file named by $PIPELINE_STOP_FILE make every rank finish the
current optimizer step, write a checkpoint and exit with EXIT_RESUMABLE; `checkpoint.resume=auto`
(the default) continues from there, into the same MLflow run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.config import ConfigError, flatten, to_yaml
from pipeline.data import build_loaders
from pipeline.methods import Method, get_method
from pipeline.models import build_model
from pipeline.models.diagnostics import InhibitedChannels
from pipeline.models.summary import count_params
from pipeline.tracking import open_tracker, run_tags

from . import checkpoint as ckpt
from .distributed import Dist, any_rank, average_buffers, all_reduce_sum, setup, teardown
from .evaluate import evaluate, topk_correct
from .optim import build_optimizer, build_scheduler, lr_factor, param_groups

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("pipeline")


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0          # current epoch (0-based)
    step_in_epoch: int = 0  # micro-batches of this epoch already consumed
    run_id: str | None = None


def eval_meters(cfg: DictConfig, method: Method, model: torch.nn.Module) -> list:
    """The inhibited-channel diagnostic (every model) and the method's own meters."""
    return [InhibitedChannels(cfg.engine.inhibited_threshold), *method.eval_meters(model)]


class StopRequest:
    """Set by SIGTERM / SIGUSR1 or by the stop file; read once per optimizer step."""

    def __init__(self) -> None:
        self.signalled = False
        self.stop_file = os.environ.get("PIPELINE_STOP_FILE")
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def __bool__(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _deepspeed_config(cfg: DictConfig) -> dict:
    e = cfg.engine
    if e.precision == "fp16" and e.zero_stage > 0:
        raise ConfigError("engine.precision=fp16 needs engine.zero_stage=0: DeepSpeed's "
                          "torch_autocast scales the loss only without ZeRO (use bf16)")
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum,
        "gradient_clipping": e.grad_clip,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": e.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
    }
    if AUTOCAST[e.precision] is not None:
        config["torch_autocast"] = {"enabled": True,
                                    "dtype": str(AUTOCAST[e.precision]).split(".")[-1]}
    return config


def _build_engine(cfg: DictConfig, model: torch.nn.Module, method: Method, steps_per_epoch: int,
                  world_size: int):
    import deepspeed

    o, s = cfg.optim, cfg.schedule
    global_batch = cfg.data.batch_size * world_size * cfg.engine.grad_accum
    lr = o.lr * global_batch / o.reference_batch if o.reference_batch else o.lr
    groups = param_groups(model, o.weight_decay, o.no_decay_norm_bias,
                          method.param_groups(model))
    optimizer = build_optimizer(groups, o.name, lr, o.momentum, o.nesterov, list(o.betas))
    factor = lr_factor(s.name, s.epochs, s.warmup_epochs, s.warmup_start, list(s.milestones),
                       s.step_size, s.gamma, s.power, s.min_lr / lr)
    scheduler = build_scheduler(optimizer, factor, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=_deepspeed_config(cfg))
    return engine


def _apply_edits(engine, method: Method, edits: dict) -> None:
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


class Run:
    """One training run; ``execute()`` returns the process exit code."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.dist: Dist = setup()
        self.main = self.dist.is_main
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.autocast = AUTOCAST[cfg.engine.precision]
        self.stop = StopRequest()
        self.last_save = time.monotonic()

        _seed(cfg.engine.seed)  # the same on every rank: identical initial weights
        self.train_data, self.val_data = build_loaders(
            cfg.data, rank=self.dist.rank, world_size=self.dist.world_size,
            seed=cfg.engine.seed, device=self.dist.device)
        num_classes = cfg.model.num_classes or self.train_data.num_classes
        if num_classes != self.train_data.num_classes:
            raise ConfigError(f"config key 'model.num_classes': {num_classes} but "
                              f"{cfg.data.root} has {self.train_data.num_classes} classes")
        self.method = get_method(cfg.method.name, **cfg.method.opts)
        self.num_classes = num_classes
        model = self._build_model().to(self.dist.device)
        if cfg.engine.sync_bn:
            if self.dist.device.type != "cuda":
                raise ConfigError("config key 'engine.sync_bn': SyncBatchNorm needs CUDA")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        accum = cfg.engine.grad_accum
        micro = len(self.train_data)
        if cfg.engine.max_steps_per_epoch:
            micro = min(micro, cfg.engine.max_steps_per_epoch)
        self.micro_steps = micro // accum * accum
        if self.micro_steps == 0:
            raise ConfigError(f"an epoch has {len(self.train_data)} batches per rank, fewer "
                              f"than engine.grad_accum={accum}: lower data.batch_size")
        self.engine = _build_engine(cfg, model, self.method, self.micro_steps // accum,
                                    self.dist.world_size)
        self.model = self.engine.module
        _seed(cfg.engine.seed + 7919 * (self.dist.rank + 1))  # per-rank streams from here on
        self.pos = self._resume()
        self.tracker = open_tracker(cfg.tracking.enabled and self.main, cfg.tracking.experiment,
                                    cfg.tracking.run_name or cfg.name, self.pos.run_id,
                                    spool_dir=self.run_dir)

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return build_model(cfg.model.name, self.num_classes, method=cfg.method.name,
                           **cfg.model.opts)

    # ----------------------------------------------------------------------------- resume
    def _resume(self) -> Position:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            if ckpt.latest_tag(self.ckpt_dir):
                raise ConfigError(f"{self.ckpt_dir} holds checkpoints of an earlier run: resume "
                                  "it (checkpoint.resume=auto) or set another name= / "
                                  "checkpoint.dir=")
            return Position()
        if mode == "auto":
            tag_dir = self.ckpt_dir
            tag = ckpt.latest_tag(self.ckpt_dir)
            if tag is None:
                return Position()
        else:
            tag_dir, tag = Path(mode).parent, Path(mode).name
            if not (tag_dir / tag).is_dir():
                raise ConfigError(f"config key 'checkpoint.resume': no checkpoint at {mode}")
        state = ckpt.load(self.engine, tag_dir, tag, self.dist.rank)
        log.info("resumed from %s (epoch %d, step %d of it)", tag_dir / tag, state["epoch"],
                 state["step_in_epoch"])
        return Position(state["epoch"], state["step_in_epoch"], state["run_id"])

    def _save(self) -> None:
        average_buffers(self.model)
        tag = f"epoch{self.pos.epoch:04d}-step{self.engine.global_steps:09d}"
        ckpt.save(self.engine, self.ckpt_dir, tag, vars(self.pos).copy(), self.dist.rank,
                  self.cfg.checkpoint.keep_last)
        self.last_save = time.monotonic()

    # ----------------------------------------------------------------------------- train
    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; True when stopped on request."""
        cfg, engine, pos = self.cfg, self.engine, self.pos
        accum, n = cfg.engine.grad_accum, self.micro_steps
        every = cfg.checkpoint.every_minutes * 60
        engine.train()
        sums = {"loss": torch.zeros(()), "correct": torch.zeros(()), "count": torch.zeros(())}
        tick = time.perf_counter()
        bar = tqdm(total=n, initial=pos.step_in_epoch, disable=not self.main or None,
                   desc=f"epoch {pos.epoch + 1}/{cfg.schedule.epochs}", file=sys.stderr,
                   leave=False)
        batches = self.train_data.epoch(pos.epoch, start_step=pos.step_in_epoch)
        for images, labels in batches:
            if pos.step_in_epoch >= n:
                break
            logits = engine(images).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.engine.label_smoothing)
            epoch_float = pos.epoch + pos.step_in_epoch / n
            extras = self.method.extra_losses(self.model, epoch_float)
            engine.backward(loss + sum(extras.values()) if extras else loss)
            engine.step()
            pos.step_in_epoch += 1
            bar.update()
            sums["loss"] += loss.detach().float() * labels.numel()
            sums["correct"] += topk_correct(logits.detach(), labels, (1,))[0]
            sums["count"] += labels.numel()
            if pos.step_in_epoch % accum:
                continue
            step = engine.global_steps
            self.method.on_step_end(self.model, step)
            if step % cfg.engine.log_every == 0 or pos.step_in_epoch == n:
                self._log_train(sums, extras, time.perf_counter() - tick, step, epoch_float)
                sums = {k: torch.zeros(()) for k in sums}
                tick = time.perf_counter()
            stop, due = any_rank([bool(self.stop), every > 0 and self.main and
                                  time.monotonic() - self.last_save > every], self.dist.device)
            if stop or (due and pos.step_in_epoch < n):
                self._save()
            if stop:
                bar.close()
                return True
        bar.close()
        return False

    def _log_train(self, sums: dict, extras: dict, seconds: float, step: int,
                   epoch_float: float) -> None:
        total = all_reduce_sum(sums, self.dist.device)
        count = max(total["count"].item(), 1.0)
        metrics = {"train/loss": total["loss"].item() / count,
                   "train/top1": total["correct"].item() / count,
                   "train/lr": self.engine.get_lr()[0],
                   "train/images_per_s": total["count"].item() / max(seconds, 1e-9),
                   "epoch": epoch_float}
        metrics.update({f"train/{k}": v.item() for k, v in extras.items()})
        self.tracker.log_metrics(metrics, step)

    # ----------------------------------------------------------------------------- evaluate
    def _evaluate(self) -> dict[str, float]:
        average_buffers(self.model)
        result = evaluate(self.model, self.val_data, self.dist.device,
                          eval_meters(self.cfg, self.method, self.model), self.autocast)
        metrics = {f"val/{k}": v for k, v in result.items()}
        metrics.update({f"method/{k}": v for k, v in self.method.metrics(self.model).items()})
        self.tracker.log_metrics(metrics, self.engine.global_steps)
        if self.main:
            log.info("epoch %d/%d  val top-1 %.4f  top-5 %.4f  loss %.4f",
                     self.pos.epoch + 1, self.cfg.schedule.epochs, result["top1"],
                     result["top5"], result["loss"])
        return result

    # ----------------------------------------------------------------------------- run
    def _start_tracking(self) -> None:
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        if self.pos.run_id is None:  # a new run: params once
            self.tracker.log_params(flatten(self.cfg))
            self.tracker.log_params({"data.train_batches_per_rank": len(self.train_data),
                                     "data.skipped_files": len(self.train_data.skipped) +
                                     len(self.val_data.skipped),
                                     "model.params": count_params(self.model)[0]})
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.set_tags({**run_tags(self.dist.world_size), **self.cfg.tracking.tags,
                               "method": self.cfg.method.name, "model": self.cfg.model.name})
        self.pos.run_id = self.tracker.run_id

    def _finish(self, result: dict[str, float]) -> dict:
        """Final weights and the exported model (rank 0), as files and MLflow artifacts."""
        final = self.run_dir / "final.pt"
        trained = self._build_model()  # a plain copy, free of DeepSpeed's hooks
        trained.load_state_dict(self.model.state_dict())
        exported = self.method.export(trained.to(self.dist.device).eval())
        if self.main:
            torch.save({"model": self.model.state_dict(), "config": OmegaConf.to_container(
                self.cfg, resolve=True)}, final)
            torch.save(exported, self.run_dir / "exported.pt")
            self.tracker.log_metrics({"export/params": count_params(exported)[0]},
                                     self.engine.global_steps)
            self.tracker.log_artifact(final, "checkpoint")
        record = {"event": "final", "val_top1": result["top1"], "val_top5": result["top5"],
                  "epochs": self.pos.epoch, "run_id": self.tracker.run_id,
                  "checkpoint": str(final.resolve())}
        record.update({k: result[k] for k in self.method.final_keys if k in result})
        return record

    def execute(self) -> int:
        cfg, pos = self.cfg, self.pos
        self._start_tracking()
        status = "FAILED"
        try:
            result = None
            while pos.epoch < cfg.schedule.epochs:
                if self._train_epoch():
                    status = "KILLED"
                    log.warning("stopped on request after a checkpoint; run again to resume")
                    return EXIT_RESUMABLE
                last = pos.epoch + 1 == cfg.schedule.epochs
                if last or (pos.epoch + 1) % cfg.engine.eval_every == 0:
                    result = self._evaluate()
                edits = self.method.on_epoch_end(self.model, pos.epoch, cfg.schedule.epochs,
                                                 cfg.engine.seed)
                _apply_edits(self.engine, self.method, edits)
                pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
                self._save()
            result = result or self._evaluate()  # a run resumed after its last epoch
            record = self._finish(result)
            status = "FINISHED"
            if self.main:
                print(json.dumps(record), flush=True)
            return 0
        finally:
            self.tracker.close(status)
            teardown()


def train(cfg: DictConfig) -> int:
    return Run(cfg).execute()


def evaluate_checkpoint(cfg: DictConfig, path: Path) -> dict | None:
    """Validation metrics (and the method's meters and metrics) of saved weights; the result
    on rank 0, None elsewhere."""
    dist = setup()
    try:
        train_data, val_data = build_loaders(cfg.data, rank=dist.rank,
                                             world_size=dist.world_size,
                                             seed=cfg.engine.seed, device=dist.device)
        method = get_method(cfg.method.name, **cfg.method.opts)
        model = build_model(cfg.model.name, cfg.model.num_classes or train_data.num_classes,
                            method=cfg.method.name, **cfg.model.opts)
        model.load_state_dict(ckpt.load_module_state(path))
        model.to(dist.device)
        result = evaluate(model, val_data, dist.device, eval_meters(cfg, method, model),
                          AUTOCAST[cfg.engine.precision])
        result.update({f"method/{k}": v for k, v in method.metrics(model).items()})
        return result if dist.is_main else None
    finally:
        teardown()
