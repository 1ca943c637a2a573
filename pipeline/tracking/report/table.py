"""The results table: every value of a run record as CSV (raw numbers, for scripts) and as
Markdown / HTML cells (accuracies in percent, counts with SI prefixes), one table per task."""
from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from .runs import RunRecord

TASKS = ("classification", "segmentation")


def si(value: float | None) -> str:
    """``269722`` → ``270K``, ``40551040`` → ``40.6M``: three significant digits."""
    if value is None:
        return ""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1, "")):
        if abs(value) >= 0.9995 * factor or factor == 1:  # 999,960 rounds to 1M, not 1e+03K
            return f"{value / factor:.3g}{prefix}"


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def plain(value) -> str:
    return "" if value is None else str(value)


def started(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else ""


@dataclass(frozen=True)
class Column:
    key: str                       # a RunRecord field
    header: str
    fmt: Callable = plain
    numeric: bool = False          # right-aligned
    tasks: tuple[str, ...] = TASKS
    optional: bool = False         # shown only when some run has a value


RESULT_COLUMNS = [
    Column("run", "run"),
    Column("model", "model"),
    Column("method", "method"),
    Column("dataset", "dataset"),
    Column("params", "params", si, True),
    Column("macs", "MACs", si, True),
    Column("dynamic_macs", "dynamic MACs", si, True, optional=True),
    Column("top1", "top-1 %", percent, True, ("classification",)),
    Column("top5", "top-5 %", percent, True, ("classification",)),
    Column("miou", "mIoU %", percent, True, ("segmentation",)),
    Column("pixel_acc", "pixel acc. %", percent, True, ("segmentation",)),
    Column("epochs", "epochs", numeric=True, optional=True),
    Column("iterations", "iterations", numeric=True, optional=True),
    Column("images_per_s", "images/s", lambda v: "" if v is None else f"{v:.1f}", True),
    Column("wall_time_s", "wall time", duration, True),
    Column("git_commit", "commit", lambda v: (v or "")[:10]),
]

UNFINISHED_COLUMNS = [
    Column("run", "run"),
    Column("status", "status"),
    Column("model", "model"),
    Column("method", "method"),
    Column("dataset", "dataset"),
    Column("start_time_ms", "started (UTC)", started),
    Column("top1", "last top-1 %", percent, True, optional=True),
    Column("miou", "last mIoU %", percent, True, optional=True),
    Column("reason", "reason", optional=True),
]

CSV_FIELDS = [f.name for f in fields(RunRecord)]


def columns_for(columns: list[Column], runs: list[RunRecord], task: str | None = None):
    """The columns of ``task`` (all for None), optional ones only where some run has a value."""
    return [c for c in columns if (task is None or task in c.tasks) and
            (not c.optional or any(getattr(r, c.key) not in (None, "") for r in runs))]


def cells(columns: list[Column], run: RunRecord) -> list[str]:
    return [c.fmt(getattr(run, c.key)) for c in columns]


def by_task(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    grouped = {task: [r for r in runs if r.task == task] for task in TASKS}
    grouped.update({r.task: [x for x in runs if x.task == r.task]
                    for r in runs if r.task not in TASKS})
    return {task: rows for task, rows in grouped.items() if rows}


def write_csv(path: Path, runs: list[RunRecord]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for run in runs:
            writer.writerow({k: plain(getattr(run, k)) for k in CSV_FIELDS})


def markdown_table(columns: list[Column], runs: list[RunRecord]) -> str:
    def row(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [row([c.header for c in columns]),
             row(["---:" if c.numeric else "---" for c in columns])]
    return "\n".join(lines + [row(cells(columns, r)) for r in runs])
