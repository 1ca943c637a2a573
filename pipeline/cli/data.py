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

    k = kinds.add_parser("cityscapes-synth",
                         help="generated street scenes in the exact Cityscapes layout")
    k.add_argument("--out", required=True)
    k.add_argument("--size", help="image size WxH (default 256x128)")
    k.add_argument("--count", type=int, help="training images (default 160); val gets "
                   "count // 5, test count // 10")
    k.set_defaults(func=run_cityscapes_synth)


def run_cityscapes_synth(args) -> int:
    from pipeline.data.segmentation.synth import write_cityscapes_synth

    options = {} if args.count is None else {"count": args.count}
    if args.size is not None:
        try:
            options["size"] = tuple(int(v) for v in args.size.lower().split("x", 1))
        except ValueError:
            raise ValueError(f"--size must be WxH (e.g. 256x128), got {args.size!r}") from None
    counts = write_cityscapes_synth(Path(args.out), **options)
    print(json.dumps({"event": "data", "dataset": "cityscapes-synth", "out": args.out, **counts}))
    return 0
