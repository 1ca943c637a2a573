"""``pipeline eval CONFIG CHECKPOINT [key=value …]``: validation metrics of saved weights."""
from __future__ import annotations

import json
from pathlib import Path


def run(args) -> int:
    from pipeline.config import load_config
    from pipeline.engine import evaluate_checkpoint

    result = evaluate_checkpoint(load_config(args.config, args.overrides), Path(args.checkpoint))
    if result is not None:
        print(json.dumps({"event": "eval", **result}), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("config")
    p.add_argument("checkpoint", help="final.pt, or a checkpoint directory / tag directory")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)
