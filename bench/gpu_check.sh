#!/usr/bin/env bash
# The GPU check: what a first user with one GPU runs, in one script (under 8 minutes on one H100).
# Prints a summary table and exits 1 when any step failed (2: bad arguments).
#
#   bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU
#   bash bench/gpu_check.sh --cpu           # every step that can, on the CPU at tiny sizes (CI runs it)
#   bash bench/gpu_check.sh --out DIR       # also write DIR/gpu_check.md (the table), gpu_check.log, bench.json
#
# Steps: versions and driver; a dataset (gate config, ~3,552 train stories as StoryReasoning has;
# --cpu: 24 tiny stories); fp32 islands under bf16 autocast (GRU/LSTM, warp coordinates, InfoNCE);
# the CUDA RNG state of the rank's own GPU; the host-sync audit of one sequence step (target 0; --cpu:
# on the meta device); a fresh run of 60 steps, then a resume to 90 (a resume crashed on GPU before
# issue 25); SIGUSR1 stop and resume under `accelerate launch` with one process; `storymm evaluate`;
# `storymm export` + `storymm predict` of a test story on the device and on the CPU (the same frames);
# bench/train_step.py (samples/s, GPU utilisation, time for 5 epochs; target < 60 s on one H100).
#
# A machine without a package index: put wheels of what its Python lacks in .whl/ (and a bert-base
# vocab.txt for the gate config's tokenizer): `bash bench/gpu_wheels.sh` does, on a machine that can
# download; this script installs them into a temporary folder first when its Python lacks them
# (--wheels DIR for another place).
# PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
OUT=""
WHEELS=.whl
while (( $# )); do
    case $1 in
        --cpu) MODE=cpu ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/storymm-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs" "$WORK/runs"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! "$PY" -c 'import pydantic, tenacity' 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
if [[ -f $WHEELS/vocab.txt && -z ${STORYMM_BERT_VOCAB:-} ]]; then export STORYMM_BERT_VOCAB=$REPO/$WHEELS/vocab.txt; fi

GPU=(--gpu)
if [[ $MODE == gpu ]]; then
    CONFIG=configs/gate.yaml
    SETS=()
    STORIES=4644          # 15% test, then 10% of the rest for validation: ~3,552 train stories
    FRAMES=5-22           # StoryReasoning's range (median 13)
    FIRST=60 THEN=90 LOG=10 BENCH_STEPS=200 LOADER_SECONDS=5
    EVAL_SPLIT=val        # ~400 stories, a third of the test split: evaluation's floors, generation, SSIM
else
    GPU=()
    CONFIG=configs/tiny.yaml
    # tests/small.py's model sizes: every step runs in seconds on 2 cores
    SETS=(data.batch_size=8 "model.visual_channels=[8,16,16]" model.visual_latent=16 model.text_latent=16
          model.embed_dim=16 model.text_hidden=32 model.sequence_hidden=32)
    STORIES=24 FRAMES=6-9 FIRST=6 THEN=9 LOG=3 BENCH_STEPS=6 LOADER_SECONDS=1 EVAL_SPLIT=test
fi
SET_ARGS=()
for s in "${SETS[@]}"; do SET_ARGS+=(--set "$s"); done
DATA=$WORK/data
RUN=$WORK/runs/train
TRAIN=(--config "$CONFIG" --stage sequence --data "$DATA" "${SET_ARGS[@]}"
       --set train.sequence.log_every=$LOG --set train.sequence.checkpoint_every=$FIRST --set train.sequence.warmup_steps=$LOG)

FAILED=0
step() {  # NAME COMMAND...: run, time, keep the log, record PASS/FAIL and the RESULT line
    local name=$1 start=$SECONDS rc status detail
    shift
    echo "== $name"
    "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    detail=$(grep -a '^RESULT: ' "$WORK/logs/$name.log" | tail -n 1 | cut -c9-)
    if (( rc == 0 )); then
        status=PASS
    else
        status=FAIL
        FAILED=1
        [[ -n $detail ]] || detail="exit $rc: $(grep -av '^\s*$' "$WORK/logs/$name.log" | tail -n 2 | tr '\n\t' '  ' | cut -c1-300)"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - start ))" "$detail" >>"$WORK/results.tsv"
    echo "   $status in $(( SECONDS - start )) s: $detail"
}
storymm() { "$PY" -m storymm.cli "$@"; }
check() { "$PY" bench/gpu_check.py "$@"; }

make_data() {
    storymm synth --out "$WORK/source" --stories "$STORIES" --frames "$FRAMES" --seed 0 \
        && storymm prepare --source "$WORK/source" --out "$DATA" --config "$CONFIG" "${SET_ARGS[@]}" \
        && echo "RESULT: $STORIES stories synthesised and prepared with $CONFIG"
}
train_then_check() {  # STEPS [RESUMED_FROM]
    storymm train "${TRAIN[@]}" --run "$RUN" --set train.sequence.steps="$1" 2>&1 | tee "$WORK/logs/train-$1.out" \
        && check expect "$RUN" --step "$1" --status completed ${2:+--resumed-from "$2" --log "$WORK/logs/train-$1.out"}
}
evaluate() {
    storymm evaluate --run "$RUN" --data "$DATA" --split "$EVAL_SPLIT" --out "$WORK/report" && check report "$WORK/report"
}
export_predict() {
    check predict "${GPU[@]}" --run "$RUN" --source "$WORK/source" --out "$WORK/predict"
}
bench_step() {
    "$PY" bench/train_step.py --configs "$CONFIG" --data "$DATA" --steps "$BENCH_STEPS" \
        --loader-seconds "$LOADER_SECONDS" "${SET_ARGS[@]}" --json "$WORK/bench.json" && check bench "${GPU[@]}" "$WORK/bench.json"
}

echo "storymm GPU check ($MODE) in $WORK with $PY"
step versions check versions "${GPU[@]}"
step data make_data
step dtypes-bf16 check dtypes "${GPU[@]}" --config "$CONFIG" --data "$DATA" "${SET_ARGS[@]}"
step cuda-rng check rng "${GPU[@]}"
step host-syncs check syncs "${GPU[@]}" --config "$CONFIG" --data "$DATA" "${SET_ARGS[@]}"
step "train-$FIRST" train_then_check "$FIRST"
step "resume-$THEN" train_then_check "$THEN" "$FIRST"
step accelerate-sigusr1 check stop-resume "${GPU[@]}" --run "$WORK/runs/accelerate" --marker "$WORK/stopped" -- "${TRAIN[@]}"
step evaluate evaluate
step export-predict export_predict
step train-step-bench bench_step

echo
[[ -z $OUT ]] || mkdir -p "$OUT"
check table "$WORK/results.tsv" ${OUT:+--out "$OUT/gpu_check.md"}
if [[ -n $OUT ]]; then
    for log in "$WORK"/logs/*.log; do echo "===== $(basename "$log")"; cat "$log"; done >"$OUT/gpu_check.log"
    [[ -f $WORK/bench.json ]] && cp "$WORK/bench.json" "$OUT/bench.json"
fi
exit $FAILED
