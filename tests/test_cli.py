"""The command line's contract with its user (README, Usage): exit code 2 and one line on stderr
for the user's own input errors (a config, the data, a path that does not exist), checked before
DeepSpeed is imported; 1 with the traceback for anything else (a full disk is not a typo); 75
for a run stopped on request; stdout carries only JSON lines; a log file shows the progress."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Pipeline, config_path
from engine_runs import TINY, HeldRun, index_tags
from pipeline.cli.main import main
from pipeline.errors import InputError

BASELINE = config_path("digits/baseline.yaml")


def run_main(cli: Pipeline, argv: list[str], prelude: str = "") -> subprocess.CompletedProcess:
    """``pipeline.cli.main.main(argv)`` in a fresh interpreter, after ``prelude``; when main
    returns, one more stdout line says whether DeepSpeed was ever imported."""
    script = (f"import json, sys\n{prelude}\nfrom pipeline.cli.main import main\n"
              f"code = main({argv!r})\n"
              f"print(json.dumps({{'deepspeed_imported': 'deepspeed' in sys.modules}}))\n"
              f"sys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", script], cwd=cli.cwd, env=cli.env(),
                          capture_output=True, text=True, timeout=600)


def one_line(stderr: str, command: str, *fragments: str) -> str:
    """stderr is exactly one line, the command's error, naming every fragment."""
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"pipeline {command}: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def json_lines(stdout: str) -> list[dict]:
    """Every stdout line is a JSON record of an event (nothing else may be printed there)."""
    records = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(r, dict) and "event" in r for r in records), stdout
    return records


# ----------------------------------------------------------------------------- exit 2
@pytest.mark.unit
def test_a_config_error_exits_2_in_one_line_before_any_data_is_read(pipeline_cli, tmp_path):
    out = pipeline_cli.run("train", BASELINE, f"data.root={tmp_path / 'nowhere'}",
                           "schedule.epochs=0")
    assert out.returncode == 2 and out.stdout == ""
    one_line(out.stderr, "train", "config key 'schedule.epochs': expected > 0, got 0")


@pytest.mark.unit
def test_a_data_error_exits_2_in_one_line_without_importing_deepspeed(pipeline_cli, tmp_path):
    out = run_main(pipeline_cli, ["train", BASELINE, f"data.root={tmp_path / 'nowhere'}"])
    assert out.returncode == 2, out.stderr[-3000:]
    one_line(out.stderr, "train", f"data root not found: {tmp_path / 'nowhere'}")
    assert json.loads(out.stdout) == {"deepspeed_imported": False}  # and nothing else


@pytest.mark.unit
@pytest.mark.parametrize("argv, named", [
    (["train", "{missing}.yaml"], "config file not found: {missing}.yaml"),
    (["eval", "{missing}.pt"], "checkpoint not found: {missing}.pt"),
    (["eval", BASELINE, "{missing}"], "checkpoint not found: {missing}"),
    (["export", "{missing}.pt", "--format", "onnx", "--out", "{missing}.onnx"],
     "checkpoint not found: {missing}.pt"),
    (["import", "csg", "{missing}.t7", "--model", "cifar_resnet56", "--out", "{missing}/f.pt"],
     "checkpoint not found: {missing}.t7"),
    (["mlflow-sync", "{missing}"], "{missing} does not exist"),
    (["data", "index", "{missing}"], "data root not found: {missing}"),
])
def test_a_path_the_user_gave_that_does_not_exist_exits_2_in_one_line(
        tmp_path, monkeypatch, capsys, argv, named):
    missing = str(tmp_path / "missing")
    monkeypatch.chdir(tmp_path)
    assert main([a.format(missing=missing) for a in argv]) == 2
    said = capsys.readouterr()
    assert said.out == ""
    one_line(said.err, argv[0], named.format(missing=missing))


@pytest.mark.unit
@pytest.mark.parametrize("argv, named", [
    (["summary", "--model", "resnet50", "--input-size", "0"], "--input-size '0': expected N"),
    (["summary", "--model", "resnet50", "--num-classes", "0"], "--num-classes 0: expected"),
    (["summary", "--model", "resnet50", "--opt", "width=2"], "unknown model option 'width'"),
    (["summary", "--model", "resnet50", "--method", "nosuch"], "unknown method 'nosuch'"),
    (["summary", "--model", "resnet18", "--method", "ce", "--input-size", "1"],
     "CE needs at least 2 spatial positions"),
    (["report", "--tag", "sweep"], "--tag 'sweep' is not of the form key=value"),
])
def test_bad_options_exit_2_in_one_line(tmp_path, monkeypatch, capsys, argv, named):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    one_line(capsys.readouterr().err, argv[0], named)


