"""Accuracy against compute and size: one PNG per (metric, x axis), one panel per dataset.

Each method has its own marker and colour; runs are filled markers, the papers' reported
points (from the catalogue, same dataset and task) hollow ones labelled with the paper's name
for the setting (an accuracy reported without this axis' number is a dotted level line, drawn
when a run has that architecture). A
baseline is joined to each method variant of the same architecture by a grey
line (solid for runs, dashed for a paper's points), several runs of one method on one
architecture (a sweep) by a line of the method's colour. On the MACs
axis a gated model sits at its dynamic MACs (what an image costs on average), every other
model at its static MACs. Classification plots top-1, segmentation mIoU, on separate figures.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter  # noqa: E402

from .catalogue import PaperPoint  # noqa: E402
from .runs import RunRecord  # noqa: E402

PANEL_INCHES = (6.4, 4.8)   # one dataset panel
DPI = 150                   # a panel is 960 × 720 pixels
LABELLED_RUNS = 12          # name the runs on a panel up to this many
METHOD_STYLE = {"baseline": ("o", "tab:gray"), "selectconv": ("v", "tab:green"),
                "gated": ("^", "tab:red"), "ce": ("s", "tab:blue"), "csg": ("D", "tab:purple")}
_SPARE_STYLES = list(zip("PX*hp", ["tab:orange", "tab:brown", "tab:pink", "tab:olive",
                                   "tab:cyan"]))
METRIC = {"classification": ("top1", "top-1 accuracy (%)"),
          "segmentation": ("miou", "mIoU (%)")}
X_AXES = {"macs": "MACs per image (dynamic for gated models)", "params": "parameters"}


def panel_pixels(panels: int) -> tuple[int, int]:
    """(width, height) of a figure with ``panels`` dataset panels."""
    return round(PANEL_INCHES[0] * panels * DPI), round(PANEL_INCHES[1] * DPI)


def _styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    spare = cycle(_SPARE_STYLES)
    return {m: METHOD_STYLE.get(m) or next(spare) for m in methods}


def _run_xy(run: RunRecord, x_key: str) -> tuple[float | None, float | None]:
    x = (run.dynamic_macs or run.macs) if x_key == "macs" else run.params
    return x, None if run.accuracy is None else 100 * run.accuracy


def _paper_xy(point: PaperPoint, x_key: str, metric: str):
    """(x, y, approximate?) of a paper point; None where the paper reports no such number."""
    reported = point.entry.reported
    if x_key == "macs":
        x_name = "dynamic_macs" if "dynamic_macs" in reported else "macs"
    else:
        x_name = "params"
    approx = bool({x_name, metric} & set(point.entry.approx))
    return reported.get(x_name), reported.get(metric), approx


def _shown(points: list[PaperPoint], runs: list[RunRecord], x_key: str,
           metric: str) -> list[PaperPoint]:
    """The paper points of a panel: those with an accuracy and this axis' number, and those
    with only an accuracy (a level line) when a run has their architecture."""
    models = {r.model for r in runs}
    out = []
    for point in points:
        x, y, _ = _paper_xy(point, x_key, metric)
        if y is not None and (x is not None or point.model in models):
            out.append(point)
    return out


def _join(ax, points: list[tuple[str, str, float, float]], style: str, styles: dict) -> None:
    """Lines between the points (architecture, method, x, y) of one architecture: from its
    baseline (the latest, when there are several) to every method variant, and along each
    method's own points in x order (a sweep's trade-off curve)."""
    by_model = defaultdict(list)
    for model, method, x, y in points:
        by_model[model].append((method, x, y))
    for group in by_model.values():
        baselines = [(x, y) for method, x, y in group if method == "baseline"]
        for method, x, y in group:
            if baselines and method != "baseline":
                bx, by = baselines[-1]
                ax.plot([bx, x], [by, y], style, color="0.65", lw=1, zorder=1)
        curves = defaultdict(list)
        for method, x, y in group:
            curves[method].append((x, y))
        for method, xy in curves.items():
            if len(xy) > 1:
                xs, ys = zip(*sorted(xy))
                ax.plot(xs, ys, style, color=styles[method][1], lw=1, alpha=0.6, zorder=2)


def _panel(ax, dataset: str, runs: list[RunRecord], points: list[PaperPoint], x_key: str,
           metric: str, styles: dict) -> None:
    """Draw one dataset's runs (each with both values) and paper points (each with an
    accuracy; one without this axis' number is drawn as a level line)."""
    joined, xs = [], []
    for i, run in enumerate(runs):
        x, y = _run_xy(run, x_key)
        marker, color = styles[run.method]
        ax.scatter([x], [y], marker=marker, color=color, s=55, zorder=3)
        if len(runs) <= LABELLED_RUNS:  # above and below in turn: close points stay legible
            ax.annotate(run.run, (x, y), xytext=(6, 5 if i % 2 == 0 else -11),
                        textcoords="offset points", fontsize=7)
        joined.append((run.model, run.method, x, y))
        xs.append(x)
    _join(ax, joined, "-", styles)
    joined = []
    for point in points:
        x, y, approx = _paper_xy(point, x_key, metric)
        marker, color = styles[point.method]
        label = f"{'≈ ' if approx else ''}{point.entry.setting} [{point.entry.paper}]"
        if x is None:  # an accuracy without this axis' number: a level across the panel
            ax.axhline(y, ls=":", lw=1, color=color, zorder=1)
            ax.annotate(f"{label}: {y:g}", (0.01, y), xycoords=("axes fraction", "data"),
                        xytext=(0, 2), textcoords="offset points", fontsize=7, color=color)
            continue
        ax.scatter([x], [y], marker=marker, facecolors="none", edgecolors=color, s=70,
                   linewidths=1.4, zorder=3)
        ax.annotate(label, (x, y), xytext=(5, -9), textcoords="offset points", fontsize=7,
                    color=color)
        joined.append((f"{point.entry.paper}/{point.model}", point.method, x, y))
        xs.append(x)
    _join(ax, joined, "--", styles)
    if xs and max(xs) > 5 * min(xs) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_title(dataset)
    ax.set_xlabel(X_AXES[x_key])
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.15, y=0.12)


