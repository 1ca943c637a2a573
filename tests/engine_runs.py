"""Test helpers for the engine's fault tests (test_resume, test_checkpoint, test_stopping): tiny
`pipeline train` runs on the digits, a run held at an optimizer step until a stop request
(PIPELINE_HOLD_AT_STEP: the test acts on a run that is certainly training, never on a clock),
MLflow look-ups, and a stand-in for the DeepSpeed engine to write checkpoints without one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from conftest import Pipeline, config_path
from mlflow_server import wait_until

BASELINE = config_path("digits/baseline.yaml")
RUN = "digits-baseline"  # the run name of BASELINE
# Two epochs of two steps of a CIFAR ResNet-8: seconds of training.
TINY = ["model.name=cifar_resnet8", "schedule.epochs=2", "engine.max_steps_per_epoch=2",
        "data.batch_size=16", "data.val_batch_size=120", "engine.log_every=1",
        "checkpoint.every_minutes=0"]
HELD = "holding at step"  # what the run logs once it holds


def train_args(root: Path, *extra: str) -> list[str]:
    return ["train", BASELINE, f"data.root={root}", *TINY, *extra]


class HeldRun:
    """``pipeline train`` that holds right after optimizer step ``hold_at`` until it is asked to
    stop (by a signal, or by its stop file ``cwd/stop-requested``). Output goes to files, so
    that nothing is lost between waiting for a line and reading the rest."""

    def __init__(self, cli: Pipeline, args: list[str], hold_at: int, **env: str):
        self.stop_file = cli.cwd / "stop-requested"
        self.out, self.err = cli.cwd / "held.out", cli.cwd / "held.err"
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args], cwd=cli.cwd, start_new_session=True,
                stdout=stdout, stderr=stderr,
                env=cli.env(PIPELINE_HOLD_AT_STEP=str(hold_at),
                            PIPELINE_STOP_FILE=str(self.stop_file), **env))

    def wait_held(self, timeout: float = 600) -> None:
        def held() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) without "
                                     f"holding:\n{self.stderr()[-3000:]}")
            return HELD in self.stderr()
        wait_until(held, timeout, "the run to hold")

    def interrupt(self) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def request_stop(self, reason: str = "") -> None:
        self.stop_file.write_text(reason)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI's one-line error (exit 2, no traceback) that names every fragment."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline train: error: "), out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def mlflow_runs(cwd: Path, experiment: str = "digits") -> list:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def metric_history(cwd: Path, run_id: str, key: str) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def index_tags(ckpt_dir: Path) -> list[str]:
    return json.loads((ckpt_dir / "index.json").read_text())["tags"]


class FakeEngine:
    """What ``checkpoint.save`` asks of a DeepSpeed engine on a world of one: it writes the
    model states file (weights and client state) under DeepSpeed's name for it."""

    save_non_zero_checkpoint, save_zero_checkpoint = True, False

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict,
                        save_latest: bool) -> None:
        path = Path(self._get_ckpt_name(save_dir, tag))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"weight": torch.arange(4096.0)}, **client_state}, path)

    @staticmethod
    def _get_ckpt_name(save_dir: str, tag: str) -> str:
        return os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")
