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
#   MAIN_PORT                rendezvous port (default 20000 + job id % 20000)
#   ACCELERATE               the accelerate executable (default: .venv/bin/accelerate, else PATH)
#
# Preemption / time limit: SLURM sends SIGUSR1 to every process of the job step 120 s before the
# limit (`--signal=USR1@120`; `scancel --signal=USR1 JOBID` does the same by hand). Every training
# process notices it; all ranks stop at the same step, write a checkpoint with status "stopped",
# touch $STORYMM_STOPPED_MARKER and exit 0. This script then runs `scontrol requeue`; the requeued
# job reruns the same command and the loop resumes from the run's `latest` checkpoint. If the signal
# is sent to the batch shell only (`--signal=B:USR1@120`, `scancel --batch`), the trap below
# forwards it to the job step.
#
#SBATCH --job-name=storymm-gate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
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
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
if (( GPUS_PER_NODE > 0 )); then
    # GPUs were asked for: use them, or stop here with one line saying why torch cannot (e.g. a driver
    # older than the CUDA build of torch needs) and what to install; never train on the CPU instead.
    if [[ -x ${ACCELERATE%/accelerate}/python ]]; then PYTHON=${ACCELERATE%/accelerate}/python; else PYTHON=python3; fi
    "$PYTHON" -m storymm.training.devices --require "$GPUS_PER_NODE" \
        --asked "SLURM_GPUS_ON_NODE=$GPUS_PER_NODE (sbatch --gpus-per-node)" >/dev/null || exit 2
fi
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$(( 20000 + JOB_ID % 20000 ))}
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
NUM_PROCESSES=$(( PROCS_PER_NODE * NNODES ))

LAUNCH=(--num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
        --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
        --mixed_precision no --dynamo_backend no)   # precision comes from the config (Accelerator(...))
(( NUM_PROCESSES > 1 )) && LAUNCH+=(--multi_gpu)
TRAIN=(--config "$CONFIG" --backend accelerate --stage "$STAGE" --data "$DATA_URI" --run "$RUN_URI")
[[ -n ${INIT_FROM:-} ]] && TRAIN+=(--init-from $INIT_FROM)
# shellcheck disable=SC2206 # word splitting of STORYMM_TRAIN_ARGS is intended
TRAIN+=(${STORYMM_TRAIN_ARGS:-} "$@")

export STORYMM_STOPPED_MARKER=${TMPDIR:-/tmp}/storymm-stopped-$JOB_ID
rm -f "$STORYMM_STOPPED_MARKER"

echo "storymm: job $JOB_ID run ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $NNODES node(s) x $PROCS_PER_NODE" \
     "process(es) ($([[ -n ${ACCELERATE_USE_CPU:-} ]] && echo CPU || echo GPU)), main $MAIN_ADDR:$MAIN_PORT, $(date -Is)"

# Signal sent to the batch shell only (B:USR1): pass it on to every process of the job step.
forward() { echo "storymm: batch shell got SIGUSR1, forwarding to the job step"; scancel --signal=USR1 "$JOB_ID" || true; }
trap forward USR1

# One task per node. The launcher itself ignores SIGUSR1 (`trap '' USR1` survives exec), so the
# warning signal, which SLURM delivers to every process of the step, does not kill it; the training
# processes install their own handler. $SLURM_NODEID is evaluated per node: the machine rank.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; exec "$0" launch --machine_rank "$SLURM_NODEID" "$@"' \
    "$ACCELERATE" "${LAUNCH[@]}" jobs/train.py "${TRAIN[@]}" &
srun_pid=$!
rc=0
while true; do
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # still running: `wait` was interrupted by the trap
done

if [[ -f $STORYMM_STOPPED_MARKER ]]; then
    rm -f "$STORYMM_STOPPED_MARKER"
    echo "storymm: training stopped at a checkpoint; requeueing job $JOB_ID ($(date -Is))"
    scontrol requeue "$JOB_ID"
    exit 0
fi
echo "storymm: srun exited with $rc ($(date -Is))"
exit "$rc"
