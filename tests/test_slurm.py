"""The batch scripts on a real single-node SLURM cluster (slurm/testcluster.sh: slurm-wlm and
munge from apt when missing, own ports, own state directory), logging to a real MLflow server.

All jobs are submitted at once by the module fixture so that they share the two cores; each
test then waits for its own job: (a) a training job runs to completion, (b) a job warned with
USR1 mid-training checkpoints, requeues itself and resumes into the same MLflow run, (c) a
3-task sweep array gives one MLflow run per task under one tag. The warned job holds right after
a given optimizer step (PIPELINE_HOLD_AT_STEP) until a stop request arrives, so USR1 always
lands mid-training.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import config_path
from mlflow_server import MlflowServer, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
BASELINE = config_path("digits/baseline.yaml")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
REQUEUE = dict(epochs=3, steps=8)
HOLD_REQUEUE = 12  # the warned job holds after this step, mid-way through its second epoch


def tiny(digits_root: Path, experiment: str, epochs: int, steps: int) -> list[str]:
    return [f"data.root={digits_root}", "model.name=cifar_resnet8", f"schedule.epochs={epochs}",
            f"engine.max_steps_per_epoch={steps}", "data.batch_size=16",
            "data.val_batch_size=120", "engine.log_every=1", "checkpoint.every_minutes=0",
            f"tracking.experiment={experiment}"]


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports (node i's slurmd listens on the i-th)."""
    while True:
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as s:
                    s.bind(("", port))
            return first
        except OSError:
            continue


