"""Multi-node without a cluster: two torchrun agents (--nnodes=2, c10d rendezvous on
127.0.0.1, one process each), as two nodes sharing a filesystem would run them.

One scenario, in order: the two agents form one world of 2 and train; one "node" is lost
(SIGKILL of its agent and its rank) right after the first epoch's checkpoint; the
other ends with a clear error within a timeout instead of hanging; a restart of both resumes
from the last checkpoint into the same MLflow run and finishes with identical weights on both
ranks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.distributed import TCPStore

from conftest import config_path
from mlflow_server import stop_group

pytestmark = pytest.mark.e2e

BASELINE = config_path("digits/baseline.yaml")
EPOCHS, STEPS = 3, 6
FAILURE_TIMEOUT = 180  # seconds the surviving agent may take to give up

# Runs the training of `pipeline train` and then saves this rank's final weights, so the test
# can compare what every rank holds (DeepSpeed saves the module from rank 0 only).
# With LOSE_NODE_AT=<file>, the rank loses its whole "node" (its agent and itself, SIGKILL) the
# moment that file appears: no race between the test's polling and a run that lasts seconds.
WORKER = """\
import logging, os, signal, sys, threading, time
import torch
from pipeline.config import load_config
from pipeline.engine.trainer import Run


def lose_node_when(path):
    while not os.path.exists(path):
        time.sleep(0.02)
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


logging.basicConfig(level=logging.INFO)  # as the CLI does: the resume is logged at INFO
if os.environ.get("LOSE_NODE_AT"):
    threading.Thread(target=lose_node_when, args=(os.environ["LOSE_NODE_AT"],), daemon=True).start()
run = Run(load_config(sys.argv[1], sys.argv[2:]))
code = run.execute()
if code == 0:
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    torch.save(state, f"weights-rank{os.environ['RANK']}.pt")
sys.exit(code)
"""


@pytest.fixture
def rendezvous_store():
    """The c10d rendezvous store, hosted by the test on a port it binds itself (port 0) before
    any agent starts: the agents only connect to it (is_host=false). No port is picked and
    hoped free, and no agent has to start first."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    yield store
    del store


def start_agents(cwd: Path, store: TCPStore, overrides: list[str],
                 lose_node_1_at: Path | None = None) -> list[subprocess.Popen]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LOSE_NODE_AT", None)
    attempt = len(list(cwd.glob("agent0.*")))  # a fresh rendezvous id for each start
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{store.port}",
           "--rdzv_conf=is_host=false", f"--rdzv_id=test-{store.port}-{attempt}",
           "--max_restarts=0", "worker.py", BASELINE, *overrides]
    agents = []
    for node in range(2):
        node_env = dict(env, LOSE_NODE_AT=str(lose_node_1_at)) if node and lose_node_1_at \
            else env
        agents.append(subprocess.Popen(
            cmd, cwd=cwd, env=node_env, start_new_session=True, text=True,
            stdout=(cwd / f"agent{node}.out").open("a"),
            stderr=(cwd / f"agent{node}.err").open("a")))
    return agents


def finals(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.startswith('{"event": "final"')]


def test_two_agents_train_as_one_world_survive_a_lost_agent_and_resume(tmp_path, digits_root,
                                                                      rendezvous_store):
    (tmp_path / "worker.py").write_text(WORKER)
    overrides = [f"data.root={digits_root}", "model.name=cifar_resnet8",
                 f"schedule.epochs={EPOCHS}", f"engine.max_steps_per_epoch={STEPS}",
                 "data.batch_size=16", "data.val_batch_size=90", "engine.log_every=1",
                 "checkpoint.every_minutes=0", "tracking.experiment=two-agents"]
    index = tmp_path / "runs" / "digits-baseline" / "checkpoints" / "index.json"

    agents = start_agents(tmp_path, rendezvous_store, overrides, lose_node_1_at=index)
    try:
        agents[1].wait(600)  # node 1 is lost once the first checkpoint is there
        assert index.is_file() and agents[1].returncode == -signal.SIGKILL, \
            (tmp_path / "agent1.err").read_text()[-3000:]
        # a hang would outlast this by far: the survivor's next collective fails at once
        survivor = agents[0].wait(FAILURE_TIMEOUT)
    finally:
        for agent in agents:
            stop_group(agent, grace=5)
    err = (tmp_path / "agent0.err").read_text()
    assert survivor != 0, err[-3000:]
    assert "ChildFailedError" in err or "RendezvousConnectionError" in err, err[-3000:]
    assert not finals(tmp_path / "agent0.out")
    checkpoints = json.loads(index.read_text())["tags"]
    assert checkpoints and all(t.startswith("epoch") for t in checkpoints)

    agents = start_agents(tmp_path, rendezvous_store, overrides)
    try:
        codes = [a.wait(600) for a in agents]
    finally:
        for agent in agents:
            stop_group(agent, grace=5)
    logs = [(tmp_path / f"agent{n}.err").read_text() for n in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    resumed = [line for line in "".join(logs).splitlines() if "resumed from" in line]
    assert any(checkpoints[-1] in line for line in resumed), resumed
    outs = [finals(tmp_path / f"agent{n}.out") for n in range(2)]
    [final] = outs[0] + outs[1]  # printed by rank 0 only
    assert final["epochs"] == EPOCHS

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(final["run_id"])
    assert run.data.tags["world_size"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the restart continued it
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, EPOCHS * STEPS + 1))

    weights = [torch.load(tmp_path / f"weights-rank{r}.pt") for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    different = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not different, f"ranks disagree on {different}"
