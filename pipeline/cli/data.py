"""``pipeline data KIND …``: write an embedded dataset (and, per kind, work on dataset trees).

Each kind is a sub-command registered in ``add_parser``; it prints one JSON line.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError


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
    k.add_argument("--size", help="image size WxH (default 384x192)")
    k.add_argument("--count", type=int, help="training images (default 80); val gets "
                   "count // 5, test count // 10")
    k.set_defaults(func=run_cityscapes_synth)

    k = kinds.add_parser("index", help="list an ImageNet-layout tree once into its scan index "
                         "(OUT/data-index.npz), reused by every start while the tree is unchanged")
    k.add_argument("root")
    k.add_argument("--out", help="folder of the index (default: ROOT; a run directory also works)")
    k.add_argument("--rebuild", action="store_true", help="re-check every file")
    k.set_defaults(func=run_index)

    k = kinds.add_parser("check", help="decode every file of an ImageNet-layout tree in "
                         "parallel; exit 2 if any is corrupt")
    k.add_argument("root")
    k.add_argument("--workers", type=int, help="decoding threads (default: all CPUs)")
    k.set_defaults(func=run_check)


def run_index(args) -> int:
    from pipeline.data.index import index_tree

    summary = index_tree(args.root, args.out, rebuild=args.rebuild)
    print(json.dumps({"event": "data", "dataset": "index", **summary}))
    return 0


def run_check(args) -> int:
    from pipeline.data.index import check_tree

    summary = check_tree(args.root, args.workers)
    print(json.dumps({"event": "data", "dataset": "check", **summary}))
    return 2 if summary["corrupt"] else 0


def run_cityscapes_synth(args) -> int:
    from pipeline.data.segmentation.synth import write_cityscapes_synth

    options = {} if args.count is None else {"count": args.count}
    if args.size is not None:
        try:
            options["size"] = tuple(int(v) for v in args.size.lower().split("x", 1))
        except ValueError:
            raise InputError(f"--size must be WxH (e.g. 384x192), got {args.size!r}") from None
    counts = write_cityscapes_synth(Path(args.out), **options)
    print(json.dumps({"event": "data", "dataset": "cityscapes-synth", "out": args.out, **counts}))
    return 0
