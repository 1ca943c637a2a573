"""The training loop: one run of one config, on one process or many (torchrun / SLURM).

    hold the run directory (runlock.py), choose and check the checkpoint to resume (resume.py)
    validate: scan the data, build the task, method and model (before DeepSpeed is imported)
    → process group → deepspeed.initialize (deepspeed_engine.py) → resume?
    until the budget (epochs or iterations) is spent:
        train step: task loss + method losses, backward, optimizer step
        every log_every steps: train metrics (one all-reduce, read back to the host)
        every sync_every steps: the stop vote and the time-based checkpoint decision
        by budget: evaluate, method.on_epoch_end, checkpoint
    → final evaluation, final weights, exported model, one JSON line on stdout

Device discipline: batches arrive on the run's device and everything the step computes stays
there (the train sums too); the host reads values back only at log, sync, evaluation and
checkpoint points.

Stopping: SIGTERM, SIGINT, SIGUSR1 or the stop file (see ``stopping.py``) make every rank
finish its current optimizer step, write a checkpoint at the next sync point and exit with
EXIT_RESUMABLE; `checkpoint.resume=auto` (the default) continues from there, into the same
MLflow run.
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, flatten, to_yaml
from pipeline.data import build_loaders
from pipeline.methods import Method, get_method
from pipeline.models import build_model
from pipeline.models.summary import count_macs, count_params
from pipeline.tasks import Task, build_task
from pipeline.tracking import Tracker, open_tracker, run_tags

from . import checkpoint as ckpt
from . import resume
from .budget import Budget
from .distributed import (Dist, all_reduce_sum, any_rank, average_buffers, place, setup, teardown,
                          union_over_ranks)
from .artifacts import init_backbone, write_final
from .deepspeed_engine import apply_edits, build_engine
from .evaluate import AUTOCAST, eval_meters, evaluate, memory_format
from .progress import Progress
from .runlock import hold_run
from .stopping import StopRequest

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; run again to resume
FINAL_RECORD = "final.json"
log = logging.getLogger("pipeline")


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0          # current epoch (0-based)
    step_in_epoch: int = 0  # micro-batches of this epoch already consumed
    run_id: str | None = None


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _eval_input_size(cfg: DictConfig) -> int | tuple[int, int]:
    """The input size static MACs are counted at: the classifier's crop; a segmentation
    model's training crop [height, width]."""
    if cfg.task == "segmentation":
        return tuple(cfg.data.crop_size)
    return cfg.data.image_size


def train_step(engine, model: torch.nn.Module, task: Task, method: Method, images: torch.Tensor,
               target: torch.Tensor, epoch: float,
               fmt: torch.memory_format = torch.contiguous_format) -> tuple[dict, dict]:
    """One micro-batch: forward, task and method losses, backward, optimizer step (DeepSpeed
    applies it every grad_accum micro-batches). ``engine`` is called like the model and has
    ``backward(loss)`` and ``step()``. Returns this batch's additive sums and the method's
    loss terms, all on the batch's device."""
    output = engine(images.contiguous(memory_format=fmt))
    loss = task.loss(output, target)
    extras = method.extra_losses(model, epoch)
    engine.backward(loss + sum(extras.values()) if extras else loss)
    engine.step()
    count = task.count(target)
    return {"loss": loss.detach().double() * count, "count": count,
            **task.train_stats(output, target)}, extras


