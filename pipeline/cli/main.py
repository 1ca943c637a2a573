"""``pipeline`` command line: train, eval, data, summary.

Every user error (config, data, model option) ends the process with one line on stderr naming
the problem and exit code 2; a run stopped on request after its checkpoint exits with 75.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf


def _parse_opts(items: list[str]) -> dict:
    """``["slice=12", "binary=true"]`` → ``{"slice": 12, "binary": True}`` (YAML scalars)."""
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt {item!r} is not of the form key=value")
        opts[key] = OmegaConf.from_dotlist([f"v={value}"]).v
    return opts


def cmd_train(args) -> int:
    from pipeline.config import load_config
    from pipeline.engine import train

    return train(load_config(args.config, args.overrides))


def cmd_eval(args) -> int:
    from pipeline.config import load_config
    from pipeline.engine import evaluate_checkpoint

    result = evaluate_checkpoint(load_config(args.config, args.overrides), Path(args.checkpoint))
    if result is not None:
        print(json.dumps({"event": "eval", **result}), flush=True)
    return 0


def cmd_data(args) -> int:
    from pipeline.data.digits import write_digits

    counts = write_digits(Path(args.out))
    print(json.dumps({"event": "data", "dataset": "digits", "out": args.out, **counts}))
    return 0


def cmd_mlflow_sync(args) -> int:
    from pipeline.tracking import sync_spool

    print(json.dumps({"event": "mlflow-sync", "dir": args.dir, **sync_spool(args.dir)}))
    return 0


def cmd_summary(args) -> int:
    from pipeline.models import build_model
    from pipeline.models.summary import count_params, summarize

    opts = _parse_opts(args.opt)
    model = build_model(args.model, args.num_classes, method=args.method, **opts)
    record = summarize(model, args.input_size)
    if args.method and args.method != "baseline":
        baseline = count_params(build_model(args.model, args.num_classes))[0]
        record.update(baseline_params=baseline,
                      reduction=round(baseline / max(record["params"], 1), 4))
    if args.json:
        print(json.dumps(record))
    else:
        for key, value in record.items():
            print(f"{key:>18}: {value:,}" if isinstance(value, int) else f"{key:>18}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config (key=value overrides)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("config")
    p.add_argument("checkpoint", help="final.pt, or a checkpoint directory / tag directory")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="write an embedded dataset")
    p.add_argument("dataset", choices=["digits"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("mlflow-sync", help="deliver MLflow records kept while the tracking "
                       "server was unreachable")
    p.add_argument("dir", help="a spool file, or a directory searched for mlflow-pending-*.jsonl")
    p.set_defaults(func=cmd_mlflow_sync)

    p = sub.add_parser("summary", help="parameters and MACs of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--method", default=None)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--opt", action="append", default=[], metavar="key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pipeline {args.command}: error: {message}", file=sys.stderr)
        return 2
