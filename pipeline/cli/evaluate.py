"""``pipeline eval [CONFIG] CHECKPOINT [key=value …]``: validation metrics of saved weights.

CHECKPOINT: final.pt, exported.pt, a converted final.pt (``pipeline import``) or a DeepSpeed
checkpoint / tag directory. Without CONFIG the config saved with the checkpoint is used (a
DeepSpeed directory: the run's config.yaml); overrides apply on top. Only the val split is read.
"""
from __future__ import annotations

import json

from .options import add_checkpoint_args, paths_and_overrides


def run(args) -> int:
    from pipeline.engine import evaluate_checkpoint
    from pipeline.engine.artifacts import checkpoint_config, read_checkpoint

    config, path, overrides = paths_and_overrides(args.args)
    checkpoint = read_checkpoint(path)
    result = evaluate_checkpoint(checkpoint_config(checkpoint, config, overrides), checkpoint)
    if result is not None:
        print(json.dumps({"event": "eval", **result}), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation set (the config "
                                    "saved with it unless CONFIG is given)")
    add_checkpoint_args(p, "CHECKPOINT: final.pt, exported.pt, a converted final.pt or a "
                           "DeepSpeed checkpoint / tag directory")
    p.set_defaults(func=run)
