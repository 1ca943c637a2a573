"""``pipeline predict [CONFIG] CHECKPOINT [key=value …] --split val|test --out DIR``:
full-resolution Cityscapes predictions in the official format (label-id PNGs)."""
from __future__ import annotations

import json
from pathlib import Path

from .options import add_checkpoint_args, paths_and_overrides


def run(args) -> int:
    from pipeline.engine.artifacts import load_saved
    from pipeline.engine.predict import predict

    config, path, overrides = paths_and_overrides(args.args)
    saved = load_saved(path, config, overrides)
    written = predict(saved.model, saved.config, args.split, Path(args.out))
    print(json.dumps({"event": "predict", "split": args.split, "out": args.out,
                      "images": written}), flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="write Cityscapes predictions (label-id PNGs, the official "
                                       "evaluation's and benchmark server's format)")
    add_checkpoint_args(p, "CHECKPOINT: final.pt, exported.pt or a DeepSpeed checkpoint "
                           "directory; without CONFIG the config saved with it")
    p.add_argument("--split", default="val", help="val (default), test or train")
    p.add_argument("--out", required=True, help="the results folder (created if missing)")
    p.set_defaults(func=run)
