#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by slurm/local/up.sh (by the PIDs it recorded).
#   slurm/local/down.sh              # ${STORYMM_SLURM_DIR:-/tmp/storymm-slurm}
#   STORYMM_SLURM_DIR=DIR slurm/local/down.sh --purge   # also delete DIR (state, logs)
set -uo pipefail

# Simulated nodes (up.sh --nodes N): their state dir has nodes.env, or a prefix was given.
NODES_DIR=${STORYMM_SLURM_DIR:-/tmp/storymm-nodes}
if [[ -f $NODES_DIR/nodes.env || -n ${STORYMM_NODES_PREFIX:-} ]]; then
    exec "$(dirname "${BASH_SOURCE[0]}")/down-nodes.sh" "$@"
fi
DIR=${STORYMM_SLURM_DIR:-/tmp/storymm-slurm}
export SLURM_CONF=$DIR/slurm.conf

if [[ -f $SLURM_CONF ]] && command -v scancel >/dev/null; then
    # Running jobs' steps are children of slurmd's stepd processes: cancel them first so no
    # training process outlives the cluster.
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 20); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.5
    done
fi

stop() {  # stop <pidfile>: TERM, wait up to 10 s, then KILL
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
}
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"

if [[ ${1:-} == --purge ]]; then
    rm -rf "$DIR"
fi
echo "down.sh: SLURM under $DIR stopped" >&2
