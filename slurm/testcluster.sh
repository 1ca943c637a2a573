#!/usr/bin/env bash
# A real SLURM cluster on this machine, for the tests and for trying the sbatch scripts by hand
# (root needed: it installs packages, runs the daemons and, for several nodes, edits /etc/hosts).
#
#   slurm/testcluster.sh start [--nodes N]
#        install slurm-wlm + munge if missing, write slurm.conf, start munged, slurmctld and the
#        slurmd daemons, wait until every node is idle. N=1 (default): one node named after
#        this host. N≥2: nodes n1…nN, one slurmd each (`slurmd -N n<i>`), at 127.0.0.<i> on
#        port SLURMD_PORT+i-1, their names added to /etc/hosts (the jobs' torchrun resolves
#        the first node's name). Starting again with the same N changes nothing; another N
#        restarts slurmctld and the slurmds (and forgets the cluster's jobs).
#   slurm/testcluster.sh stop
#        stop the daemons this script started (by their pid files, checked against their
#        command lines) and remove the /etc/hosts lines it added
#   slurm/testcluster.sh env
#        print the line that points the SLURM commands at the cluster
#
# Everything lives in $TESTCLUSTER_DIR (default /tmp/pipeline-slurm): slurm.conf, state,
# spool, logs and pid files. Commands find the cluster through SLURM_CONF:
#   eval "$(slurm/testcluster.sh env)"; sbatch slurm/train.sbatch configs/digits/baseline.yaml
set -euo pipefail

DIR=${TESTCLUSTER_DIR:-/tmp/pipeline-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF  # sinfo, squeue, scancel below: this cluster
HOST=$(hostname -s)
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
HOSTS=/etc/hosts
# Ends every /etc/hosts line this cluster adds: `stop` removes exactly those.
HOSTS_MARK="# added by slurm/testcluster.sh for $DIR"

say() { echo "testcluster: $*" >&2; }
die() { say "$*"; exit 1; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ $(id -u) -eq 0 ]] || die "need root to install ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

node_names() {  # node_names N
    if (($1 == 1)); then echo "$HOST"; else seq -f "n%g" 1 "$1"; fi
}

node_lines() {  # node_lines N: the NodeName lines of slurm.conf
    if (($1 == 1)); then
        echo "NodeName=$HOST CPUs=$CPUS State=UNKNOWN"
        return
    fi
    # Every node declares all of the machine's CPUs: the nodes share them, so two-node jobs
    # (one CPU on each node) can run side by side, as one-node jobs do on a single node.
    local i
    for ((i = 1; i <= $1; i++)); do
        echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.$i" \
            "Port=$((SLURMD_PORT + i - 1)) CPUs=$CPUS State=UNKNOWN"
    done
}

write_conf() {  # write_conf N FILE
    cat >"$2" <<EOF
# $1-node test cluster written by slurm/testcluster.sh
ClusterName=pipeline-test
SlurmctldHost=$HOST
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
# %n: the node's name, so that several slurmd daemons on this machine keep apart.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
$(node_lines "$1")
PartitionName=debug Nodes=$(node_names "$1" | paste -sd,) Default=YES MaxTime=INFINITE State=UP
EOF
}

# ------------------------------------------------------------------------------ /etc/hosts
hosts_address() {  # hosts_address NAME: the address /etc/hosts gives NAME (the first line wins)
    awk -v name="$1" '{sub(/#.*/, "")}
        {for (i = 2; i <= NF; i++) if ($i == name) {print $1; exit}}' "$HOSTS"
}

hosts_sync() {  # hosts_sync N: nodes n1…nN (N≥2) resolve to 127.0.0.i; our other lines go
    local keep=" " tmp addr i
    if (($1 > 1)); then keep=" $(node_names "$1" | paste -sd' ') "; fi
    if grep -qF -- "$HOSTS_MARK" "$HOSTS"; then
        tmp=$(mktemp)
        awk -v mark="$HOSTS_MARK" -v keep="$keep" '
            {n = length($0) - length(mark) + 1}
            n > 0 && substr($0, n) == mark && index(keep, " " $2 " ") == 0 {next}
            {print}' "$HOSTS" >"$tmp"
        # In place, not by renaming: /etc/hosts may be a bind mount (containers).
        cmp -s "$tmp" "$HOSTS" || cat "$tmp" >"$HOSTS"
        rm -f "$tmp"
    fi
    for ((i = 1; i <= $1 && $1 > 1; i++)); do
        addr=$(hosts_address "n$i")
        [[ $addr == "127.0.0.$i" ]] && continue
        [[ -z $addr ]] || die "$HOSTS maps n$i to $addr; the test cluster needs 127.0.0.$i"
        [[ -z $(tail -c 1 "$HOSTS") ]] || echo >>"$HOSTS"
        echo "127.0.0.$i n$i $HOSTS_MARK" >>"$HOSTS"
    done
}

