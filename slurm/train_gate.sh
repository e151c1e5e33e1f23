#!/usr/bin/env bash
# Data-parallel training of the gate model under SLURM: one `accelerate launch` per node (srun, one
# task per node) starting one process per GPU, or per CPU slot when the job asks for no GPU. A job
# that asks for GPUs torch cannot use (driver too old for its CUDA build) stops with one line.
#
#   sbatch slurm/train_gate.sh DATA_URI RUN_URI [extra `storymm train` args...]
#   DATA_URI=s3://storymm/data/sr RUN_URI=s3://storymm/runs/gate-seq sbatch --nodes=4 slurm/train_gate.sh
#
# Submit from the repository root (or set STORYMM_REPO). Environment (all optional except the URIs):
#   DATA_URI, RUN_URI        prepared dataset and run directory (or the first two arguments)
#   CONFIG                   default configs/gate.yaml
#   STAGE                    visual_ae | text_ae | sequence (default sequence)
#   INIT_FROM                space-separated visual_ae/text_ae run URIs for the sequence stage
#   STORYMM_TRAIN_ARGS       extra `storymm train` arguments, e.g. "--set train.sequence.steps=5000"
#   STORYMM_PROCS_PER_NODE   processes per node when there is no GPU (default 1)
#   STORYMM_TORCH_THREADS    torch threads per process (default: --cpus-per-task / processes per node)
#   MAIN_PORT                rendezvous port (default 20000 + job id % 20000; + 1 per restart)
#   ACCELERATE               the accelerate executable (default: .venv/bin/accelerate, else PATH)
#   STORYMM_MAX_RESTARTS     relaunches after a failed step within one run of the job (default 3)
#   STORYMM_MIN_NODES        fewer usable nodes than this: requeue instead of relaunching (default 1)
#   STORYMM_PROBE_TIMEOUT    seconds a node has to run a probe step before it counts as lost (default 30)
#
# Preemption / time limit: SLURM sends SIGUSR1 to every process of the job step 120 s before the
# limit (`--signal=USR1@120`; `scancel --signal=USR1 JOBID` does the same by hand). Every training
# process notices it; all ranks stop at the same step, write a checkpoint with status "stopped",
# touch $STORYMM_STOPPED_MARKER and exit 0. This script then runs `scontrol requeue`; the requeued
# job reruns the same command and the loop resumes from the run's `latest` checkpoint. If the signal
# is sent to the batch shell only (`--signal=B:USR1@120`, `scancel --batch`), the trap below
# forwards it to the job step.
#
# Hangs, crashed ranks and lost nodes (docs/slurm.md, "Failures without an operator"): `--no-kill`
# keeps the allocation when a node fails. When the step fails, each rank has left its exit code in
# $STORYMM_OUTCOME_DIR (0 completed, 2 error, 75 stopped, 85 hung: its watchdog wrote an incident to
# RUN/incidents/; none: killed or crashed). A rank that reported an error (2) ends the job: a restart
# would repeat it. Otherwise the script checks every node of the step (SLURM state, then a probe step
# within STORYMM_PROBE_TIMEOUT) and relaunches on the nodes that answer: all of them after a hang or
# a crashed rank, the ones left after a lost node (same global batch, fewer ranks). One line per
# decision, starting "storymm: decision:". Fewer than STORYMM_MIN_NODES left: requeue.
#
#SBATCH --job-name=storymm-gate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --no-kill
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=storymm-gate-%j.out
set -euo pipefail

