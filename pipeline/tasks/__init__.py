"""Tasks: what the training loop needs to know of classification vs segmentation.

``build_task(cfg, classes)`` returns the task of ``cfg.task`` (see ``base.Task``); the engine
talks to it and never branches on the task itself. Tasks know nothing of the engine, methods
or data files.
"""
from __future__ import annotations

from .base import Meter, Task
from .classification import Classification
from .segmentation import Segmentation


def build_task(cfg, classes: list[str]) -> Task:
    """The task of a config (``cfg.task`` and its options) over ``classes``."""
    if cfg.task == "segmentation":
        s = cfg.segmentation
        return Segmentation(classes, aux_weight=s.aux_weight, val_mode=s.val_mode,
                            crop=tuple(s.crop), stride=tuple(s.stride))
    return Classification(len(classes), label_smoothing=cfg.engine.label_smoothing)


__all__ = ["Classification", "Meter", "Segmentation", "Task", "build_task"]
