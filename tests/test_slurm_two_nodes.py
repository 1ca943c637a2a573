"""`sbatch --nodes=2` for real: a two-node SLURM cluster on this machine (slurm/testcluster.sh
--nodes 2: slurmd n1 at 127.0.0.1 and n2 at 127.0.0.2, their names in /etc/hosts), logging to a
real MLflow server. train.sbatch starts one torchrun agent per node; the two form one world.

The first test switches a cluster of its own between one and two nodes and checks that `stop`
leaves the machine as it found it. The module fixture then submits every job at once (two
two-node jobs fit side by side) and each test waits for its own. A job that a test signals holds
right after a given optimizer step (PIPELINE_HOLD_AT_STEP) until a stop request arrives, so the
signal always lands mid-training: (a) scancel stops both agents and leaves no process of the job
on either node; (b) USR1 to the batch shell: both ranks checkpoint, the job requeues itself and
resumes on two nodes into the same MLflow run, no metric step logged twice; (c) a plain run ends
with the final line, world_size=2 and every validation image counted once; (d) a sweep array
whose tasks each take two nodes.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from collections import Counter
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mlflow_server import MlflowServer, wait_until
from test_slurm import BASELINE, SLURM, Cluster, finals, submitter, tiny

pytestmark = pytest.mark.cluster

HOSTS = Path("/etc/hosts")
NODES = {"n1", "n2"}
HOLD_CANCEL = 2                               # the scancel job holds after this step
REQUEUE = dict(epochs=2, steps=4)
HOLD_REQUEUE = 6                              # mid-way through the second epoch
SWEEP_LRS = ("0.05", "0.1")


def two_node_cluster(root: Path) -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons and /etc/hosts entries need root")
    return Cluster(root, nodes=2)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def daemons(cluster: Cluster) -> dict[str, int]:
    """The cluster's running SLURM daemons by pid file name: slurmctld, slurmd-<node>."""
    pids = {f.stem: int(f.read_text()) for f in cluster.dir.glob("*.pid")}
    return {name: pid for name, pid in pids.items() if running(pid)}


def processes_of(cluster: Cluster) -> list[str]:
    """Command lines of this cluster's daemons still running (munged: by its socket path)."""
    munge = "/tmp/pipeline-munge-" + hashlib.md5(str(cluster.dir).encode()).hexdigest()[:12]
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(cluster.conf) in cmd or munge in cmd:
            left.append(cmd)
    return left


def job_processes(cluster: Cluster, job_id: str) -> dict[str, list[list[str]]]:
    """Command lines of a job's processes on this machine, by node: SLURM puts the job id and
    the node's name in the environment of everything the job runs (SLURM_CONF: this cluster)."""
    found: dict[str, list[list[str]]] = {}
    for proc in psutil.process_iter(["cmdline", "environ"]):
        env = proc.info["environ"] or {}
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_CONF") == str(cluster.conf):
            found.setdefault(env.get("SLURMD_NODENAME", "?"), []).append(proc.info["cmdline"])
    return found


def role(cmdline: list[str]) -> str:
    """'agent' (torchrun), 'rank' (a training process it started) or the program's name."""
    if Path(cmdline[0]).name.startswith("python") and len(cmdline) > 1:
        if Path(cmdline[1]).name == "torchrun":
            return "agent"
        if cmdline[1:5] == ["-u", "-m", "pipeline", "train"]:
            return "rank"
    return Path(cmdline[0]).name


def our_lines(hosts: str, cluster: Cluster) -> list[str]:
    return [line.split("#")[0].strip() for line in hosts.splitlines()
            if line.endswith(f"# added by slurm/testcluster.sh for {cluster.dir}")]


def test_switching_nodes_is_idempotent_and_stop_leaves_the_machine_as_found(tmp_path):
    c = two_node_cluster(tmp_path)
    before = HOSTS.read_text()
    # A line the cluster did not add, naming a node as it would: used as is, and left alone.
    foreign = "127.0.0.2 n2  # written by hand"
    HOSTS.write_text(before + ("" if before.endswith("\n") or not before else "\n") +
                     foreign + "\n")
    with_foreign = HOSTS.read_text()
    try:
        c.script("start", "--nodes", "2")
        two = daemons(c)
        assert set(two) == {"slurmctld", "slurmd-n1", "slurmd-n2"}
        hosts = HOSTS.read_text()
        assert our_lines(hosts, c) == ["127.0.0.1 n1"] and hosts.count(foreign) == 1, hosts
        assert c.run("sinfo", "-h", "-N", "-o", "%N %T").split() == ["n1", "idle", "n2", "idle"]

        c.script("start", "--nodes", "2")  # again: nothing restarts, nothing is added
        assert daemons(c) == two and HOSTS.read_text() == hosts

        c.script("start")  # one node, named after the host: the two slurmd daemons end
        one = daemons(c)
        assert set(one) == {"slurmctld", f"slurmd-{socket.gethostname().split('.')[0]}"}
        assert not set(one.values()) & set(two.values())
        assert not any(running(two[d]) for d in ("slurmd-n1", "slurmd-n2"))
        assert HOSTS.read_text() == with_foreign
        c.script("start")
        assert daemons(c) == one

        c.script("start", "--nodes", "2")
        assert c.run("sinfo", "-h", "-N", "-o", "%N %T").split() == ["n1", "idle", "n2", "idle"]
    finally:
        c.stop()
        after, left = HOSTS.read_text(), processes_of(c)
        HOSTS.write_text(before)
    assert after == with_foreign
    assert not left, left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = two_node_cluster(tmp_path_factory.mktemp("cluster2"))
    hosts = HOSTS.read_text()
    c.start()
    yield c
    c.stop()
    assert HOSTS.read_text() == hosts and not processes_of(c)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow2")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(cluster, server, digits_root, tmp_path_factory):
    """Submit every job of this module with --nodes=2; returns their ids, the submit dir and
    the env."""
    work = tmp_path_factory.mktemp("submit2")
    env, sbatch = submitter(cluster, server, work, "--nodes=2")
    train = str(SLURM / "train.sbatch")
    sweep = work / "sweep.txt"
    sweep.write_text("".join(f"{BASELINE} optim.lr={lr}\n" for lr in SWEEP_LRS))
    ids = {  # the held jobs first: their tests come first and release them
        "cancel": sbatch(train, BASELINE, "name=cancelled",
                         *tiny(digits_root, "two-nodes-cancel", 1, 4), hold=HOLD_CANCEL),
        "requeue": sbatch(train, BASELINE, "name=requeued", "checkpoint.keep_last=10",
                          *tiny(digits_root, "two-nodes-requeue", **REQUEUE), hold=HOLD_REQUEUE),
        "single": sbatch(train, BASELINE, "name=single",
                         *tiny(digits_root, "two-nodes-single", 1, 3)),
        "sweep": sbatch(f"--array=0-{len(SWEEP_LRS) - 1}", str(SLURM / "sweep.sbatch"),
                        str(sweep), *tiny(digits_root, "two-nodes-sweep", 1, 2)).split(";")[0],
    }
    return ids, work, env