# ------------------------------------------------------------------------------- daemons
# A pid file names a live daemon of this cluster only while that process's command line
# still holds what it was started with (the conf path, munge's socket): a reused pid is not ours.
pid_alive() {  # pid_alive PIDFILE PATTERN
    local pid
    [[ -f $1 ]] || return 1
    pid=$(cat "$1")
    [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$2"
}

start_munge() {
    pid_alive "$MUNGE_DIR/munged.pid" "$MUNGE_SOCKET" && return
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

nodes_ready() {  # nodes_ready N: all N nodes idle (or running jobs)
    local ready
    ready=$(sinfo -h -N -o %T | grep -cE '^(idle|mixed|allocated)')
    ((ready == $1))
}

live() {  # live PID…: those still running (a zombie that no init reaps is not)
    local pid state
    for pid; do
        state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
        if [[ -n $state && $state != [ZX] ]]; then echo "$pid"; fi
    done
}

stop_daemons() {  # stop_daemons PATTERN PIDFILE…: SIGTERM to all at once, SIGKILL after 10 s
    local pattern=$1 pidfile pids=() left
    shift
    for pidfile; do
        if pid_alive "$pidfile" "$pattern"; then pids+=("$(cat "$pidfile")"); fi
    done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 40); do
        left=$(live "${pids[@]}")
        [[ -n $left ]] || return 0
        sleep 0.25
    done
    say "ignored SIGTERM, killed: $(echo "$left" | paste -sd' ')"
    # shellcheck disable=SC2086  # one pid per word
    kill -KILL $left 2>/dev/null || true
}

jobs_gone() { [[ -z $(squeue -h -o %i) ]]; }

cancel_jobs() {  # a job's processes outlive the daemons: end the jobs first
    local jobs
    pid_alive "$DIR/slurmctld.pid" "$CONF" || return 0
    jobs=$(squeue -h -o %i) || return 0
    [[ -n $jobs ]] || return 0
    say "cancelling the cluster's jobs: $(echo "$jobs" | paste -sd' ')"
    # shellcheck disable=SC2086  # one job id per word
    scancel $jobs || true
    wait_for 60 "the jobs to end" jobs_gone || true
}

stop_slurm() {  # the cluster's jobs, then slurmctld and every node's slurmd
    cancel_jobs
    stop_daemons "$CONF" "$DIR/slurmctld.pid" "$DIR"/slurmd*.pid  # slurmd.pid: older clusters
}

start() {  # start N
    local n=$1 node
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    write_conf "$n" "$CONF.new"
    if [[ -f $CONF ]] && ! cmp -s "$CONF.new" "$CONF"; then
        say "slurm.conf changes (node count or ports): restarting slurmctld and slurmd"
        stop_slurm
    fi
    mv "$CONF.new" "$CONF"
    hosts_sync "$n"
    start_munge
    wait_for 10 munged test -S "$MUNGE_SOCKET"
    # -c: a fresh state (no jobs left from an earlier run); -i: ignore stale node state.
    pid_alive "$DIR/slurmctld.pid" "$CONF" || slurmctld -f "$CONF" -c -i
    wait_for 30 slurmctld scontrol ping
    for node in $(node_names "$n"); do
        pid_alive "$DIR/slurmd-$node.pid" "$CONF" && continue
        if ((n == 1)); then slurmd -f "$CONF"; else slurmd -f "$CONF" -N "$node"; fi
    done
    if ! wait_for 60 "$n node(s)" nodes_ready "$n"; then
        sinfo -N >&2 || true
        tail -n 20 "$DIR"/log/*.log >&2
        exit 1
    fi
    say "up: $(node_names "$n" | paste -sd' '), $CPUS CPUs each; export SLURM_CONF=$CONF"
}

stop() {
    stop_slurm
    stop_daemons "$MUNGE_SOCKET" "$MUNGE_DIR/munged.pid"
    rm -rf "$MUNGE_DIR"
    hosts_sync 1
    say "stopped"
}

usage() { echo "usage: $0 start [--nodes N] | stop | env" >&2; exit 2; }

case ${1:-} in
    start)
        if (($# == 1)); then
            start 1
        elif (($# == 3)) && [[ $2 == --nodes && $3 =~ ^[1-9][0-9]*$ ]] && (($3 <= 254)); then
            start "$3"  # node i at 127.0.0.i
        else
            usage
        fi
        ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) usage ;;
esac
