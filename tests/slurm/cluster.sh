#!/bin/bash
# Start or stop a real one-node Slurm cluster on this machine, for the tests.
#
#   tests/slurm/cluster.sh start   # installs slurm-wlm + munge if missing (needs root)
#   tests/slurm/cluster.sh stop    # stops the daemons this script started, by PID file
#   tests/slurm/cluster.sh status
#
# State, spool, logs and slurm.conf live in $MPIATTN_SLURM_DIR (default
# /tmp/mpiattn-slurm). After `start`, `source $MPIATTN_SLURM_DIR/env` sets
# SLURM_CONF so that sbatch/squeue/sinfo talk to this cluster.
set -euo pipefail

DIR=${MPIATTN_SLURM_DIR:-/tmp/mpiattn-slurm}
CTLD_PORT=${MPIATTN_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${MPIATTN_SLURMD_PORT:-6818}
# task/affinity binds tasks to cores, as many sites do; task/none does not.
TASK_PLUGIN=${MPIATTN_SLURM_TASKPLUGIN:-task/none}
MUNGE_PID=/run/munge/munged.pid

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge missing and not root: cannot apt-get install"
    log "installing slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munge already running; reusing it"
        return
    fi
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (the munge package creates it)"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- munged
    touch "$DIR/started-munge"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up"
}

write_conf() {
    local host node
    host=$(uname -n)
    host=${host%%.*}
    # First line of `slurmd -C` is this machine's NodeName=... CPUs=... line.
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$DIR/slurm.conf" <<CONF
ClusterName=mpiattn-test
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=${TASK_PLUGIN}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
${node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    printf 'export SLURM_CONF=%q\n' "$DIR/slurm.conf" >"$DIR/env"
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
        die "a cluster from $DIR is already running; run '$0 stop' first"
    fi
    install_packages
    rm -rf "$DIR"
    mkdir -p "$DIR"
    start_munge
    write_conf
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -c   # -c: start clean, ignore saved state
    slurmd
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        if [[ $state == idle ]]; then
            log "node idle; export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.2
    done
    log "node not idle after 30 s (state: '${state}'); logs follow"
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    stop
    exit 1
}

kill_pidfile() {
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$f"
}

stop() {
    kill_pidfile "$DIR/slurmd.pid"
    kill_pidfile "$DIR/slurmctld.pid"
    if [[ -e $DIR/started-munge ]]; then
        kill_pidfile "$MUNGE_PID"
        rm -f "$DIR/started-munge"
    fi
    log "stopped"
}

status() {
    alive "$DIR/slurmctld.pid" || { echo "not running"; return 1; }
    SLURM_CONF=$DIR/slurm.conf sinfo -N
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
