"""Shared fixtures: the embedded digits tree (written once per session) and a runner for the
`pipeline` command in a scratch working directory (its own MLflow store, run and data dirs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # The tests' own tensors are small: a second thread gains nothing, and OpenMP's spinning
    # workers stall for seconds whenever another job holds the cores (CE's float64 gradcheck:
    # 5 s on one thread, 120 s on two beside a training job). Subprocesses keep the default.
    torch.set_num_threads(1)


# Every test belongs to a tier (pyproject.toml): `make test-fast` runs the unit tier.
TIERS = ("unit", "e2e", "cluster", "ui", "cuda")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test without a tier is never skipped
def pytest_collection_modifyitems(config, items):
    """Collection fails for a test without a tier marker; tests marked ``cuda`` need a GPU:
    skipped, with the reason, where torch sees none."""
    import torch

    untiered = [item.nodeid for item in items
                if not any(item.get_closest_marker(tier) for tier in TIERS)]
    if untiered:
        raise pytest.UsageError(f"{len(untiered)} tests have no tier marker (one of {TIERS}: "
                                f"pytestmark or @pytest.mark.<tier>): " + ", ".join(untiered))

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from pipeline.data.digits import write_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits(root)
    return root


class Pipeline:
    """Runs `python -m pipeline …` in ``cwd`` and keeps what it printed."""

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=self.cwd,
                              env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *args: str, launcher: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        cmd = [*launcher, *(["-m", "pipeline"] if launcher else
                            [sys.executable, "-m", "pipeline"]), *args]
        return subprocess.Popen(cmd, cwd=self.cwd, env=self.env(**env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    @staticmethod
    def final_event(stdout: str, event: str) -> dict:
        """The one JSON line of ``event`` (final, eval, predict, …) on stdout."""
        lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
        found = [l for l in lines if l.get("event") == event]
        assert len(found) == 1, stdout
        return found[0]

    @classmethod
    def final(cls, stdout: str) -> dict:
        return cls.final_event(stdout, "final")

    def tracking_uri(self) -> str:
        return f"sqlite:///{self.cwd / 'mlflow.db'}"


@pytest.fixture
def pipeline_cli(tmp_path) -> Pipeline:
    return Pipeline(tmp_path)


def config_path(name: str) -> str:
    return str(REPO / "configs" / name)
