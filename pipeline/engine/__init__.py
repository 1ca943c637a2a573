"""The DeepSpeed training loop, checkpoints and distributed metrics."""
from .trainer import EXIT_RESUMABLE, evaluate_checkpoint, train

__all__ = ["EXIT_RESUMABLE", "evaluate_checkpoint", "train"]
