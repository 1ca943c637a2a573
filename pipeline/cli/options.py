"""Parsing shared by several commands."""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.errors import InputError


def parse_opts(items: list[str]) -> dict:
    """``["slice=12", "binary=true"]`` → ``{"slice": 12, "binary": True}`` (YAML scalars)."""
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--opt {item!r} is not of the form key=value")
        opts[key] = OmegaConf.from_dotlist([f"v={value}"]).v
    return opts


def paths_and_overrides(items: list[str]) -> tuple[str | None, str, list[str]]:
    """``[CONFIG] CHECKPOINT [key=value …]`` → (CONFIG or None, CHECKPOINT, overrides)."""
    split = next((i for i, item in enumerate(items) if "=" in item), len(items))
    paths, overrides = items[:split], items[split:]
    if len(paths) not in (1, 2):
        raise InputError(f"expected [CONFIG] CHECKPOINT [key=value …], got {len(paths)} paths "
                         f"before the overrides: {paths}")
    return (paths[0] if len(paths) == 2 else None), paths[-1], overrides


def add_checkpoint_args(parser, help: str) -> None:
    """The ``[CONFIG] CHECKPOINT [key=value …]`` arguments of the commands that load a saved
    model (eval, export, predict): ``paths_and_overrides(args.args)`` splits them."""
    parser.add_argument("args", nargs="+", metavar="[CONFIG] CHECKPOINT [key=value …]", help=help)
