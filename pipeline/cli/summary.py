"""``pipeline summary --model NAME [--method M] …``: parameters and MACs of a model."""
from __future__ import annotations

import json

from .options import parse_opts


def run(args) -> int:
    from pipeline.models import build_model
    from pipeline.models.summary import count_params, summarize

    opts = parse_opts(args.opt)
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


def add_parser(sub) -> None:
    p = sub.add_parser("summary", help="parameters and MACs of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--method", default=None)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--opt", action="append", default=[], metavar="key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
