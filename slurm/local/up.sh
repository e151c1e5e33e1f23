#!/usr/bin/env bash
# A single-node SLURM cluster on this machine: slurmctld + slurmd on localhost, no systemd, no munge
# (auth/none: for trying the scripts and for tests on one machine, never for a shared cluster).
#
#   slurm/local/up.sh                # state under ${STORYMM_SLURM_DIR:-/tmp/storymm-slurm}
#   export SLURM_CONF=/tmp/storymm-slurm/slurm.conf   # printed by this script: eval "$(slurm/local/up.sh)"
#   sbatch slurm/train_gate.sh …; squeue; scontrol show job N
#   slurm/local/down.sh
#
#   slurm/local/up.sh --nodes 2      # N simulated nodes (namespaces) + S3: see up-nodes.sh
#
# Needs Debian's slurm-wlm (`apt-get install -y --no-install-recommends slurm-wlm`) and root (the
# daemons run as SlurmUser=root). The node gets all CPUs of this machine (nproc). Only stdout
# carries the `export` line; progress goes to stderr.
set -euo pipefail

NODES=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) echo "usage: up.sh [--nodes N]" >&2; exit 2 ;;
    esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "up.sh: --nodes takes a positive number" >&2; exit 2; }
if (( NODES > 1 )); then
    NODES=$NODES exec "$(dirname "${BASH_SOURCE[0]}")/up-nodes.sh"
fi

DIR=${STORYMM_SLURM_DIR:-/tmp/storymm-slurm}
# nproc alone honours OMP_NUM_THREADS (a shell with OMP_NUM_THREADS=1 would get a 1-CPU node)
CPUS=${STORYMM_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
WAIT=${STORYMM_SLURM_WAIT:-60}

for bin in slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || PATH=$PATH:/usr/sbin:/sbin
    command -v "$bin" >/dev/null || { echo "up.sh: $bin not found: apt-get install -y --no-install-recommends slurm-wlm" >&2; exit 1; }
done
if [[ $(id -u) -ne 0 ]]; then
    echo "up.sh: run as root (the local daemons use SlurmUser=root)" >&2
    exit 1
fi

mkdir -p "$DIR/state" "$DIR/spool"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
    echo "up.sh: already running under $DIR" >&2
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

cat > "$CONF" <<CONF
# Written by slurm/local/up.sh: one node (this machine), auth/none, no accounting, no systemd.
ClusterName=storymm-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/none
CredType=cred/none
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=${STORYMM_SLURMCTLD_PORT:-6817}
SlurmdPort=${STORYMM_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# setsid: the daemons get their own session, so killing the caller's process group (a test runner,
# a CI step) does not take them along. -D keeps them in the foreground of that session; they write
# their pid files themselves.
setsid slurmctld -D -i -f "$CONF" >>"$DIR/slurmctld.out" 2>&1 < /dev/null &
setsid slurmd -D -N localhost -f "$CONF" >>"$DIR/slurmd.out" 2>&1 < /dev/null &

deadline=$((SECONDS + WAIT))
state=""
until [[ $state == idle* || $state == mixed* || $state == allocated* ]]; do
    if (( SECONDS >= deadline )); then
        echo "up.sh: node not idle after ${WAIT}s (state '${state:-none}'); logs: $DIR/slurmctld.log $DIR/slurmd.log" >&2
        tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" "$DIR/slurmctld.out" "$DIR/slurmd.out" >&2 || true
        exit 1
    fi
    sleep 0.5
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
done
echo "up.sh: SLURM up under $DIR (node localhost, $CPUS CPUs, partition debug)" >&2
echo "export SLURM_CONF=$CONF"