def accumulate(sums: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict:
    """``sums + batch`` key by key, out of place: the sums live where the batch's values do."""
    return {k: sums[k] + v if k in sums else v for k, v in batch.items()}


class Run:
    """One training run; ``execute()`` returns the process exit code."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        where = place()
        self.main = where.rank == 0
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.autocast = AUTOCAST[cfg.engine.precision]
        self.stop = StopRequest()
        self.tracker: Tracker = Tracker()
        self.result: dict[str, float] | None = None
        self.result_step = self.saved_step = -1
        self.last_tag: str | None = None  # the checkpoint this run last wrote or resumed from
        self.held = ExitStack()  # the run directory's lock, released at the end of execute()
        with ExitStack() as guard:  # released at once if the set-up fails
            if self.main:  # before anything of the run is read or written (see runlock.py)
                guard.enter_context(hold_run(self.run_dir, self.ckpt_dir))
            self.resume_point = resume.plan(cfg, self.ckpt_dir, where.world_size, self.main)
            self._build(where)
            self.held = guard.pop_all()

    def _build(self, where: Dist) -> None:
        cfg = self.cfg
        # Everything a user can get wrong is checked here, before DeepSpeed is imported.
        _seed(cfg.engine.seed)  # the same on every rank: identical initial weights
        self.train_data, self.val_data = build_loaders(
            cfg.data, rank=where.rank, world_size=where.world_size, seed=cfg.engine.seed,
            device=where.device, index_dir=self.run_dir)
        self.task: Task = build_task(cfg, self.train_data.classes)
        num_classes = cfg.model.num_classes or self.train_data.num_classes
        if num_classes != self.train_data.num_classes:
            raise ConfigError(f"config key 'model.num_classes': {num_classes} but "
                              f"{cfg.data.root} has {self.train_data.num_classes} classes")
        self.num_classes = num_classes
        self.method = get_method(cfg.method.name, **cfg.method.opts)
        model = self._build_model()
        if cfg.model.backbone_init:  # a resume then loads its checkpoint over these weights
            loaded = init_backbone(model, cfg.model.backbone_init, cfg.method.name)
            log.info("backbone: %d tensors from %s", loaded, cfg.model.backbone_init)
        accum = cfg.engine.grad_accum
        micro = len(self.train_data)
        if cfg.engine.max_steps_per_epoch:
            micro = min(micro, cfg.engine.max_steps_per_epoch)
        self.micro_steps = micro // accum * accum
        if self.micro_steps == 0:
            raise ConfigError(f"an epoch has {len(self.train_data)} batches per rank, fewer "
                              f"than engine.grad_accum={accum}: lower data.batch_size")
        self.budget = Budget.from_config(cfg, self.micro_steps // accum)
        cuda = where.device.type == "cuda"
        if cfg.engine.sync_bn and not cuda:
            raise ConfigError("config key 'engine.sync_bn': SyncBatchNorm needs CUDA")
        # null: SyncBatchNorm where it runs and matters (CUDA, more than one rank)
        sync_bn = cfg.engine.sync_bn or (cfg.engine.sync_bn is None and cuda and
                                          where.world_size > 1)
        # counted on the host before the model moves: once, on rank 0 (others wait in setup)
        self.macs = count_macs(model, _eval_input_size(cfg)) if self.main else 0

        self.dist: Dist = setup()
        self.format = memory_format(cfg, self.dist.device)
        # Parameters stay contiguous (DeepSpeed's broadcast views them as bytes, which a
        # channels_last weight refuses); channels_last inputs make cuDNN take NHWC kernels.
        model = model.to(self.dist.device)
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.engine.compile:
            model.compile()  # in place: parameter names and checkpoints stay as they are
        self.engine = build_engine(cfg, model, self.method, self.budget, self.dist.world_size)
        self.model = self.engine.module
        _seed(cfg.engine.seed + 7919 * (self.dist.rank + 1))  # per-rank streams from here on
        self.pos = self._resume()

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return build_model(cfg.model.name, self.num_classes, method=cfg.method.name,
                           **cfg.model.opts)

    # ----------------------------------------------------------------------------- resume
    def _resume(self) -> Position:
        point = self.resume_point
        if point is None:
            return Position()
        state = ckpt.load(self.engine, point.ckpt_dir, point.tag, self.dist.rank)
        log.info("resumed from %s (epoch %d, step %d of it)", point.path, state["epoch"],
                 state["step_in_epoch"])
        if point.changes and self.main:
            log.warning("resumed with config changes: %s", resume.describe(point.changes))
        self.saved_step = self.engine.global_steps
        if point.ckpt_dir.resolve() == self.ckpt_dir.resolve():
            self.last_tag = point.tag
        # an epoch made shorter (an allowed change) resumes at its end, not past it
        step_in_epoch = min(state["step_in_epoch"], self.micro_steps)
        return Position(state["epoch"], step_in_epoch, None if point.fork else state["run_id"])

    def _save(self) -> None:
        if self.saved_step == self.engine.global_steps:
            return
        average_buffers(self.model)
        tag = ckpt.tag_name(self.pos.epoch, self.engine.global_steps)
        state = {**vars(self.pos), "config": OmegaConf.to_container(self.cfg, resolve=True)}
        ckpt.save(self.engine, self.ckpt_dir, tag, state, self.dist.rank, self.dist.world_size,
                  self.cfg.checkpoint.keep_last, after=self.last_tag)
        self.last_tag = tag
        self.saved_step = self.engine.global_steps
        self.last_save = time.monotonic()

    # ----------------------------------------------------------------------------- train
    def _train(self) -> bool:
        """Train until the budget is spent; True when stopped on request (after a checkpoint)."""
        cfg, pos, budget = self.cfg, self.pos, self.budget
        accum, n = cfg.engine.grad_accum, self.micro_steps
        every_seconds = cfg.checkpoint.every_minutes * 60
        self.last_save = time.monotonic()
        progress = Progress(self.main, budget.total_steps, self.engine.global_steps,
                            budget.epochs, budget.steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        tick, self.data_wait = time.perf_counter(), 0.0
        self.engine.train()
        try:
            while True:
                if pos.step_in_epoch == n:
                    self._end_epoch()
                if budget.done(self.engine.global_steps):
                    return False
                epoch = self.train_data.epoch(pos.epoch, pos.step_in_epoch)
                for images, target in self._timed(epoch):
                    epoch_float = pos.epoch + pos.step_in_epoch / n
                    batch, self.extras = train_step(self.engine, self.model, self.task,
                                                    self.method, images, target, epoch_float,
                                                    self.format)
                    sums = accumulate(sums, batch)
                    pos.step_in_epoch += 1
                    if pos.step_in_epoch % accum:
                        continue
                    step = self.engine.global_steps
                    self.method.on_step_end(self.model, step)
                    progress.step()
                    epoch_end = pos.step_in_epoch == n
                    if step % cfg.engine.log_every == 0 or epoch_end or budget.done(step):
                        metrics = self._log_train(sums, time.perf_counter() - tick, step,
                                                  epoch_float)
                        progress.report(step, pos.epoch, pos.step_in_epoch // accum, metrics)
                        sums, tick = {}, time.perf_counter()
                    self.stop.hold(step, self.main)
                    if step % cfg.engine.sync_every == 0 or step == self.stop.hold_at:
                        stop, due = any_rank([self.stop.requested(), every_seconds > 0 and
                                              self.main and time.monotonic() - self.last_save
                                              > every_seconds], self.dist.device)
                        if stop:
                            self._save()
                            self.stop.consume_stop_file()
                            return True
                        if due and not epoch_end:
                            self._save()
                    if budget.eval_after_step(step):
                        self._evaluate()
                    if budget.save_after_step(step):
                        self._save()
                    if epoch_end or budget.done(step):
                        break
        finally:
            progress.close()

    def _end_epoch(self) -> None:
        pos = self.pos
        if self.budget.eval_after_epoch(pos.epoch):
            self._evaluate()
        edits = self.method.on_epoch_end(self.model, pos.epoch, self.budget.epochs,
                                         self.cfg.engine.seed)
        apply_edits(self.engine, self.method, edits)
        pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
        if self.budget.save_after_epoch:
            self._save()

    def _log_train(self, sums: dict, seconds: float, step: int, epoch_float: float) -> dict:
        """This log interval's train metrics, from one all-reduce: loss, task statistics, the
        method's loss terms (of the last step, averaged over ranks), and the share of the time
        the loop waited for its data (averaged over ranks; on a GPU it includes the wait for
        the device's queue to drain, which the next batch's hand-over forces)."""
        extras = {f"extra/{k}": v.detach() for k, v in self.extras.items()}  # apart from sums
        waited = torch.tensor(self.data_wait / max(seconds, 1e-9))
        total = all_reduce_sum({**sums, **extras, "data_wait": waited}, self.dist.device)
        world, count = self.dist.world_size, max(total["count"].item(), 1.0)
        metrics = {"train/loss": total["loss"].item() / count,
                   "train/lr": self.engine.get_lr()[0],
                   "train/images_per_s": total["count"].item() / max(seconds, 1e-9),
                   "train/data_wait_frac": total["data_wait"].item() / world,
                   "epoch": epoch_float}
        metrics.update({f"train/{k}": v for k, v in self.task.train_summary(total).items()})
        metrics.update({f"train/{k}": total[f"extra/{k}"].item() / world for k in self.extras})
        if self.dist.device.type == "cuda":
            metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        self.data_wait = 0.0
        self.tracker.log_metrics(metrics, step)
        return metrics

    def _timed(self, batches):
        """``batches``, adding the time spent waiting for each one to ``self.data_wait``."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.data_wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    # ----------------------------------------------------------------------------- evaluate
    def _evaluate(self) -> dict[str, float]:
        average_buffers(self.model)
        result = evaluate(self.model, self.val_data, self.task, self.dist.device,
                          eval_meters(self.cfg, self.method, self.model), self.autocast,
                          self.format)
        step = self.engine.global_steps
        metrics = {f"val/{k}": v for k, v in result.items()}
        metrics.update({f"method/{k}": v for k, v in self.method.metrics(self.model).items()})
        self.skipped_at_decode = len(union_over_ranks(self.train_data.skipped_at_decode |
                                                      self.val_data.skipped_at_decode))
        metrics["data/skipped_at_decode"] = self.skipped_at_decode
        self.tracker.log_metrics(metrics, step)
        if self.main:
            for name, text in self.task.artifacts(result).items():
                (self.run_dir / name).write_text(text)
                self.tracker.log_artifact(self.run_dir / name)
            log.info("epoch %d/%d  step %d  %s", min(self.pos.epoch + 1, self.budget.epochs),
                     self.budget.epochs, step, self.task.log_line(result))
        self.result, self.result_step = result, step
        return result

    # ----------------------------------------------------------------------------- run
    def _start_tracking(self) -> None:
        cfg = self.cfg
        self.tracker = open_tracker(cfg.tracking.enabled and self.main, cfg.tracking.experiment,
                                    cfg.tracking.run_name or cfg.name, self.pos.run_id,
                                    spool_dir=self.run_dir)
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if self.pos.run_id is None:  # a new run: params once
            self.tracker.log_params(flatten(cfg))
            self.tracker.log_params({"data.train_batches_per_rank": len(self.train_data),
                                     "data.skipped_files": len(self.train_data.skipped) +
                                     len(self.val_data.skipped),
                                     "model.params": count_params(self.model)[0],
                                     "model.macs": self.macs})
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.set_tags({**run_tags(self.dist.world_size), **cfg.tracking.tags,
                               "method": cfg.method.name, "model": cfg.model.name})
        self.pos.run_id = self.tracker.run_id

    def _final_record(self, result: dict[str, float], final: Path) -> dict:
        record = {"event": "final", **{f"val_{k}": result[k] for k in self.task.final_keys}}
        if self.budget.by_iterations:
            record["iterations"] = self.engine.global_steps
        else:
            record["epochs"] = self.pos.epoch
        record.update(run_id=self.tracker.run_id, checkpoint=str(final.resolve()))
        record.update({k: result[k] for k in self.method.final_keys if k in result})
        if self.cfg.data.on_corrupt == "skip":
            record["skipped_at_decode"] = self.skipped_at_decode
        return record

    def _finish(self) -> dict:
        """Final evaluation, checkpoint, weights and exported model (rank 0, as files and
        MLflow artifacts); returns the final record."""
        if self.result_step != self.engine.global_steps:
            self._evaluate()
        self._save()
        final = self.run_dir / "final.pt"
        record = self._final_record(self.result, final)
        if self.main:
            trained = self._build_model()  # a plain copy, free of DeepSpeed's hooks
            trained.load_state_dict(self.model.state_dict())
            export_params = write_final(self.run_dir, trained, self.method, self.cfg,
                                        self.train_data.classes)
            (self.run_dir / FINAL_RECORD).write_text(json.dumps(record) + "\n")
            self.tracker.log_metrics({"export/params": export_params},
                                     self.engine.global_steps)
            self.tracker.log_artifact(final, "checkpoint")
        return record

    def _finished_record(self) -> dict | None:
        """The final record of a resumed run that already finished this budget (a repeated
        command): it is reported again, and its MLflow run is not re-opened. A longer budget
        (an extension, see resume.py) trains on."""
        path = self.run_dir / FINAL_RECORD
        if self.resume_point is None or not path.is_file():
            return None
        record = json.loads(path.read_text())
        if self.budget.by_iterations:
            done = record.get("iterations", -1) >= self.budget.total_steps
        else:
            done = record.get("epochs", -1) >= self.budget.epochs
        return record if done else None

    def execute(self) -> int:
        status, tags = "FAILED", {}
        try:
            done = self._finished_record()
            if done is not None:
                if self.main:
                    log.info("%s already finished; its final record:", self.run_dir)
                    print(json.dumps(done), flush=True)
                return 0
            self._start_tracking()
            if self.main and self.resume_point:
                resume.record(self.resume_point, self.tracker, self.run_dir,
                              self.engine.global_steps)
            if self._train():
                # the vote may carry another rank's request: then the reason is not known here
                status, tags["stop_reason"] = "KILLED", self.stop.reason or "signal"
                log.warning("stopped on request (%s) after a checkpoint; run again to resume",
                            tags["stop_reason"])
                return EXIT_RESUMABLE
            record = self._finish()
            status = "FINISHED"
            if self.main:
                print(json.dumps(record), flush=True)
            return 0
        except KeyboardInterrupt:
            status, tags["stop_reason"] = "KILLED", "interrupted"
            raise
        except BaseException as err:
            tags["error"] = _one_line(err)
            raise
        finally:
            if tags:
                self.tracker.set_tags(tags)
            self.tracker.close(status)
            teardown()
            self.held.close()
            self.stop.close()


def train(cfg: DictConfig) -> int:
    return Run(cfg).execute()