REPO=${STORYMM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
[[ -f jobs/train.py ]] || { echo "train_gate.sh: $REPO is not the storymm repository (set STORYMM_REPO)" >&2; exit 2; }

DATA_URI=${1:-${DATA_URI:-}}
RUN_URI=${2:-${RUN_URI:-}}
shift $(( $# < 2 ? $# : 2 ))
if [[ -z $DATA_URI || -z $RUN_URI ]]; then
    echo "train_gate.sh: give DATA_URI and RUN_URI (arguments or environment)" >&2
    exit 2
fi
CONFIG=${CONFIG:-configs/gate.yaml}
STAGE=${STAGE:-sequence}
if [[ -z ${ACCELERATE:-} ]]; then
    if [[ -x .venv/bin/accelerate ]]; then ACCELERATE=$PWD/.venv/bin/accelerate; else ACCELERATE=accelerate; fi
fi

# --------------------------------------------------------------------- topology from SLURM
JOB_ID=${SLURM_JOB_ID:?run this script with sbatch}
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
BASE_PORT=${MAIN_PORT:-$(( 20000 + JOB_ID % 20000 ))}
MAX_RESTARTS=${STORYMM_MAX_RESTARTS:-3}
MIN_NODES=${STORYMM_MIN_NODES:-1}
PROBE_TIMEOUT=${STORYMM_PROBE_TIMEOUT:-30}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
if (( GPUS_PER_NODE > 0 )); then
    # GPUs were asked for: use them, or stop here with one line saying why torch cannot (e.g. a driver
    # older than the CUDA build of torch needs) and what to install; never train on the CPU instead.
    if [[ -x ${ACCELERATE%/accelerate}/python ]]; then PYTHON=${ACCELERATE%/accelerate}/python; else PYTHON=python3; fi
    "$PYTHON" -m storymm.training.devices --require "$GPUS_PER_NODE" \
        --asked "SLURM_GPUS_ON_NODE=$GPUS_PER_NODE (sbatch --gpus-per-node)" >/dev/null || exit 2
fi
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
if (( GPUS_PER_NODE > 0 )); then
    PROCS_PER_NODE=$GPUS_PER_NODE
    unset ACCELERATE_USE_CPU
else
    PROCS_PER_NODE=${STORYMM_PROCS_PER_NODE:-1}
    # `--cpu` would silently start ONE process; ACCELERATE_USE_CPU + --multi_gpu starts them all (gloo).
    export ACCELERATE_USE_CPU=true
fi
# The task's CPUs shared by the node's processes (accelerate launch would give GPU processes 1 thread).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / PROCS_PER_NODE > 0 ? CPUS_PER_TASK / PROCS_PER_NODE : 1 ))}
TRAIN=(--config "$CONFIG" --backend accelerate --stage "$STAGE" --data "$DATA_URI" --run "$RUN_URI")
[[ -n ${INIT_FROM:-} ]] && TRAIN+=(--init-from $INIT_FROM)
# shellcheck disable=SC2206 # word splitting of STORYMM_TRAIN_ARGS is intended
TRAIN+=(${STORYMM_TRAIN_ARGS:-} "$@")

export STORYMM_STOPPED_MARKER=${TMPDIR:-/tmp}/storymm-stopped-$JOB_ID
export STORYMM_OUTCOME_DIR=${TMPDIR:-/tmp}/storymm-outcomes-$JOB_ID
rm -rf "$STORYMM_STOPPED_MARKER" "$STORYMM_OUTCOME_DIR"

# Signal sent to the batch shell only (B:USR1): pass it on to every process of the job step.
forward() { echo "storymm: batch shell got SIGUSR1, forwarding to the job step"; scancel --signal=USR1 "$JOB_ID" || true; }
trap forward USR1

# launch NODE...: one training step on those nodes, one task per node; sets rc. The launcher itself
# ignores SIGUSR1 (`trap '' USR1` survives exec), so the warning signal, which SLURM delivers to every
# process of the step, does not kill it; the training processes install their own handler. The
# machine rank is the node's place in the list (the step may run on a subset of the allocation).
# --overlap: after a lost node, slurmctld keeps the failed step's CPUs booked for minutes (measured:
# ~2 min) although its processes are gone; the new step must not wait for that.
launch() {
    local nnodes=$# main=$1 port=$(( BASE_PORT + restarts )) procs=$(( PROCS_PER_NODE * $# ))
    local args=(--num_machines "$nnodes" --num_processes "$procs" --main_process_ip "$main" --main_process_port "$port"
                --mixed_precision no --dynamo_backend no)   # precision comes from the config (Accelerator(...))
    (( procs > 1 )) && args+=(--multi_gpu)
    echo "storymm: job $JOB_ID run ${SLURM_RESTART_COUNT:-0} on $(IFS=,; echo "$*"): $nnodes node(s) x $PROCS_PER_NODE" \
         "process(es) ($([[ -n ${ACCELERATE_USE_CPU:-} ]] && echo CPU || echo GPU)), main $main:$port, launch $(( restarts + 1 )),"\
         "$(date -Is)"
    rm -rf "$STORYMM_OUTCOME_DIR"
    STORYMM_STEP_NODES="$*" srun --overlap --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --nodelist="$(IFS=,; echo "$*")" \
        --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1; r=0; for n in $STORYMM_STEP_NODES; do [[ $n == "$SLURMD_NODENAME" ]] && break; r=$((r + 1)); done
                 exec "$0" launch --machine_rank "$r" "$@"' \
        "$ACCELERATE" "${args[@]}" jobs/train.py "${TRAIN[@]}" &
    local srun_pid=$!
    while true; do
        wait "$srun_pid" && rc=0 || rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # still running: `wait` was interrupted by the trap
    done
}

# outcomes: "rank R on HOST: CODE MEANING, ..." from what the ranks left (all of them where TMPDIR
# is shared by the nodes; this node's otherwise)
outcomes() {
    local file text=""
    for file in "$STORYMM_OUTCOME_DIR"/rank-*; do
        [[ -f $file ]] || continue
        file=${file##*/rank-}
        text+="${text:+, }rank ${file%%-*} on ${file#*-}: $(cat "$STORYMM_OUTCOME_DIR/rank-$file")"
    done
    echo "${text:-no rank reported (killed or crashed)}"
}

# allocated: the nodes the job still holds (with --no-kill, SLURM removes a failed node from the job)
allocated() {
    scontrol show hostnames "$(scontrol show job "$JOB_ID" | grep -oE '(^| )NodeList=[^ ]+' | head -n 1 | cut -d= -f2)"
}

# usable NODE: true when the node is up in SLURM and runs a probe step in time; else prints why not
usable() {
    local state
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -n 1)
    case $state in
        "" | down* | drain* | fail* | *"*") echo "$1 is ${state:-unknown to SLURM}"; return 1 ;;
    esac
    if ! timeout "$PROBE_TIMEOUT" srun --overlap --nodes=1 --ntasks=1 --nodelist="$1" --cpus-per-task=1 true >/dev/null 2>&1; then
        echo "$1 ($state) did not run a probe step within ${PROBE_TIMEOUT}s"
        return 1
    fi
}

restarts=0
while true; do
    started=$SECONDS
    launch "${NODES[@]}"
    if [[ -f $STORYMM_STOPPED_MARKER ]]; then
        rm -f "$STORYMM_STOPPED_MARKER"
        echo "storymm: decision: training stopped at a checkpoint; requeueing job $JOB_ID ($(date -Is))"
        scontrol requeue "$JOB_ID"
        exit 0
    fi
    if (( rc == 0 )); then
        echo "storymm: srun exited with 0 ($(date -Is))"
        exit 0
    fi
    ended="step on $(IFS=,; echo "${NODES[*]}") failed after $(( SECONDS - started )) s (srun $rc; $(outcomes))"
    if grep -qs '^2 ' "$STORYMM_OUTCOME_DIR"/rank-*; then
        echo "storymm: decision: $ended; a rank reported an error that a restart would repeat: giving up ($(date -Is))"
        exit "$rc"
    fi
    if (( restarts >= MAX_RESTARTS )); then
        echo "storymm: decision: $ended; $restarts restart(s) already (STORYMM_MAX_RESTARTS): giving up ($(date -Is))"
        exit "$rc"
    fi
    held=" $(allocated | tr '\n' ' ') " left=() lost=()
    for n in "${NODES[@]}"; do
        if [[ $held != *" $n "* ]]; then
            lost+=("$n left the job ($(sinfo -h -n "$n" -o %T 2>/dev/null | head -n 1))")
        elif why=$(usable "$n"); then
            left+=("$n")
        else
            lost+=("$why")
        fi
    done
    if (( ${#left[@]} < MIN_NODES )); then
        echo "storymm: decision: $ended; ${lost[*]}: fewer than $MIN_NODES usable node(s), requeueing job $JOB_ID ($(date -Is))"
        scontrol requeue "$JOB_ID"
        exit 0
    fi
    restarts=$(( restarts + 1 ))
    if (( ${#lost[@]} )); then
        what="$(IFS=';'; echo "${lost[*]}"): continuing on $(IFS=,; echo "${left[*]}")"
    else
        what="all ${#left[@]} node(s) answer: restarting on all of them"
    fi
    echo "storymm: decision: $ended; $what (restart $restarts of $MAX_RESTARTS, $(date -Is))"
    NODES=("${left[@]}")
done
