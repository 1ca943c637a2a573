"""``pipeline data KIND …``: write an embedded dataset (and, per kind, work on dataset trees).

Each kind is a sub-command registered in ``add_parser``; it prints one JSON line.
"""
from __future__ import annotations

import json
from pathlib import Path


def run_digits(args) -> int:
    from pipeline.data.digits import write_digits

    counts = write_digits(Path(args.out))
    print(json.dumps({"event": "data", "dataset": "digits", "out": args.out, **counts}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="write an embedded dataset")
    kinds = p.add_subparsers(dest="dataset", required=True)

    k = kinds.add_parser("digits", help="scikit-learn's digits as an ImageNet-layout JPEG tree")
    k.add_argument("--out", required=True)
    k.set_defaults(func=run_digits)