def plot(runs: list[RunRecord], points: list[PaperPoint], task: str, x_key: str,
         path: Path) -> list[PaperPoint] | None:
    """Write the figure of ``task`` runs against ``x_key`` (macs | params) to ``path``; the
    paper points it shows, or None (and no file) when no run has both values."""
    metric, y_label = METRIC[task]
    runs = [r for r in runs if r.task == task and None not in _run_xy(r, x_key)]
    datasets = sorted({r.dataset for r in runs})
    if not datasets:
        return None
    panels = {d: [r for r in runs if r.dataset == d] for d in datasets}
    shown = {d: _shown([p for p in points if p.task == task and p.dataset == d], panels[d],
                       x_key, metric) for d in datasets}
    points = [p for d in datasets for p in shown[d]]
    methods = sorted({r.method for r in runs} | {p.method for p in points})
    styles = _styles(methods)
    fig, axes = plt.subplots(1, len(datasets), squeeze=False, layout="constrained",
                             figsize=(PANEL_INCHES[0] * len(datasets), PANEL_INCHES[1]))
    for ax, dataset in zip(axes[0], datasets):
        _panel(ax, dataset, panels[dataset], shown[dataset], x_key, metric, styles)
    axes[0][0].set_ylabel(y_label)
    handles = [Line2D([], [], marker=styles[m][0], color=styles[m][1], ls="", label=m)
               for m in methods]
    if points:
        handles.append(Line2D([], [], marker="o", mfc="none", mec="0.3", ls="",
                              label="paper (hollow; dotted: no x)"))
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return points
