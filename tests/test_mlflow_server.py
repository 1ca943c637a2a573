"""A real `mlflow server` (SQLite store, local artifact root, a loopback port it binds itself):
training logs to it through MLFLOW_TRACKING_URI, the UI shows the run in headless Chromium, and
a server that goes away mid-run neither crashes training nor loses a metric. The outage starts
at a known step (the run holds there: PIPELINE_HOLD_AT_STEP), never at a moment a clock chose."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import config_path
from engine_runs import HeldRun
from mlflow_server import CHROMIUM_FLAGS, MlflowServer, TcpProxy, ensure_chromium
from pipeline.tracking import MlflowTracker, spool_files, sync_spool

BASELINE = config_path("digits/baseline.yaml")


def tiny(digits_root: Path, experiment: str, run_name: str, epochs: int, steps: int) -> list[str]:
    return [f"data.root={digits_root}", "model.name=cifar_resnet8", f"schedule.epochs={epochs}",
            f"engine.max_steps_per_epoch={steps}", "data.batch_size=16", "data.val_batch_size=120",
            "engine.log_every=1", "checkpoint.every_minutes=0",
            f"tracking.experiment={experiment}", f"tracking.run_name={run_name}"]


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.mark.ui
def test_server_holds_the_run_and_the_ui_shows_it(server, pipeline_cli, digits_root, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = ensure_chromium()
    run_name = f"ui-{uuid.uuid4().hex[:8]}"
    out = pipeline_cli.run("train", BASELINE, *tiny(digits_root, "ops-server", run_name, 2, 3),
                           MLFLOW_TRACKING_URI=server.url)
    assert out.returncode == 0, out.stderr[-3000:]
    final = pipeline_cli.final(out.stdout)
    assert not (pipeline_cli.cwd / "mlflow.db").exists()  # everything went to the server

    client = MlflowClient(server.url)
    run = client.get_run(final["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_name
    assert run.data.params["model.name"] == "cifar_resnet8"
    assert run.data.params["schedule.epochs"] == "2"
    assert steps_of(client, run.info.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert steps_of(client, run.info.run_id, "val/top1") == [3, 6]
    assert run.data.metrics["val/top1"] == pytest.approx(final["val_top1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == \
        ["checkpoint/final.pt"]
    fetched = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    local = pipeline_cli.cwd / "runs" / "digits-baseline" / "config.yaml"
    assert fetched.read_text() == local.read_text()
    assert (server.root / "artifacts").is_dir()  # the server's own artifact root

    experiment_id = run.info.experiment_id
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS[1:])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{server.url}/#/experiments/{experiment_id}/runs")
            page.get_by_text(run_name).first.wait_for(timeout=90_000)
            page.screenshot(path=str(tmp_path / "mlflow-ui.png"))
        finally:
            browser.close()


@pytest.mark.e2e
def test_tracker_queues_while_the_server_is_away_and_delivers_later(server, tmp_path,
                                                                    monkeypatch):
    proxy = TcpProxy(server.port).up()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    spool_dir = tmp_path / "spool"
    tracker = MlflowTracker("ops-queue", "queue", spool_dir=spool_dir, retry_seconds=0)
    client = MlflowClient(server.url)
    try:
        tracker.log_params({"lr": 0.1})
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step)

        proxy.down()  # the server goes away: logging neither raises nor stalls in retries
        for step in (4, 5, 6):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.set_tags({"phase": "offline"})
        assert 1 <= proxy.resets <= 4  # one attempt per record at most: no retry loop
        [spool] = spool_files(spool_dir)
        assert len(spool.read_text().splitlines()) == 1 + 4  # header + 4 queued records
        assert steps_of(client, tracker.run_id, "loss") == [1, 2, 3]

        proxy.up()  # back: the next record delivers the queue first, in order
        tracker.log_metrics({"loss": 1.0 / 7}, 7)
        assert steps_of(client, tracker.run_id, "loss") == [1, 2, 3, 4, 5, 6, 7]
        assert not spool.exists()
        assert client.get_run(tracker.run_id).data.tags["phase"] == "offline"

        proxy.down()  # away again when the run ends: the spool file keeps the rest
        tracker.log_metrics({"loss": 1.0 / 8}, 8)
        tracker.close("FINISHED")
        assert spool.exists()
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
        with pytest.raises(ValueError, match="unreachable.*2 records kept"):
            sync_spool(spool_dir)  # still away: the file keeps everything
        assert spool.exists()
    finally:
        proxy.up()
    assert sync_spool(spool_dir) == {"files": 1, "records": 2}  # step 8 and the final status
    assert not spool.exists()
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: m.value for m in history}[5] == pytest.approx(0.2)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert sync_spool(spool_dir) == {"files": 0, "records": 0}
    proxy.down()


@pytest.mark.e2e
def test_training_survives_the_server_going_away(server, pipeline_cli, digits_root):
    """The server goes away while the run holds after step HOLD: the run stops on request and
    a second job resumes and finishes it with the server still away; both queue what they log,
    and ``mlflow-sync`` delivers all of it later, no step lost or twice."""
    proxy = TcpProxy(server.port).up()
    client = MlflowClient(server.url)
    epochs, steps, hold = 3, 8, 5
    args = ["train", BASELINE, *tiny(digits_root, "ops-outage", "outage", epochs, steps)]
    held = HeldRun(pipeline_cli, args, hold_at=hold, MLFLOW_TRACKING_URI=proxy.url)
    try:
        held.wait_held()  # steps 1..HOLD are on the server: a metric is sent as it is logged
        [run] = client.search_runs([client.get_experiment_by_name("ops-outage").experiment_id])
        assert steps_of(client, run.info.run_id, "train/loss") == list(range(1, hold + 1))
        proxy.down()  # the tracking server is gone for the rest of the run
        held.request_stop()
        assert held.wait() == 75, held.stderr()[-3000:]
        resumed = pipeline_cli.run(*args, MLFLOW_TRACKING_URI=proxy.url)
    finally:
        if held.proc.poll() is None:
            held.proc.kill()
        proxy.up()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = pipeline_cli.final(resumed.stdout)
    assert final["run_id"] == run.info.run_id and final["epochs"] == epochs
    assert "MLflow unreachable" in held.stderr() and "mlflow-sync" in resumed.stderr
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert steps_of(client, run.info.run_id, "train/loss") == list(range(1, hold + 1))

    total = epochs * steps
    delivered = sync_spool(pipeline_cli.cwd)
    assert delivered["files"] == 1 and delivered["records"] >= total - hold
    assert not spool_files(pipeline_cli.cwd)
    assert steps_of(client, run.info.run_id, "train/loss") == list(range(1, total + 1))
    assert steps_of(client, run.info.run_id, "val/top1") == [steps, 2 * steps, total]
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.metrics["val/top1"] == pytest.approx(final["val_top1"])
    assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}
    proxy.down()
