"""`pipeline report` over real runs: two tiny digits trainings (baseline and gated CIFAR
ResNet-8, 1 epoch of 3 steps) plus a run still going and a failed one, in one SQLite store.
The table holds exactly the runs' logged values, the unfinished runs are listed apart, the
PNGs are images of the expected size, the report is logged as a `report` run that later
reports leave out, and the HTML page renders in headless Chromium with its table and plots."""
from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image, ImageStat

from conftest import Pipeline, config_path
from mlflow_server import CHROMIUM_FLAGS, ensure_chromium
from pipeline.cli.main import main
from pipeline.tracking.report import KIND_TAG, REPORT_KIND, read_runs
from pipeline.tracking.report.plots import panel_pixels

pytestmark = pytest.mark.e2e

EXPERIMENT = "report-test"
TINY = ["model.name=cifar_resnet8", "schedule.epochs=1", "engine.max_steps_per_epoch=3",
        "data.batch_size=16", "data.val_batch_size=120", "checkpoint.every_minutes=0",
        f"tracking.experiment={EXPERIMENT}"]


@dataclass
class Store:
    cli: Pipeline
    client: MlflowClient
    trained: dict[str, str]       # method → run id of a digits training
    segmentation: str             # run id
    unfinished: dict[str, str]    # run name → run id


def _client_runs(client: MlflowClient, digits_root: Path) -> dict[str, str]:
    """Runs logged the way the trainer logs them, for what two tiny digits trainings cannot
    show: a finished segmentation run, a run still going and one that failed."""
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    segmentation = client.create_run(experiment_id, run_name="city-seg", start_time=1_000_000,
                                     tags={"git_commit": "0123456789abcdef"})
    client.log_batch(segmentation.info.run_id, params=[
        Param("task", "segmentation"), Param("model.name", "deeplabv3_resnet50"),
        Param("method.name", "baseline"), Param("data.root", "/datasets/cityscapes"),
        Param("data.layout", "cityscapes"), Param("schedule.iterations", "80000"),
        Param("model.params", "39639636"), Param("model.macs", "138906390528")], metrics=[
        Metric("val/miou", 0.7125, 0, 80000), Metric("val/pixel_acc", 0.9531, 0, 80000),
        *(Metric("train/images_per_s", v, 0, step) for step, v in enumerate((9.0, 12.5, 11.0)))])
    client.set_terminated(segmentation.info.run_id, "FINISHED", end_time=1_000_000 + 3_723_000)

    params = [Param("task", "classification"), Param("model.name", "cifar_resnet8"),
              Param("method.name", "ce"), Param("data.root", str(digits_root)),
              Param("schedule.epochs", "1")]
    running = client.create_run(experiment_id, run_name="still-running")
    client.log_batch(running.info.run_id, params=params,
                     metrics=[Metric("val/top1", 0.25, 0, 3)])
    failed = client.create_run(experiment_id, run_name="crashed",
                               tags={"error": "RuntimeError: boom"})
    client.log_batch(failed.info.run_id, params=params)
    client.set_terminated(failed.info.run_id, "FAILED")
    return {"segmentation": segmentation.info.run_id, "still-running": running.info.run_id,
            "crashed": failed.info.run_id}


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_root) -> Store:
    cli = Pipeline(tmp_path_factory.mktemp("report-store"))
    finished = {}
    for method in ("baseline", "gated"):
        out = cli.run("train", config_path(f"digits/{method}.yaml"),
                      f"data.root={digits_root}", *TINY)
        assert out.returncode == 0, out.stderr[-3000:]
        finished[method] = cli.final(out.stdout)["run_id"]
    client = MlflowClient(cli.tracking_uri())
    logged = _client_runs(client, digits_root)
    return Store(cli, client, finished, logged.pop("segmentation"), logged)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, digits_root) -> Path:
    """A catalogue with two paper points on digits: one placed on both plots, one with only
    an accuracy (a level line), and a third on another dataset that no plot shows."""
    root = tmp_path_factory.mktemp("catalogue")
    for method in ("baseline", "gated"):
        (root / f"{method}_resnet8.yaml").write_text(
            f"defaults: [{config_path(f'digits/{method}.yaml')}]\n"
            f"data: {{root: {digits_root}}}\nmodel: {{name: cifar_resnet8}}\n")
    path = root / "experiments.yaml"
    path.write_text("papers: {gated: {title: Batch-Shaping}}\n"
                    "experiments:\n"
                    "  - {config: gated_resnet8.yaml, paper: gated, setting: Paper-Gated-R8,\n"
                    "     table: null, source: test point,\n"
                    "     reported: {top1: 60.0, params: 80000, dynamic_macs: 6.0e6}}\n"
                    "  - {config: baseline_resnet8.yaml, paper: gated, setting: Paper-R8-level,\n"
                    "     table: null, source: test level, reported: {top1: 95.0}}\n"
                    f"  - {{config: {config_path('cifar10/resnet20_csg.yaml')}, paper: gated,\n"
                    "     setting: Paper-CIFAR, table: null, source: elsewhere,\n"
                    "     reported: {top1: 91.0, params: 312218}}\n")
    return path


@pytest.fixture(scope="module")
def report(store, catalogue, tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("report") / "out"
    out = store.cli.run("report", "--experiment", EXPERIMENT, "--out", str(out_dir),
                        "--catalogue", str(catalogue))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["run_id"]: row for row in csv.DictReader(f)}


def _expected_macs(run) -> int:
    """``model.macs`` as the trainer logs it; counted the same way for runs from before it."""
    if "model.macs" in run.data.params:
        return int(run.data.params["model.macs"])
    from pipeline.models import build_model
    from pipeline.models.summary import count_macs

    params = run.data.params
    return count_macs(build_model(params["model.name"], 10, method=params["method.name"]), 32)


