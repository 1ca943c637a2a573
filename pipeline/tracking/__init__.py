"""Experiment tracking: MLflow on rank 0, a no-op tracker on every other rank.

The store is MLflow's default (``sqlite:///mlflow.db`` in the working directory, artifacts under
``./mlruns``; ``mlflow ui`` there shows it) unless ``MLFLOW_TRACKING_URI`` says otherwise.

A tracking server that goes away never stops training and loses nothing. Every record (the
metrics of one step with their wall-clock time, params, tags, an artifact, the run's status) is
sent at once while the server answers. When it does not, the record joins a queue that is also
appended to a spool file, ``<spool dir>/mlflow-pending-<run id>.jsonl``; the queue is retried at
most every ``retry_seconds`` and once more at close, and whatever is still queued then stays in
the spool file until ``pipeline mlflow-sync DIR`` (``sync_spool``) delivers it. A later job of
the same run (a resumed checkpoint) also delivers its run's spool file first.

No metric step is ever logged twice: before metrics go to a run that may hold some already (a
re-attached run, or any run after a failed request that the server may have applied), the last
step of each key is read back, and records at or below it are skipped. A resumed job replays
the steps after its checkpoint, so this also keeps those from being logged twice.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

log = logging.getLogger("pipeline.tracking")

SPOOL_PREFIX = "mlflow-pending-"
# Tag of the runs the tools log beside training runs (a report, a registered export): its value
# says which. A run with it is never a training run.
KIND_TAG = "pipeline.kind"
BATCH = 100  # MLflow's limit on params / tags in one log_batch request
# How a run ended, beside its status (KILLED: stop_reason; FAILED: error): set when it ends,
# removed when a later job re-opens it.
END_TAGS = ("stop_reason", "error")


class Tracker:
    """No-op tracker (ranks other than 0, or tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


def _limit_http_retries() -> None:
    # MLflow's HTTP client retries a failed request 7 times with exponential backoff, which
    # would stall training for minutes per call while the server is down; the tracker queues
    # and retries by itself, so one attempt with a bounded wait is enough. A user's own
    # settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _unreachable(err: Exception) -> bool:
    """Worth retrying later: no answer, or a server-side failure (5xx). A 4xx (a param that
    changed value, a deleted run) will not get better and is dropped with a warning."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, OSError)  # requests' errors derive from OSError too


def last_steps(client, run_id: str) -> dict[str, int]:
    """The last logged step of every metric key of a run."""
    keys = client.get_run(run_id).data.metrics
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def deliver(client, run_id: str, record: dict, logged_up_to: dict[str, int]) -> None:
    """Send one record; metric steps at or below ``logged_up_to[key]`` are skipped, and the
    map is advanced past what was sent."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "metrics":
        step = record["step"]
        fresh = [Metric(k, float(v), record["time"], step) for k, v in record["values"].items()
                 if step > logged_up_to.get(k, -1)]
        if fresh:
            client.log_batch(run_id, metrics=fresh)
            logged_up_to.update((m.key, step) for m in fresh)
    elif op in ("params", "tags"):
        items = [(k, str(v)[:6000]) for k, v in record["values"].items()]  # MLflow's value cap
        for i in range(0, len(items), BATCH):
            chunk = items[i:i + BATCH]
            if op == "params":
                client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
            else:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk])
    elif op == "artifact":
        if not Path(record["path"]).exists():
            raise FileNotFoundError(f"artifact {record['path']} no longer exists")
        client.log_artifact(run_id, record["path"], record["dir"])
    elif op == "status":
        if record["status"] == "RUNNING":  # re-opened: how it ended before is no longer true
            client.update_run(run_id, status="RUNNING")
            for key in client.get_run(run_id).data.tags.keys() & set(END_TAGS):
                client.delete_tag(run_id, key)
        else:
            client.set_terminated(run_id, record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown tracking record op {op!r}")


def _warn_dropped(record: dict, err: Exception) -> None:
    log.warning("MLflow refused a %s record, dropped: %s", record["op"], _first_line(err))


class Spool:
    """The on-disk copy of a run's undelivered records: a header line, then one JSON record per
    line, oldest first."""

    def __init__(self, directory: Path, run_id: str, tracking_uri: str):
        self.path = Path(directory) / f"{SPOOL_PREFIX}{run_id}.jsonl"
        self.header = {"spool": 1, "run_id": run_id, "tracking_uri": tracking_uri}

    def read(self) -> list[dict]:
        return read_spool(self.path)[1] if self.path.is_file() else []

    def append(self, record: dict) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            if new:
                f.write(json.dumps(self.header) + "\n")
            f.write(json.dumps(record) + "\n")

    def rewrite(self, records: list[dict]) -> None:
        if not records:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [self.header, *records]))
        os.replace(tmp, self.path)


def read_spool(path: Path) -> tuple[dict, list[dict]]:
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or "spool" not in json.loads(lines[0]):
        raise ValueError(f"{path}: not a tracking spool file (no header line)")
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