# ----------------------------------------------------------------------------- exit 1
@pytest.mark.unit
def test_an_internal_value_error_is_not_reported_as_bad_input(monkeypatch, capsys):
    """Only InputError is the user's: a ValueError from inside (a broken invariant) leaves
    main() with its traceback, which Python reports with exit code 1."""
    def broken(*args, **kwargs):
        raise ValueError("an invariant broke")

    monkeypatch.setattr("pipeline.models.summary.count_macs", broken)
    with pytest.raises(ValueError, match="an invariant broke") as raised:
        main(["summary", "--model", "cifar_resnet8", "--num-classes", "10"])
    assert not isinstance(raised.value, InputError)
    assert "error:" not in capsys.readouterr().err


DISK_FULL = """\
import errno
import pipeline.engine.checkpoint as checkpoint

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

checkpoint.save = disk_full
"""


@pytest.mark.e2e
def test_a_full_disk_while_checkpointing_exits_1_with_its_traceback(pipeline_cli, digits_root):
    out = run_main(pipeline_cli, ["train", BASELINE, f"data.root={digits_root}", *TINY,
                                  "tracking.enabled=false"], prelude=DISK_FULL)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback (most recent call last)" in out.stderr
    assert "OSError: [Errno 28] No space left on device" in out.stderr
    assert "in _save" in out.stderr and "error:" not in out.stderr.splitlines()[-1]


# ----------------------------------------------------------------------------- exit 75
@pytest.mark.e2e
def test_a_stop_request_exits_75_after_its_checkpoint(pipeline_cli, digits_root):
    run = HeldRun(pipeline_cli, ["train", BASELINE, f"data.root={digits_root}", *TINY],
                  hold_at=1)
    run.wait_held()
    run.request_stop()
    assert run.wait() == 75, run.stderr()[-3000:]
    assert "Traceback" not in run.stderr() and "error:" not in run.stderr()
    assert index_tags(pipeline_cli.cwd / "runs" / "digits-baseline" / "checkpoints") == \
        ["epoch0000-step000000001"]


# ----------------------------------------------------------------------------- stdout, log
# One progress line per logged step when stderr is a file: where a SLURM log looks.
PROGRESS = re.compile(r"pipeline: epoch (\d+)/2  step (\d+)/2  run (\d+)/4  loss \d+\.\d{4}  "
                      r"lr \S+  \d+\.\d img/s  ETA \d+:\d\d:\d\d$")


@pytest.mark.e2e
def test_stdout_is_json_lines_and_a_log_file_shows_the_progress(pipeline_cli, digits_root):
    cwd = pipeline_cli.cwd
    with (cwd / "train.out").open("w") as stdout, (cwd / "train.err").open("w") as stderr:
        code = subprocess.run([sys.executable, "-m", "pipeline", "train", BASELINE,
                               f"data.root={digits_root}", *TINY], cwd=cwd,
                              env=pipeline_cli.env(), stdout=stdout, stderr=stderr,
                              timeout=600).returncode
    log = (cwd / "train.err").read_text()
    assert code == 0, log[-3000:]
    [final] = json_lines((cwd / "train.out").read_text())
    assert final["event"] == "final"
    progress = [PROGRESS.search(line) for line in log.splitlines()]
    steps = [(int(m[1]), int(m[2]), int(m[3])) for m in progress if m]
    assert steps == [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4)], log[-3000:]

    run_dir = cwd / "runs" / "digits-baseline"
    for argv in (["eval", str(run_dir / "final.pt"), "data.backend=torchvision"],
                 ["summary", "--model", "cifar_resnet8", "--num-classes", "10",
                  "--input-size", "32", "--json"],
                 ["data", "index", str(digits_root), "--out", str(cwd)],
                 ["mlflow-sync", str(cwd)],
                 ["report", "--experiment", "digits", "--out", str(cwd / "report")]):
        out = pipeline_cli.run(*argv)
        assert out.returncode == 0, out.stderr[-3000:]
        [record] = json_lines(out.stdout)
        assert record["event"] == ("data" if argv[0] == "data" else argv[0]), argv