def test_scancel_stops_both_agents_and_leaves_no_process_on_either_node(cluster, jobs):
    ids, work, env = jobs
    job_id = ids["cancel"]
    log = work / "logs" / f"pipeline-{job_id}.out"
    cluster.wait_for_line(log, job_id, f"holding at step {HOLD_CANCEL}")
    running = job_processes(cluster, job_id)
    assert set(running) == NODES, running
    for node, cmdlines in running.items():
        roles = Counter(role(cmd) for cmd in cmdlines)
        assert roles["agent"] == 1 and roles["rank"] == 1, (node, cmdlines)

    cluster.run("scancel", job_id, env=env)
    job = cluster.wait(job_id, 300)
    assert job["JobState"] == "CANCELLED", log.read_text()[-3000:]
    try:  # SLURM kills what ignores SIGTERM after KillWait (30 s)
        wait_until(lambda: not job_processes(cluster, job_id), 120,
                   f"the processes of job {job_id} to end")
    except TimeoutError:
        pytest.fail(f"job {job_id} left processes behind: {job_processes(cluster, job_id)}")


def test_a_warned_job_checkpoints_on_both_nodes_and_resumes_on_two_into_the_same_run(
        cluster, server, jobs):
    ids, work, env = jobs
    job_id = ids["requeue"]
    log = work / "logs" / f"pipeline-{job_id}.out"
    cluster.wait_for_line(log, job_id, f"holding at step {HOLD_REQUEUE}")
    # What SLURM sends at --signal=B:USR1@… before the time limit, sent now.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id, env=env)
    job = cluster.wait(job_id, 900)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", text[-3000:]
    assert job["NumNodes"] == "2"
    assert "USR1: training checkpoints" in text and "requeueing job" in text
    for restart in (0, 1):
        assert f"restart {restart}: 2 agent(s) x 1 rank(s)" in text, text[-3000:]
    [resumed] = re.findall(r"resumed from (\S+)", text)
    rng_states = sorted(p.name for p in (work / resumed).glob("rng_rank*.pt"))
    assert rng_states == ["rng_rank0.pt", "rng_rank1.pt"], resumed  # one per node's rank

    [final] = finals(log)
    epochs, steps = REQUEUE["epochs"], REQUEUE["steps"]
    assert final["epochs"] == epochs
    client = MlflowClient(server.url)
    run = client.get_run(final["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for key in run.data.metrics:
        history = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(history) == len(set(history)), f"{key} logged a step twice: {history}"
    loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss_steps == list(range(1, epochs * steps + 1))
    val_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1"))
    assert val_steps == [steps * (e + 1) for e in range(epochs)]


def test_a_two_node_job_is_one_world_that_counts_every_val_image_once(cluster, server, jobs,
                                                                      digits_root):
    ids, work, _ = jobs
    job = cluster.wait(ids["single"], 900)
    log = work / "logs" / f"pipeline-{ids['single']}.out"
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", text[-3000:]
    assert job["NumNodes"] == "2" and job["NodeList"] == "n[1-2]"
    assert "2 agent(s) x 1 rank(s)" in text and "training finished" in text
    [final] = finals(log)
    client = MlflowClient(server.url)
    run = client.get_run(final["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["slurm_job_id"] == ids["single"]
    val_images = sum(1 for p in (digits_root / "val").rglob("*") if p.is_file())
    assert val_images == 360
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/samples")] == \
        [val_images]


def test_a_sweep_array_runs_every_task_on_two_nodes(cluster, server, jobs):
    ids, work, _ = jobs
    array_id = ids["sweep"]
    for task in range(len(SWEEP_LRS)):
        job = cluster.wait(f"{array_id}_{task}", 900)
        log = work / "logs" / f"sweep-{array_id}_{task}.out"
        assert job["JobState"] == "COMPLETED", log.read_text()[-3000:]
        assert job["NumNodes"] == "2" and "2 agent(s) x 1 rank(s)" in log.read_text()
        assert len(finals(log)) == 1
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name("two-nodes-sweep")
    runs = client.search_runs([experiment.experiment_id], f"tags.sweep = '{array_id}'")
    assert len(runs) == len(SWEEP_LRS)
    by_task = {r.data.tags["sweep_task"]: r for r in runs}
    for task, lr in enumerate(SWEEP_LRS):
        run = by_task[str(task)]
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        assert run.data.params["optim.lr"] == lr
