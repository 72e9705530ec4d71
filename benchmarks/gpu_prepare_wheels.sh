#!/usr/bin/env bash
# Download, on a machine with network access, the wheels gpu_check.sh may need on the GPU
# machine (which has no network): the requirements of benchmarks/gpu_wheels.txt not flagged
# `h200` (all of them with GPU_WHEELS_ALL=1), for CPython 3.12 on manylinux x86_64, without
# dependencies (the list names them all), into build/gpu-wheels/ (ignored by git: wheels are never
# committed; the device tool's `carry` brings the folder along, within its 64 MiB).
#
# Usage: bash benchmarks/gpu_prepare_wheels.sh [WHEEL_DIR]
# Env: GPU_WHEEL_LIST (default benchmarks/gpu_wheels.txt), GPU_WHEELS_ALL=1, PIP (default: python3 -m pip).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIST=${GPU_WHEEL_LIST:-$ROOT/benchmarks/gpu_wheels.txt}
DEST=${1:-$ROOT/build/gpu-wheels}
mkdir -p "$DEST"
mapfile -t REQS < <(grep -v '^[[:space:]]*#' "$LIST" | awk -v all="${GPU_WHEELS_ALL:-0}" \
  'NF >= 2 { h = 0; for (i = 3; i <= NF; i++) if ($i == "h200") h = 1; if (all == "1" || !h) print $2 }')
[ "${#REQS[@]}" -gt 0 ] || { echo "no requirements in $LIST" >&2; exit 1; }
# shellcheck disable=SC2086
${PIP:-python3 -m pip} download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${REQS[@]}"
compgen -G "$DEST/*.whl" >/dev/null || { echo "no wheels in $DEST" >&2; exit 1; }
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
