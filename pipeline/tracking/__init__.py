"""Experiment tracking: MLflow on rank 0, a no-op tracker on every other rank.

The store is MLflow's default (``sqlite:///mlflow.db`` in the working directory, artifacts under
``./mlruns``; ``mlflow ui`` there shows it) unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any


class Tracker:
    """No-op tracker (ranks other than 0, or tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    """One MLflow run; ``run_id`` re-attaches to an existing run (a resumed job).

    A job killed without warning resumes from its last checkpoint and replays the steps after
    it; their metrics were logged already, so a re-attached run skips every metric step at or
    below the last one MLflow holds for that key (no step is logged twice).
    """

    def __init__(self, experiment: str, run_name: str, run_id: str | None = None):
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(experiment)
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.run_id = self._run.info.run_id
        self._logged_up_to = self._last_steps() if run_id else {}

    def _last_steps(self) -> dict[str, int]:
        client = self._mlflow.tracking.MlflowClient()
        keys = client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in client.get_metric_history(self.run_id, k)) for k in keys}

    def log_params(self, params: dict[str, Any]) -> None:
        # MLflow limits a value to 6000 characters and a batch to 100 params.
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: float(v) for k, v in metrics.items() if step > self._logged_up_to.get(k, -1)}
        if fresh:
            self._mlflow.log_metrics(fresh, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def open_tracker(enabled: bool, experiment: str, run_name: str,
                 run_id: str | None = None) -> Tracker:
    return MlflowTracker(experiment, run_name, run_id) if enabled else Tracker()


def run_tags(world_size: int) -> dict[str, str]:
    """Provenance tags: git commit, world size, host."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git_commit": commit or "unknown", "world_size": str(world_size),
            "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
