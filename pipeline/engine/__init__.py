"""The DeepSpeed training loop, checkpoints and distributed metrics."""
from .evaluate import evaluate_checkpoint
from .trainer import EXIT_RESUMABLE, train

__all__ = ["EXIT_RESUMABLE", "evaluate_checkpoint", "train"]
