"""``pipeline report [--experiment NAME] [--tag k=v …] [--out DIR]``: the finished runs of the
tracking store as a results table (Markdown, CSV), accuracy-vs-compute plots with the papers'
points, and one HTML page; also logged to MLflow as a ``report`` run. stdout carries only the
JSON line; what it says besides goes to stderr."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _missing_store(uri: str) -> Path | None:
    """The file of a local SQLite store that does not exist yet (reading must not create it)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        return None if path.exists() else path
    return None


def run(args) -> int:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.report import (build_report, default_out_dir, log_report,
                                          parse_tags, read_runs)
    from pipeline.tracking.report.catalogue import DEFAULT_CATALOGUE, Catalogue, load_catalogue

    tags = parse_tags(args.tag)
    if args.catalogue or DEFAULT_CATALOGUE.is_file():
        catalogue = load_catalogue(args.catalogue or DEFAULT_CATALOGUE)
    else:  # an installed package without the repository's configs/
        print(f"no experiment catalogue at {DEFAULT_CATALOGUE}: plots without paper points "
              "(--catalogue FILE to add them)", file=sys.stderr)
        catalogue = Catalogue(DEFAULT_CATALOGUE, {}, [])
    uri = mlflow.get_tracking_uri()
    filters = " ".join([f"experiment={args.experiment}" if args.experiment else "",
                        *(f"{k}={v}" for k, v in tags.items())]).strip() or "all runs"
    if _missing_store(uri):
        print(f"no runs: there is no tracking store at {uri} (run `pipeline report` where "
              "`pipeline train` ran, or set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 0
    client = MlflowClient(uri)
    runs = read_runs(client, args.experiment, tags)
    if not runs:
        print(f"no runs match ({filters}) in {uri}: nothing to report", file=sys.stderr)
        return 0
    out = Path(args.out) if args.out else default_out_dir()
    summary = f"{len(runs)} runs ({filters}) from {uri}"
    report = build_report(runs, catalogue, out, summary)
    report.run_id = log_report(client, report, args.experiment, filters)
    print(f"{len(report.finished)} finished runs in the results, {len(report.unfinished)} "
          f"not finished listed apart", file=sys.stderr)
    for path in report.files:
        print(f"  {path}", file=sys.stderr)
    print(json.dumps({"event": "report", "out": str(out.resolve()),
                      "finished": len(report.finished), "unfinished": len(report.unfinished),
                      "plots": sorted(report.plots), "run_id": report.run_id}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="results table, plots and HTML page of the tracked runs")
    p.add_argument("--experiment", default=None, help="only this MLflow experiment")
    p.add_argument("--tag", action="append", default=[], metavar="key=value",
                   help="only runs with this tag (repeatable: all must match)")
    p.add_argument("--out", default=None,
                   help="output directory (default: reports/report-<date>-<time>)")
    p.add_argument("--catalogue", default=None,
                   help="experiment catalogue (default: configs/experiments.yaml)")
    p.set_defaults(func=run)