class Cluster:
    """A slurm/testcluster.sh cluster of ``nodes`` nodes in its own directory, on free ports."""

    def __init__(self, root: Path, nodes: int = 1):
        self.root = root
        self.nodes = nodes
        self.dir = root / "slurm"
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, TESTCLUSTER_DIR=str(self.dir),
                        TESTCLUSTER_CTLD_PORT=str(free_port()),
                        TESTCLUSTER_SLURMD_PORT=str(free_ports(nodes)),
                        SLURM_CONF=str(self.conf))

    def script(self, *args: str) -> str:
        out = subprocess.run(["bash", str(SLURM / "testcluster.sh"), *args], env=self.env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stderr

    def start(self) -> None:
        self.script("start", "--nodes", str(self.nodes))

    def stop(self) -> None:
        self.script("stop")

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> str:
        out = subprocess.run(cmd, cwd=cwd, env=env or self.env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, f"{cmd}: {out.stdout}{out.stderr}"
        return out.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record: the job, or an array's task)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        return wait_until(lambda: (j := self.job(job_id))["JobState"] in TERMINAL and j,
                          timeout, f"job {job_id} to end", interval=1.0)

    def wait_for_line(self, log: Path, job_id: str, text: str, timeout: float = 900) -> None:
        """Until the job's log holds ``text``; fails at once if the job ends without it."""
        def seen() -> bool:
            if log.is_file() and text in log.read_text():
                return True
            state = self.job(job_id)["JobState"]
            assert state not in TERMINAL, f"job {job_id} ended ({state}) before {text!r}: " + (
                log.read_text()[-3000:] if log.is_file() else "no log")
            return False

        wait_until(seen, timeout, f"{text!r} in {log.name}", interval=0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not (shutil.which("slurmctld") or os.geteuid() == 0):
        pytest.skip("SLURM is not installed and installing it needs root")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(cluster, server, digits_root, tmp_path_factory):
    """Submit every job of this module; returns their ids, the submit dir and the env."""
    work = tmp_path_factory.mktemp("submit")
    env, sbatch = submitter(cluster, server, work)
    sweep = work / "sweep.txt"
    sweep.write_text("# every line is one run of the array\n" + "".join(
        f"{BASELINE} optim.lr={lr}\n" for lr in (0.05, 0.1, 0.2)))
    ids = {
        "requeue": sbatch(str(SLURM / "train.sbatch"), BASELINE, "name=requeued",
                          *tiny(digits_root, "slurm-requeue", **REQUEUE), hold=HOLD_REQUEUE),
        "sweep": sbatch("--array=0-2", str(SLURM / "sweep.sbatch"), str(sweep),
                        *tiny(digits_root, "slurm-sweep", 1, 2)).split(";")[0],
        "single": sbatch(str(SLURM / "train.sbatch"), BASELINE, "name=single",
                         *tiny(digits_root, "slurm-single", 2, 3)),
    }
    return ids, work, env



def submitter(cluster: Cluster, server: MlflowServer, work: Path, *options: str):
    """The environment of jobs submitted from ``work`` (logs in ``work/logs``, tracking on
    ``server``) and ``sbatch(*args, hold=None) -> job id``: a job held at optimizer step
    ``hold`` (PIPELINE_HOLD_AT_STEP) when given."""
    (work / "logs").mkdir()
    env = dict(cluster.env, MLFLOW_TRACKING_URI=server.url, DS_ACCELERATOR="cpu",
               PATH=f"{venv_commands(work / 'bin')}:{os.environ['PATH']}")
    env.pop("PIPELINE_HOLD_AT_STEP", None)

    def sbatch(*args: str, hold: int | None = None) -> str:
        job_env = dict(env, PIPELINE_HOLD_AT_STEP=str(hold)) if hold else env
        return cluster.run("sbatch", "--parsable", *options, *args, cwd=work,
                           env=job_env).strip()

    return env, sbatch

def venv_commands(bin_dir: Path) -> Path:
    """A directory with just the venv's `python` and `torchrun`, as the jobs' PATH head. Not
    the whole venv bin: its ninja (1.13) and the system's (1.11) hash build commands
    differently, and alternating them rebuilds DeepSpeed's JIT extension every time."""
    bin_dir.mkdir()
    for name in ("python", "torchrun"):
        target = Path(sys.executable).with_name(name)
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def finals(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith('{"event": "final"')]


@pytest.mark.unit
def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    scripts = [str(p) for p in sorted(SLURM.iterdir()) if p.suffix in (".sbatch", ".sh")]
    out = subprocess.run([shellcheck, "--severity=warning", "--shell=bash", *scripts],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.cluster
def test_sbatch_accepts_the_scripts(cluster, tmp_path):
    (tmp_path / "logs").mkdir()
    for args in (["--nodes=1", str(SLURM / "train.sbatch"), BASELINE],
                 ["--array=0-2", str(SLURM / "sweep.sbatch"), "sweep.txt"]):
        out = subprocess.run(["sbatch", "--test-only", *args], cwd=tmp_path, env=cluster.env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "to start at" in out.stderr, out.stderr


@pytest.mark.cluster
def test_a_warned_job_checkpoints_requeues_and_resumes_into_the_same_run(cluster, server,
                                                                         jobs):
    ids, work, env = jobs
    job_id = ids["requeue"]
    client = MlflowClient(server.url)
    cluster.wait_for_line(work / "logs" / f"pipeline-{job_id}.out", job_id,
                          f"holding at step {HOLD_REQUEUE}")
    [run] = client.search_runs([client.get_experiment_by_name("slurm-requeue").experiment_id])
    # What SLURM sends at --signal=B:USR1@… before the time limit, sent now.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id, env=env)
    job = cluster.wait(job_id, 600)
    log = (work / "logs" / f"pipeline-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert job["Restarts"] == "1", log[-3000:]
    assert "USR1: training checkpoints" in log and "requeueing job" in log
    assert "restart 0:" in log and "restart 1:" in log and "resumed from" in log

    [final] = finals(work / "logs" / f"pipeline-{job_id}.out")
    epochs, steps = REQUEUE["epochs"], REQUEUE["steps"]
    assert final["epochs"] == epochs and final["run_id"] == run.info.run_id
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for key in finished.data.metrics:
        history = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(history) == len(set(history)), f"{key} logged a step twice: {history}"
    loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss_steps == list(range(1, epochs * steps + 1))
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert val_steps == [steps * (e + 1) for e in range(epochs)]


@pytest.mark.cluster
def test_a_training_job_completes_with_its_run_in_mlflow(cluster, server, jobs):
    ids, work, _ = jobs
    job = cluster.wait(ids["single"], 600)
    log = work / "logs" / f"pipeline-{ids['single']}.out"
    assert job["JobState"] == "COMPLETED", log.read_text()[-3000:]
    [final] = finals(log)
    assert final["epochs"] == 2 and "training finished" in log.read_text()
    run = MlflowClient(server.url).get_run(final["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == ids["single"] and run.data.tags["world_size"] == "1"
    assert run.data.metrics["val/top1"] == pytest.approx(final["val_top1"])


@pytest.mark.cluster
def test_a_sweep_array_gives_one_run_per_task_under_one_tag(cluster, server, jobs):
    ids, work, _ = jobs
    array_id = ids["sweep"]
    tasks = [cluster.wait(f"{array_id}_{task}", 900) for task in range(3)]
    logs = [work / "logs" / f"sweep-{array_id}_{task}.out" for task in range(3)]
    for task, log in zip(tasks, logs):
        assert task["JobState"] == "COMPLETED", log.read_text()[-3000:]
        assert len(finals(log)) == 1
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("slurm-sweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{array_id}'")
    assert len(runs) == 3
    by_task = {r.data.tags["sweep_task"]: r for r in runs}
    assert set(by_task) == {"0", "1", "2"}
    for task, lr in zip("012", ("0.05", "0.1", "0.2")):
        run = by_task[task]
        assert run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == lr
        assert run.info.run_name == f"baseline optim.lr={lr}"
        assert run.data.params["name"] == f"sweep-{array_id}-{task}"
