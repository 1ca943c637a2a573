#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests and for trying the sbatch
# scripts by hand (root needed: it installs packages and runs the daemons).
#
#   slurm/testcluster.sh start    install slurm-wlm + munge if missing, write slurm.conf, start
#                                 munged, slurmctld and slurmd, wait until the node is idle
#   slurm/testcluster.sh stop     stop the daemons this script started (by their pid files)
#   slurm/testcluster.sh env      print the line that points the SLURM commands at the cluster
#
# Everything lives in $TESTCLUSTER_DIR (default /tmp/pipeline-slurm): slurm.conf, state,
# spool, logs and pid files. Commands find the cluster through SLURM_CONF:
#   eval "$(slurm/testcluster.sh env)"; sbatch slurm/train.sbatch configs/digits/baseline.yaml
set -euo pipefail

DIR=${TESTCLUSTER_DIR:-/tmp/pipeline-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
CPUS=$(nproc)
CTLD_PORT=${TESTCLUSTER_CTLD_PORT:-6817}
SLURMD_PORT=${TESTCLUSTER_SLURMD_PORT:-6818}
# munged runs as user munge: its files go where that user can reach (DIR may sit under a
# private directory, as pytest's temporary directories do), one directory per cluster.
MUNGE_DIR=/tmp/pipeline-munge-$(printf %s "$DIR" | md5sum | cut -c1-12)
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
# A requeued job may start again only after the job credential lifetime (AuthInfo
# cred_expire, 120 s by default). The test cluster shortens it so a requeue restarts at once.
CRED_EXPIRE=${TESTCLUSTER_CRED_EXPIRE:-5}

say() { echo "testcluster: $*" >&2; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || { say "need root to install ${missing[*]}"; exit 1; }
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Single-node test cluster written by slurm/testcluster.sh
ClusterName=pipeline-test
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Schedule every second (defaults 30 s and 60 s): a requeued job starts when BeginTime passes.
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    pid_alive "$MUNGE_DIR/munged.pid" && return
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND…
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { say "timed out waiting for $what"; return 1; }
        sleep 0.5
    done
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T)
    [[ $state == idle* || $state == mixed* || $state == allocated* ]]
}

start() {
    install_packages
    write_conf
    export SLURM_CONF=$CONF
    start_munge
    wait_for 10 munged test -S "$MUNGE_SOCKET"
    # -c: a fresh state (no jobs left from an earlier run); -i: ignore stale node state.
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" -c -i
    wait_for 30 slurmctld scontrol ping
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
    if ! wait_for 60 "node $NODE" node_ready; then
        tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2
        exit 1
    fi
    say "up: node $NODE, $CPUS CPUs; export SLURM_CONF=$CONF"
}

stop_daemon() {  # stop_daemon PIDFILE NAME
    local pidfile=$1 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    say "$2 ($pid) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    stop_daemon "$DIR/slurmd.pid" slurmd
    stop_daemon "$DIR/slurmctld.pid" slurmctld
    stop_daemon "$MUNGE_DIR/munged.pid" munged
    rm -rf "$MUNGE_DIR"
    say "stopped"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
