"""What a finished run leaves for inference: ``final.pt`` (the trained weights and the resolved
config) and ``exported.pt`` (the method's plain inference form of the model)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.methods import Method
from pipeline.models.summary import count_params


def write_final(run_dir: Path, trained: nn.Module, method: Method, cfg: DictConfig) -> int:
    """Write ``final.pt`` and ``exported.pt`` of ``trained`` (a plain model, free of the
    engine's wrappers) into ``run_dir``; returns the exported model's parameter count."""
    torch.save({"model": trained.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, run_dir / "final.pt")
    exported = method.export(trained.eval())
    torch.save(exported, run_dir / "exported.pt")
    return count_params(exported)[0]
