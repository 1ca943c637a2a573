"""``pipeline report``: the finished runs of the tracking store as a paper-style report.

    runs.py ───────┬─ table.py: results.csv, results.md (a table per task; unfinished apart)
    catalogue.py ──┼─ plots.py: <metric>_vs_<macs|params>.png, the papers' points overlaid
                   └─ page.py:  report.html (tables and plots in one self-contained page)

The same files are logged as the artifacts of a run named ``report``, tagged
``pipeline.kind=report`` so that no report ever counts it (or any other report) as a training
run. Runs still going, failed or stopped are listed apart from the results, never mixed in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .catalogue import Catalogue, PaperPoint, load_catalogue, resolve
from .page import html, markdown
from .plots import METRIC, plot
from .runs import FINISHED, KIND_TAG, REPORT_KIND, RunRecord, parse_tags, read_runs
from .table import write_csv

__all__ = ["KIND_TAG", "REPORT_EXPERIMENT", "REPORT_KIND", "Report", "build_report",
           "default_out_dir", "load_catalogue", "log_report", "parse_tags", "read_runs"]

REPORT_EXPERIMENT = "reports"   # where a report over several experiments is logged
FILES = {"csv": "results.csv", "unfinished_csv": "unfinished.csv", "markdown": "results.md",
         "html": "report.html"}


@dataclass
class Report:
    out: Path
    finished: list[RunRecord]
    unfinished: list[RunRecord]
    files: list[Path] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None


def build_report(runs: list[RunRecord], catalogue: Catalogue, out: Path,
                 summary: str) -> Report:
    """Write the table, plots and page of ``runs`` into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, [r for r in runs if r.status == FINISHED],
                    [r for r in runs if r.status != FINISHED])
    tasks_datasets = {(r.task, r.dataset) for r in report.finished}
    points = [p for p in (resolve(e) for e in catalogue.entries if e.reported)
              if (p.task, p.dataset) in tasks_datasets]
    drawn: list[PaperPoint] = []
    for task in METRIC:
        for x_key in ("macs", "params"):
            name = f"{METRIC[task][0]}_vs_{x_key}"
            shown = plot(report.finished, points, task, x_key, out / f"{name}.png")
            if shown is not None:
                report.plots[name] = out / f"{name}.png"
                drawn += [p for p in shown if p not in drawn]
    write_csv(out / FILES["csv"], report.finished)
    write_csv(out / FILES["unfinished_csv"], report.unfinished)
    (out / FILES["markdown"]).write_text(markdown(summary, report.finished, report.unfinished,
                                                  report.plots, drawn, catalogue))
    (out / FILES["html"]).write_text(html(summary, report.finished, report.unfinished,
                                          report.plots, drawn, catalogue))
    report.files = [out / f for f in FILES.values()] + list(report.plots.values())
    return report


def log_report(client, report: Report, experiment: str | None, filters: str) -> str:
    """Log the report's files as the artifacts of a new ``report`` run; its id."""
    from mlflow.entities import RunTag

    name = experiment or REPORT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name="report",
                            tags={KIND_TAG: REPORT_KIND, "report.filter": filters})
    client.log_batch(run.info.run_id, tags=[
        RunTag("report.finished_runs", str(len(report.finished))),
        RunTag("report.unfinished_runs", str(len(report.unfinished)))])
    for path in report.files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, FINISHED)
    return run.info.run_id


def default_out_dir() -> Path:
    return Path("reports") / time.strftime("report-%Y%m%d-%H%M%S")

