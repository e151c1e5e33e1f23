#!/usr/bin/env bash
# Evaluate a sequence run on a whole split and write its report (jobs/evaluate.py = `storymm evaluate`).
#
#   sbatch slurm/evaluate.sh RUN_URI DATA_URI [OUT_URI]
#   RUN_URI=… DATA_URI=… OUT_URI=… SPLIT=test sbatch slurm/evaluate.sh
#
# Submit from the repository root (or set STORYMM_REPO). OUT_URI defaults to RUN_URI/reports/<split>-<UTC date and time>, so repeated evaluations accumulate.
# The nightly evaluation of several runs with regression checks is `storymm nightly`: slurm/nightly.scrontab.
#
#SBATCH --job-name=storymm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=storymm-eval-%j.out
set -euo pipefail

REPO=${STORYMM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
RUN_URI=${1:-${RUN_URI:-}}
DATA_URI=${2:-${DATA_URI:-}}
SPLIT=${SPLIT:-test}
OUT_URI=${3:-${OUT_URI:-${RUN_URI%/}/reports/$SPLIT-$(date -u +%Y%m%dT%H%M)}}
if [[ -z $RUN_URI || -z $DATA_URI ]]; then
    echo "evaluate.sh: give RUN_URI and DATA_URI (arguments or environment)" >&2
    exit 2
fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
echo "storymm: evaluating $RUN_URI on $DATA_URI ($SPLIT) -> $OUT_URI ($(date -Is))"
exec "$PYTHON" jobs/evaluate.py --run "$RUN_URI" --data "$DATA_URI" --split "$SPLIT" --out "$OUT_URI"
