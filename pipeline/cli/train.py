"""``pipeline train CONFIG [key=value …]``: train one config."""
from __future__ import annotations


def run(args) -> int:
    from pipeline.config import load_config
    from pipeline.engine import train

    return train(load_config(args.config, args.overrides))


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a config (key=value overrides)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)