class MlflowTracker(Tracker):
    """One MLflow run; ``run_id`` re-attaches to an existing run (a resumed job).

    Records queue up while the tracking server is unreachable (see the module docstring);
    ``spool_dir`` holds their on-disk copy.
    """

    def __init__(self, experiment: str, run_name: str, run_id: str | None = None,
                 spool_dir: str | Path = "mlflow-pending", retry_seconds: float = 30.0):
        from mlflow.tracking import MlflowClient

        _limit_http_retries()
        self._client = MlflowClient()
        self._retry_seconds = retry_seconds
        self._retry_at = 0.0
        if run_id is None:
            self.run_id = self._create_run(experiment, run_name)
            self._logged_up_to: dict[str, int] | None = {}
        else:
            self.run_id = run_id
            self._logged_up_to = None  # read back before the first metrics are sent
        self._spool = Spool(Path(spool_dir), self.run_id, self._client.tracking_uri)
        self._pending = self._spool.read()  # left by an earlier job of this run
        if run_id is not None:
            self._submit({"op": "status", "status": "RUNNING"})

    def _create_run(self, experiment: str, run_name: str, wait_seconds: float = 60.0) -> str:
        """A new run; the server gets ``wait_seconds`` to answer (it may be starting)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking.context.registry import resolve_tags

        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                found = self._client.get_experiment_by_name(experiment)
                if found is None:
                    try:
                        experiment_id = self._client.create_experiment(experiment)
                    except MlflowException as err:  # another job created it meanwhile
                        if err.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                        experiment_id = self._client.get_experiment_by_name(experiment).experiment_id
                else:
                    experiment_id = found.experiment_id
                tags = resolve_tags({"mlflow.runName": run_name})
                return self._client.create_run(experiment_id, run_name=run_name,
                                               tags=tags).info.run_id
            except Exception as err:
                if not _unreachable(err) or time.monotonic() > deadline:
                    raise ValueError(f"MLflow tracking at {self._client.tracking_uri} cannot "
                                     f"start a run: {_first_line(err)}") from None
                time.sleep(2.0)

    # ----------------------------------------------------------------------------- queue
    def _send(self, record: dict) -> None:
        if record["op"] == "metrics" and self._logged_up_to is None:
            self._logged_up_to = last_steps(self._client, self.run_id)
        deliver(self._client, self.run_id, record, self._logged_up_to)

    def _try_send(self, record: dict) -> bool:
        """True when the record is done with (sent, or dropped as undeliverable)."""
        try:
            self._send(record)
            return True
        except Exception as err:
            if _unreachable(err):
                if not self._pending:
                    log.warning("MLflow unreachable (%s): queueing records in %s",
                                _first_line(err), self._spool.path)
                # A failed request may still have been applied: read the steps back first.
                self._logged_up_to = None
                self._retry_at = time.monotonic() + self._retry_seconds
                return False
            _warn_dropped(record, err)
            return True

    def _flush(self) -> bool:
        """Send the queue in order; True when it is empty."""
        sent = 0
        while self._pending and self._try_send(self._pending[0]):
            self._pending.pop(0)
            sent += 1
        if sent:
            self._spool.rewrite(self._pending)
            if not self._pending:
                log.info("MLflow reachable again: %d queued records delivered", sent)
        return not self._pending

    def _submit(self, record: dict) -> None:
        if self._pending and time.monotonic() >= self._retry_at:
            self._flush()
        if not self._pending and self._try_send(record):
            return
        self._pending.append(record)
        self._spool.append(record)

    # ----------------------------------------------------------------------------- API
    def log_params(self, params: dict[str, Any]) -> None:
        self._submit({"op": "params", "values": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit({"op": "metrics", "step": int(step), "time": _now_ms(),
                      "values": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "dir": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"op": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def close(self, status: str = "FINISHED") -> None:
        self._submit({"op": "status", "status": status, "time": _now_ms()})
        if self._pending and not self._flush():
            log.warning("MLflow still unreachable: %d records of run %s kept in %s; deliver "
                        "them with `pipeline mlflow-sync %s`", len(self._pending), self.run_id,
                        self._spool.path, self._spool.path.parent)


def spool_files(root: str | Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(f"{SPOOL_PREFIX}*.jsonl"))


def sync_spool(root: str | Path) -> dict[str, int]:
    """Deliver the spooled records of every run under ``root`` (a spool file or a directory
    searched recursively) to ``MLFLOW_TRACKING_URI``, or else to the URI each file was written
    for. A file is deleted once all of it is delivered. A record the server refuses (4xx) is
    dropped with a warning, as in training; when the server is unreachable the file keeps the
    rest and a ValueError says so. Returns counts of files and records delivered."""
    from mlflow.tracking import MlflowClient

    _limit_http_retries()
    if not Path(root).exists():
        raise InputError(f"mlflow-sync: {root} does not exist")
    done = {"files": 0, "records": 0}
    for path in spool_files(root):
        header, records = read_spool(path)
        client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or header["tracking_uri"])
        processed = 0
        try:
            logged_up_to = last_steps(client, header["run_id"])
            for record in records:
                try:
                    deliver(client, header["run_id"], record, logged_up_to)
                    done["records"] += 1
                except Exception as err:
                    if _unreachable(err):
                        raise
                    _warn_dropped(record, err)
                processed += 1
        except Exception as err:
            if not _unreachable(err):
                raise
            Spool(path.parent, header["run_id"], header["tracking_uri"]).rewrite(
                records[processed:])
            raise ValueError(f"MLflow at {client.tracking_uri} unreachable ({_first_line(err)}):"
                             f" {len(records) - processed} records kept in {path}") from None
        path.unlink()
        done["files"] += 1
    return done


def open_tracker(enabled: bool, experiment: str, run_name: str, run_id: str | None = None,
                 spool_dir: str | Path = "mlflow-pending") -> Tracker:
    return MlflowTracker(experiment, run_name, run_id, spool_dir) if enabled else Tracker()


def run_tags(world_size: int) -> dict[str, str]:
    """Provenance tags: git commit, world size, host."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git_commit": commit or "unknown", "world_size": str(world_size),
            "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}

