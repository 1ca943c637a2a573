"""The runs a report covers, read from the tracking store into one flat record each.

What a training run logs (pipeline/engine/trainer.py) and where each field comes from:
params: the flattened config (``model.name``, ``method.name``, ``task``, ``data.root``,
``data.layout``, ``schedule.epochs``, ``schedule.iterations``), ``model.params`` and
``model.macs`` (static MACs at the evaluation input size); metrics: ``val/top1``,
``val/top5``, ``val/miou``, ``val/pixel_acc`` (their last values, the final evaluation),
``val/dynamic_macs`` (gated runs, per image), ``train/images_per_s`` (the median over the run);
tags: ``git_commit``. Older runs have no ``task`` (classification) and no ``model.macs``: those
are counted here by building the model from the run's params (classification only).
"""
from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from functools import lru_cache

from omegaconf import OmegaConf

from pipeline.errors import InputError
from pipeline.tracking import KIND_TAG

from .catalogue import dataset_name

log = logging.getLogger("pipeline.report")

REPORT_KIND = "report"   # the KIND_TAG value of the runs `pipeline report` logs
FINISHED = "FINISHED"


@dataclass
class RunRecord:
    run_id: str
    run: str
    experiment: str
    status: str
    task: str = "classification"
    model: str = ""
    method: str = ""
    dataset: str = ""
    params: int | None = None
    macs: int | None = None
    dynamic_macs: float | None = None
    top1: float | None = None
    top5: float | None = None
    miou: float | None = None
    pixel_acc: float | None = None
    epochs: int | None = None
    iterations: int | None = None
    images_per_s: float | None = None
    wall_time_s: float | None = None
    git_commit: str = ""
    start_time_ms: int = 0
    reason: str = ""          # why a run did not finish (its stop_reason or error tag)

    @property
    def accuracy(self) -> float | None:
        """The headline metric of the run's task."""
        return self.miou if self.task == "segmentation" else self.top1


def parse_tags(items: list[str]) -> dict[str, str]:
    """``["sweep=12", "k=v"]`` → ``{"sweep": "12", "k": "v"}``."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--tag {item!r} is not of the form key=value")
        if "'" in value or "`" in key:
            raise InputError(f"--tag {item!r}: quotes are not supported in tag filters")
        tags[key] = value
    return tags


def _experiments(client, name: str | None) -> dict[str, str]:
    """experiment id → name: the one named, or every active experiment."""
    if name is None:
        return {e.experiment_id: e.name for e in client.search_experiments()}
    found = client.get_experiment_by_name(name)
    if found is None:
        known = sorted(e.name for e in client.search_experiments())
        raise InputError(f"no MLflow experiment named {name!r} at {client.tracking_uri} "
                         f"(experiments: {known})")
    return {found.experiment_id: found.name}


def _search(client, experiment_ids: list[str], tags: dict[str, str]) -> list:
    """Every training run of the experiments with all of ``tags`` (tool runs such as reports and
    registered exports left out), oldest first."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += [r for r in page if KIND_TAG not in r.data.tags]
        token = page.token
        if not token:
            break
    return runs


def _number(value: str | float | None, kind=float):
    if value is None or value == "":
        return None
    try:
        return kind(float(value))
    except ValueError:
        return None


@lru_cache(maxsize=64)
def _counted_macs(model: str, method: str, num_classes: int, image_size: int,
                  opts: tuple[tuple[str, str], ...]) -> int | None:
    from pipeline.models import build_model
    from pipeline.models.summary import count_macs

    typed = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in opts]))
    try:
        return count_macs(build_model(model, num_classes, method=method, **typed), image_size)
    except ValueError as err:  # a model or option this version no longer has
        log.warning("cannot count the MACs of %s/%s: %s", model, method, err)
        return None


def _static_macs(params: dict[str, str], metrics: dict[str, float]) -> int | None:
    """``model.macs``; for an older classification run, counted from its params."""
    logged = _number(params.get("model.macs"), int)
    if logged is not None:
        return logged
    num_classes = _number(params.get("model.num_classes"), int)
    size = _number(params.get("data.image_size"), int)
    if params.get("task", "classification") == "classification" and num_classes and size \
            and "model.name" in params:
        prefix = "model.opts."
        opts = tuple(sorted((k[len(prefix):], v) for k, v in params.items()
                            if k.startswith(prefix)))
        counted = _counted_macs(params["model.name"], params.get("method.name", "baseline"),
                                num_classes, size, opts)
        if counted is not None:
            return counted
    return _number(metrics.get("val/macs"), int)


def _median_history(client, run_id: str, key: str) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, key)]
    return statistics.median(values) if values else None


def record(client, run, experiment: str) -> RunRecord:
    """One run as a flat record (the median images/s costs one history request)."""
    info, params, metrics, tags = run.info, run.data.params, run.data.metrics, run.data.tags
    task = params.get("task", "classification")
    out = RunRecord(run_id=info.run_id, run=info.run_name or info.run_id, experiment=experiment,
                    status=info.status, task=task, model=params.get("model.name", ""),
                    method=params.get("method.name", ""), git_commit=tags.get("git_commit", ""),
                    start_time_ms=info.start_time or 0,
                    reason=tags.get("stop_reason") or tags.get("error", ""))
    if "data.root" in params or "data.layout" in params:
        out.dataset = dataset_name(task, params.get("data.root", ""),
                                   params.get("data.layout", ""))
    out.params = _number(params.get("model.params"), int)
    out.dynamic_macs = metrics.get("val/dynamic_macs")
    out.top1, out.top5 = metrics.get("val/top1"), metrics.get("val/top5")
    out.miou, out.pixel_acc = metrics.get("val/miou"), metrics.get("val/pixel_acc")
    iterations = _number(params.get("schedule.iterations"), int)
    if iterations:
        out.iterations = iterations
    else:
        out.epochs = _number(params.get("schedule.epochs"), int)
    if info.status == FINISHED:
        out.macs = _static_macs(params, metrics)
        out.images_per_s = _median_history(client, info.run_id, "train/images_per_s")
        if info.end_time and info.start_time:
            out.wall_time_s = (info.end_time - info.start_time) / 1000.0
    return out


def read_runs(client, experiment: str | None = None,
              tags: dict[str, str] | None = None) -> list[RunRecord]:
    """The matching runs of the store (finished or not), oldest first."""
    names = _experiments(client, experiment)
    return [record(client, run, names[run.info.experiment_id])
            for run in _search(client, list(names), tags or {})]
