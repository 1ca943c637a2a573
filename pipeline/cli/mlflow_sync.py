"""``pipeline mlflow-sync DIR``: deliver MLflow records spooled while the server was away."""
from __future__ import annotations

import json


def run(args) -> int:
    from pipeline.tracking import sync_spool

    print(json.dumps({"event": "mlflow-sync", "dir": args.dir, **sync_spool(args.dir)}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("mlflow-sync", help="deliver MLflow records kept while the tracking "
                       "server was unreachable")
    p.add_argument("dir", help="a spool file, or a directory searched for mlflow-pending-*.jsonl")
    p.set_defaults(func=run)
