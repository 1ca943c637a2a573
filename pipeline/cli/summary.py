"""``pipeline summary --model NAME [--method M] [--input-size N|HxW] …``: parameters and MACs of
a model (MACs of one image of N×N, or H×W: height × width, e.g. 1024x2048 for Cityscapes)."""
from __future__ import annotations

import json
import re

from pipeline.errors import InputError

from .options import parse_opts


def parse_input_size(text: str) -> int | tuple[int, int]:
    """``"224"`` → 224; ``"1024x2048"`` → (1024, 2048) (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", text)
    if not match or int(match[1]) < 1 or (match[2] and int(match[2]) < 1):
        raise InputError(f"--input-size {text!r}: expected N or HxW (height x width) with "
                         f"positive integers, e.g. 224 or 1024x2048")
    return int(match[1]) if match[2] is None else (int(match[1]), int(match[2]))


def _baseline(name: str, num_classes: int, opts: dict):
    """The baseline with the variant's options where it takes them all (e.g. a segmentation
    head's width), else with none (they include the method's own)."""
    import torch

    from pipeline.models import build_model

    with torch.device("meta"):  # only its parameter count is read
        try:
            return build_model(name, num_classes, **opts), opts
        except InputError:  # an option of the method's only
            return build_model(name, num_classes), {}


def run(args) -> int:
    from pipeline.models import build_model
    from pipeline.models.summary import count_params, summarize

    opts = parse_opts(args.opt)
    input_size = parse_input_size(args.input_size)
    if args.num_classes < 1:
        raise InputError(f"--num-classes {args.num_classes}: expected an integer >= 1")
    model = build_model(args.model, args.num_classes, method=args.method, **opts)
    record = summarize(model, input_size)
    if args.method and args.method != "baseline":
        baseline, baseline_opts = _baseline(args.model, args.num_classes, opts)
        params = count_params(baseline)[0]
        record.update(baseline_params=params, baseline_opts=baseline_opts,
                      reduction=round(params / max(record["params"], 1), 4))
    if args.json:
        print(json.dumps({"event": "summary", **record}))
    else:
        for key, value in record.items():
            print(f"{key:>18}: {value:,}" if isinstance(value, int) else f"{key:>18}: {value}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("summary", help="parameters and MACs of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--method", default=None)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", default="224", metavar="N|HxW",
                   help="image size: N (square) or height x width, e.g. 1024x2048")
    p.add_argument("--opt", action="append", default=[], metavar="key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
