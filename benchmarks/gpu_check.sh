#!/usr/bin/env bash
# One prepared check of the paged KV-cache kernels on a machine with a CUDA GPU:
#   1. a virtual environment (sees the system's packages: uses whatever torch is installed,
#      and only if there is none runs `pip install torch`),
#   2. ponder's extension built with PONDER_CUDA=ON (CMake, Release, all cores) and put into
#      that environment,
#   3. tests/test_kv_kernels.py (CPU and CUDA cases) and the native doctest suite,
#   4. benchmarks/bench_kernels.py on CUDA (table + JSON; GB/s vs the device's peak).
#
# Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]      (default OUT_DIR: $OUT, else bench-results/)
# Results in OUT_DIR: build.log, pytest.log, bench_kernels.json, bench_kernels.txt, summary.txt.
# Exit status: non-zero when the build, a test or the benchmark's agreement check fails.
# Env: PYTHON (interpreter for the venv), VENV (venv path), JOBS (build parallelism),
#      BENCH_ARGS (extra benchmark flags, e.g. "--quick").
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-${OUT:-$ROOT/bench-results}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$ROOT"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
note() { echo "== $*" | tee -a "$SUMMARY"; }
status=0

note "gpu_check started $(date -u +%FT%TZ) in $ROOT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
else
  note "nvidia-smi not found"
fi

# ---------------------------------------------------------------- 1. environment
PY=${PYTHON:-$(command -v python3 || command -v python)}
VENV=${VENV:-$ROOT/build/gpu-venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || { note "FAIL: cannot create a venv with $PY"; exit 1; }
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || pip install torch || { note "FAIL: no torch and pip install torch failed"; exit 1; }
python -c "import pybind11" 2>/dev/null || pip install pybind11 || { note "FAIL: pybind11 missing"; exit 1; }
python -c "import pytest, numpy" 2>/dev/null || pip install pytest numpy || { note "FAIL: pytest/numpy missing"; exit 1; }
python - <<'EOF' | tee -a "$SUMMARY"
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}",
      f"device: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
EOF

# ---------------------------------------------------------------- 2. build (CUDA required)
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export CUDACXX=${CUDACXX:-$(command -v nvcc || true)}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
BUILD="$ROOT/build/gpu-check"
STAGE="$ROOT/build/gpu-check-pkg"
{
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPONDER_CUDA=ON -DPONDER_BUILD_PYTHON=ON \
    -DPONDER_BUILD_TESTS=ON -DPython_EXECUTABLE="$(command -v python)" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" &&
    cmake --build "$BUILD" -j "$JOBS" --target _core
} >"$OUT_DIR/build.log" 2>&1
if [ $? -ne 0 ]; then
  tail -40 "$OUT_DIR/build.log"
  note "FAIL: build (see build.log)"
  exit 1
fi
note "build ok ($(grep -c -i warning "$OUT_DIR/build.log") warning lines)"
# Stage the package (sources + the fresh extension, never a dev shim or a stale .so) and put it
# on the venv's path with a .pth file.
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp -r "$ROOT/python/ponder" "$STAGE/"
rm -f "$STAGE/ponder/_core.py" "$STAGE"/ponder/_core*.so
cp "$BUILD"/_core*.so "$STAGE/ponder/"
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$STAGE" >"$SITE/ponder-gpu-check.pth"
(cd /tmp && python - <<'EOF') | tee -a "$SUMMARY"
import ponder
info = ponder.build_info()
print("ponder", ponder.__version__, "from", ponder.__file__)
print("build: cuda", info["cuda"], info["cuda_architectures"], "cuda_version", info["cuda_version"])
print("cuda_status:", ponder._core.cuda_status(), "cuda_available:", ponder.cuda_available())
EOF
(cd /tmp && python -c "import ponder, sys; sys.exit(0 if ponder.cuda_available() else 1)") ||
  { note "FAIL: the CUDA build cannot run kernels on this machine"; status=1; }

# ---------------------------------------------------------------- 3. tests
# The native suite also compiles other components' tests; a failure there is reported, not fatal
# to the rest of the check.
if ! cmake --build "$BUILD" -j "$JOBS" --target ponder_native_tests >>"$OUT_DIR/build.log" 2>&1; then
  note "FAIL: native test build (see build.log)"
  status=1
elif "$BUILD/ponder_native_tests" -tc="kv*" >"$OUT_DIR/native_tests.log" 2>&1; then
  note "native kv tests ok: $(grep 'test cases' "$OUT_DIR/native_tests.log")"
else
  note "FAIL: native kv tests (see native_tests.log)"
  status=1
fi
python -m pytest "$ROOT/tests/test_kv_kernels.py" -q -rs -p no:cacheprovider >"$OUT_DIR/pytest.log" 2>&1
rc=$?
tail -3 "$OUT_DIR/pytest.log" | tee -a "$SUMMARY"
if [ $rc -ne 0 ]; then
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest.log" | head -40 | tee -a "$SUMMARY"
  note "FAIL: pytest (see pytest.log)"
  status=1
fi
if grep -q "needs a CUDA build of ponder and a CUDA device" "$OUT_DIR/pytest.log"; then
  note "FAIL: CUDA test cases were skipped"
  status=1
fi

# ---------------------------------------------------------------- 4. benchmark
# shellcheck disable=SC2086
python "$ROOT/benchmarks/bench_kernels.py" --device cuda --out "$OUT_DIR/bench_kernels.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT_DIR/bench_kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { note "FAIL: benchmark (or ponder/torch disagreement)"; status=1; }
# shellcheck disable=SC2086
python "$ROOT/benchmarks/bench_kernels.py" --device cuda --dtype bf16 --quick ${BENCH_ARGS:-} \
  2>&1 | tee -a "$OUT_DIR/bench_kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { note "FAIL: bf16 benchmark"; status=1; }

note "gpu_check finished $(date -u +%FT%TZ): $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
