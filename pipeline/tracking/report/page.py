"""The report as Markdown and as one self-contained HTML page (plots embedded as data URIs,
no external files or scripts), both built from the same tables and figures."""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from .catalogue import Catalogue, PaperPoint
from .runs import RunRecord
from .table import RESULT_COLUMNS, UNFINISHED_COLUMNS, by_task, cells, columns_for, \
    markdown_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; }
.num { text-align: right; }
img { max-width: 100%; border: 1px solid #ddd; }
.meta { color: #666; }
"""


def _html_table(table_id: str, columns, runs: list[RunRecord]) -> str:
    align = [' class="num"' if c.numeric else "" for c in columns]
    head = "".join(f"<th{a}>{escape(c.header)}</th>" for a, c in zip(align, columns))
    body = "".join("<tr>" + "".join(f"<td{a}>{escape(v)}</td>"
                                    for a, v in zip(align, cells(columns, r))) + "</tr>"
                   for r in runs)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _sources(points: list[PaperPoint], catalogue: Catalogue) -> list[str]:
    """One line per paper point drawn: setting, paper, where the numbers come from."""
    lines = []
    for p in points:
        paper = catalogue.papers[p.entry.paper]
        cited = ", ".join(v for v in (paper["title"], paper.get("venue")) if v)
        lines.append(f"{p.entry.setting} ({cited}): {p.entry.source}")
    return lines


def markdown(summary: str, finished: list[RunRecord], unfinished: list[RunRecord],
             plots: dict[str, Path], points: list[PaperPoint], catalogue: Catalogue) -> str:
    parts = ["# Results", "", summary, ""]
    for task, runs in by_task(finished).items():
        parts += [f"## {task}", "", markdown_table(columns_for(RESULT_COLUMNS, runs, task),
                                                    runs), ""]
    if not finished:
        parts += ["No finished runs.", ""]
    if unfinished:
        parts += ["## Not finished (running, failed or stopped: not in the results above)", "",
                  markdown_table(columns_for(UNFINISHED_COLUMNS, unfinished), unfinished), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
        parts += [""]
    if points:
        parts += ["## Paper points", ""] + [f"- {line}" for line in _sources(points, catalogue)]
        parts += [""]
    return "\n".join(parts)


def html(summary: str, finished: list[RunRecord], unfinished: list[RunRecord],
         plots: dict[str, Path], points: list[PaperPoint], catalogue: Catalogue) -> str:
    parts = [f"<h1>Results</h1><p class=\"meta\">{escape(summary)}</p>"]
    for task, runs in by_task(finished).items():
        parts.append(f"<h2>{escape(task)}</h2>" + _html_table(
            f"results-{task}", columns_for(RESULT_COLUMNS, runs, task), runs))
    if not finished:
        parts.append("<p>No finished runs.</p>")
    if unfinished:
        parts.append("<h2>Not finished (running, failed or stopped: not in the results "
                     "above)</h2>" + _html_table(
                         "unfinished", columns_for(UNFINISHED_COLUMNS, unfinished), unfinished))
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, path in plots.items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img id="plot-{escape(name)}" alt="{escape(name)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>{escape(path.name)}'
                         "</figcaption></figure>")
    if points:
        parts.append("<h2>Paper points</h2><ul>" + "".join(
            f"<li>{escape(line)}</li>" for line in _sources(points, catalogue)) + "</ul>")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>pipeline report"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(parts) +
            "\n</body></html>\n")