def test_table_holds_the_runs_logged_values(store, report):
    out = Path(report["out"])
    assert report["finished"] == 3 and report["unfinished"] == 2
    rows = _rows(out / "results.csv")
    assert set(rows) == {*store.trained.values(), store.segmentation}
    for method, run_id in store.trained.items():
        run, row = store.client.get_run(run_id), rows[run_id]
        metrics, params = run.data.metrics, run.data.params
        assert (row["run"], row["model"], row["method"], row["dataset"], row["task"]) == \
            (f"digits-{method}", "cifar_resnet8", method, "digits", "classification")
        assert float(row["top1"]) == metrics["val/top1"]
        assert float(row["top5"]) == metrics["val/top5"]
        assert int(row["params"]) == int(params["model.params"])
        assert int(row["macs"]) == _expected_macs(run)
        assert int(row["epochs"]) == 1 and row["iterations"] == ""
        history = store.client.get_metric_history(run_id, "train/images_per_s")
        assert float(row["images_per_s"]) == statistics.median(m.value for m in history)
        assert float(row["wall_time_s"]) == (run.info.end_time - run.info.start_time) / 1000
        assert row["git_commit"] == run.data.tags["git_commit"]
        if method == "gated":
            assert float(row["dynamic_macs"]) == metrics["val/dynamic_macs"]
        else:
            assert row["dynamic_macs"] == ""
    row = rows[store.segmentation]
    assert (row["task"], row["dataset"], row["model"]) == \
        ("segmentation", "cityscapes", "deeplabv3_resnet50")
    assert (float(row["miou"]), float(row["pixel_acc"])) == (0.7125, 0.9531)
    assert row["top1"] == row["top5"] == row["epochs"] == ""
    assert (int(row["iterations"]), int(row["params"]), int(row["macs"])) == \
        (80000, 39639636, 138906390528)
    assert (float(row["images_per_s"]), float(row["wall_time_s"])) == (11.0, 3723.0)

    unfinished = _rows(out / "unfinished.csv")
    assert set(unfinished) == set(store.unfinished.values())
    assert {r["run"]: r["status"] for r in unfinished.values()} == \
        {"still-running": "RUNNING", "crashed": "FAILED"}
    markdown = (out / "results.md").read_text()
    results, apart = markdown.split("## Not finished")
    assert "digits-baseline" in results and "digits-gated" in results
    assert "| city-seg | deeplabv3_resnet50 | baseline | cityscapes | 39.6M | 139G |" in results
    assert "| 71.25 | 95.31 | 80000 | 11.0 | 1:02:03 | 0123456789 |" in results
    assert "still-running" in apart and "crashed" in apart and "RuntimeError: boom" in apart
    assert "still-running" not in results and "crashed" not in results
    drawn = markdown.split("## Paper points")[1]  # the catalogue's points on digits
    assert "Paper-Gated-R8" in drawn and "Paper-R8-level" in drawn
    assert "Paper-CIFAR" not in drawn


def test_plots_are_pngs_of_the_expected_size(report):
    out = Path(report["out"])
    assert report["plots"] == ["miou_vs_macs", "miou_vs_params", "top1_vs_macs",
                               "top1_vs_params"]
    for name in report["plots"]:
        with Image.open(out / f"{name}.png") as image:
            image.verify()
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == panel_pixels(1)


def test_report_is_a_tagged_run_that_later_reports_leave_out(store, report):
    run = store.client.get_run(report["run_id"])
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    assert run.data.tags[KIND_TAG] == REPORT_KIND
    artifacts = {a.path for a in store.client.list_artifacts(report["run_id"])}
    assert {"results.csv", "results.md", "report.html", "top1_vs_macs.png",
            "top1_vs_params.png"} <= artifacts
    again = {r.run_id for r in read_runs(store.client, EXPERIMENT)}
    assert again == {*store.trained.values(), store.segmentation, *store.unfinished.values()}
    gated = read_runs(store.client, EXPERIMENT, {"method": "gated"})
    assert [r.run_id for r in gated] == [store.trained["gated"]]


def test_no_matching_runs_is_said_and_exits_0(store, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    said = capsys.readouterr()
    assert "no runs" in said.err and not said.out  # stdout: only JSON lines
    assert not (tmp_path / "mlflow.db").exists()  # reading created no store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.cli.tracking_uri())
    assert main(["report", "--experiment", EXPERIMENT, "--tag", "method=none"]) == 0
    assert "no runs match" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()
    assert main(["report", "--experiment", "no-such-experiment"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "pipeline report: error: no MLflow experiment named 'no-such-experiment'")


def _not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("L")
    assert min(image.size) > 100
    assert ImageStat.Stat(image).stddev[0] > 10  # a plot, not an empty or white box
    dark = sum(image.histogram()[:200]) / (image.size[0] * image.size[1])
    assert dark > 0.01  # axes, markers and text drawn


@pytest.mark.ui
def test_html_page_renders_table_and_plots(report, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = ensure_chromium()
    page_path = Path(report["out"]) / "report.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS[1:])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_path.as_uri())
            table = page.locator("table#results-classification")
            assert table.is_visible()
            assert table.locator("tbody tr").count() == 2
            assert page.locator("table#results-segmentation tbody tr").count() == 1
            assert page.locator("table#unfinished tbody tr").count() == 2
            for name in report["plots"]:
                image = page.locator(f"img#plot-{name}")
                image.scroll_into_view_if_needed()
                assert image.is_visible()
                width = image.evaluate("img => img.complete ? img.naturalWidth : 0")
                assert width == panel_pixels(1)[0]
                _not_blank(image.screenshot())
            page.screenshot(path=str(tmp_path / "report-page.png"), full_page=True)
        finally:
            browser.close()
