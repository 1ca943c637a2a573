"""``pipeline`` command line. One module per command (``pipeline/cli/<command>.py``), each with
``add_parser(subparsers)`` that registers it and sets ``func``; ``COMMANDS`` lists them.

Exit codes: 0 done; 2 bad input (``pipeline.errors.InputError``: a config key or value, the
dataset, an option, a path that does not exist), one line on stderr naming it; 75 a run stopped
on request after its checkpoint (resumable); 1 anything else, with its traceback (a full disk, a
broken invariant, an unreachable tracking server are not the user's typo).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib import import_module

from pipeline.errors import InputError

# The command modules, in the order `pipeline --help` lists them.
COMMANDS = ["train", "evaluate", "predict", "export", "data", "summary", "mlflow_sync", "report",
            "importer"]


class _Version(argparse.Action):
    """``--version``: the package version and the git commit of this checkout, then exit."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and git commit")

    def __call__(self, parser, namespace, values, option_string=None):
        from pipeline import __version__
        from pipeline.tracking import run_tags

        print(f"pipeline {__version__} (git commit {run_tags(1)['git_commit']})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        import_module(f"{__package__}.{name}").add_parser(sub)
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
    except InputError as err:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pipeline {args.command}: error: {message}", file=sys.stderr)
        return 2
