#!/usr/bin/env bash
# One prepared check of ponder on a CUDA machine, within a fixed time budget (default 460 s,
# so that it fits an 8-minute slot), each step under its own timeout:
#   preflight  the machine's own Python (no venv, no pip): torch, numpy, pytest, pybind11,
#              transformers; Python headers; nvcc; cmake (else a direct nvcc/g++ build)
#   wheels     modules of benchmarks/gpu_wheels.txt that do not import are unpacked from carried
#              wheels (build/gpu-wheels/, made by gpu_prepare_wheels.sh) into build/gpu-site/
#   build      ponder._core with CUDA for this GPU's architecture only (default sm_90), staged
#              with python/ponder in build/gpu-check-pkg/ and put on PYTHONPATH
#   tests      the CUDA cases of tests/test_kv_kernels.py (fails if any of them is skipped)
#   hf         benchmarks/gpu_hf_check.py: paged logits == the model's own forward (fp32, bf16)
#   run        `ponder run --device cuda` on the built-in models (beam search, DVTS: forks and
#              copy-on-write) beside the same run on the CPU; answers side by side
#   bench      benchmarks/bench_kernels.py: per-kernel GB/s vs the peak (H200: 4.8 TB/s), decode
#              vs torch SDPA on gathered K/V (f16 full, bf16 quick)
#   sanitizer  compute-sanitizer memcheck over a small subset of the CUDA kernel tests
# Steps run in this order (most valuable first); a step gets min(its cap, the time left).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--skip STEP,...]
#   --dry-run  run everything that needs no GPU (argument parsing, preflight, the wheel list and
#              unpacking, the helper scripts' --help) and print the plan; tested in CI
#   --out DIR  results (default: $OUT, else bench-results/)
# Results in DIR: gpu_check.json (every step: status, seconds, details, and the JSON of the
# preflight, wheels, hf check, benchmarks and run comparison) and gpu_check.log (all output);
# each step's own files stay in build/gpu-check-work/ (GPU_CHECK_WORK).
# Exit status: 0 all steps ok, 1 a step failed or timed out (or, dry run, a requirement is
# missing), 2 bad arguments.
# Env: PYTHON (interpreter; default /opt/torch/.venv/bin/python if present, else python3),
#      GPU_WHEELS (wheel folder), GPU_SITE (unpack folder), GPU_WHEEL_LIST, JOBS, CUDA_ARCH (e.g. 90),
#      GPU_CHECK_DIRECT=1 (build with nvcc/g++ even when cmake is there), GPU_CHECK_NVCC (nvcc path),
#      GPU_CHECK_CAP_<step>=SECONDS (a step's cap, e.g. GPU_CHECK_CAP_build=900 on a small machine),
#      GPU_CHECK_REHEARSE=1 (no GPU here: the steps after the build run on the CPU, to try the script).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS_ALL="preflight wheels build tests hf run bench sanitizer"
declare -A CAP=([preflight]=30 [wheels]=30 [build]=200 [tests]=90 [hf]=60 [run]=120 [bench]=100 [sanitizer]=90)
for s in $STEPS_ALL; do  # GPU_CHECK_CAP_<step>=SECONDS overrides a step's cap (e.g. a slow build machine)
  v=GPU_CHECK_CAP_$s
  [[ "${!v:-}" =~ ^[0-9]+$ ]] && CAP[$s]=${!v}
done

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DRY=0
OUT_DIR=${OUT:-$ROOT/bench-results}
BUDGET=460
SKIP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUT_DIR=$2; shift ;;
    --budget)
      [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget needs a number of seconds" >&2; exit 2; }
      BUDGET=$2; shift ;;
    --skip)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --skip needs step names" >&2; exit 2; }
      for s in ${2//,/ }; do
        [[ " $STEPS_ALL " == *" $s "* ]] || { echo "gpu_check.sh: unknown step '$s' (steps: $STEPS_ALL)" >&2; exit 2; }
      done
      SKIP=" ${2//,/ } "; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
# Only gpu_check.json and gpu_check.log go to OUT_DIR (the device tool returns at most 8 files);
# every step's own files go to WORK.
WORK=${GPU_CHECK_WORK:-$ROOT/build/gpu-check-work}
rm -rf "$WORK" && mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || { echo "gpu_check.sh: cannot create $WORK" >&2; exit 2; }
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
START=$(date +%s)
LOG=$OUT_DIR/gpu_check.log
STEPS=$WORK/steps.jsonl
: >"$LOG"
: >"$STEPS"
status=0
elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[$(elapsed)s] $*" | tee -a "$LOG"; }
# record STEP STATUS SECONDS DETAIL: one JSON line per step (DETAIL loses quotes/backslashes).
record() {
  local detail=${4//[\"\\]/\'}
  detail=$(printf '%s' "$detail" | tr '\n\t' '  ')
  printf '{"step": "%s", "status": "%s", "seconds": %s, "cap_s": %s, "detail": "%s"}\n' \
    "$1" "$2" "$3" "${CAP[$1]:-0}" "$detail" >>"$STEPS"
  case "$2" in fail|timeout) status=1 ;; esac
  log "$1: $2 (${3}s) $4"
}
skipped() { [[ "$SKIP" == *" $1 "* ]]; }
# step_timeout STEP: min(cap, time left - 5), or 0 when under 10 s are left.
step_timeout() {
  local left=$((BUDGET - $(elapsed) - 5)) cap=${CAP[$1]}
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 10 ] && cap=0
  echo "$cap"
}
# run_to LOGFILE SECONDS CMD...: run under timeout, output to LOGFILE (and gpu_check.log); rc.
run_to() {
  local out=$1 t=$2
  shift 2
  echo "+ $*" >>"$out"
  timeout -k 5 "$t" "$@" >>"$out" 2>&1
  local rc=$?
  cat "$out" >>"$LOG"
  return $rc
}
rc_status() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo fail ;; esac; }

finish() {
  "$PY" - "$OUT_DIR" "$STEPS" "$DRY" "$BUDGET" "$(elapsed)" "$WORK" <<'EOF' 2>>"$LOG" || cp "$STEPS" "$OUT_DIR/gpu_check.json"
import json, sys
from pathlib import Path
out, steps, dry, budget, spent = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
work = Path(sys.argv[6])
rows = [json.loads(x) for x in steps.read_text().splitlines() if x.strip()]
res = dict(dry_run=dry, budget_s=budget, elapsed_s=spent, ok=all(r["status"] in ("ok", "skipped", "planned", "unavailable") for r in rows), steps=rows)
for name in ("preflight", "wheels", "hf_check", "bench_kernels", "bench_kernels_bf16", "run_compare"):
    p = work / f"{name}.json"
    if p.exists():
        try:
            res[name] = json.loads(p.read_text())
        except ValueError:
            res[name] = f"unreadable: {p.name}"
(out / "gpu_check.json").write_text(json.dumps(res, indent=2))
print(f"{'step':10} {'status':8} {'s':>5} {'cap':>5}  detail")
for r in rows:
    print(f"{r['step']:10} {r['status']:8} {r['seconds']:>5} {r['cap_s']:>5}  {r['detail'][:110]}")
EOF
  log "gpu_check finished: $([ $status -eq 0 ] && echo OK || echo FAILED); results in $OUT_DIR/gpu_check.json"
  exit $status
}

log "gpu_check $([ $DRY -eq 1 ] && echo "(dry run) ")started $(date -u +%FT%TZ) in $ROOT; budget ${BUDGET}s; out $OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | tee -a "$LOG"
else
  log "nvidia-smi not found"
fi

# ---------------------------------------------------------------- preflight
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x /opt/torch/.venv/bin/python ]; then PY=/opt/torch/.venv/bin/python
else PY=$(command -v python3 || command -v python || echo python3)
fi
# the toolkit's own nvcc first (a PATH entry may be a wrapper script)
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc
elif [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc
else NVCC=$(command -v nvcc || true)
fi
[ -n "${GPU_CHECK_NVCC+set}" ] && NVCC=$GPU_CHECK_NVCC  # an explicit nvcc ("" = none)
CMAKE=$(command -v cmake || true)
[ "${GPU_CHECK_DIRECT:-0}" = 1 ] && CMAKE=""  # force the build without CMake
[ -z "$CMAKE" ] && [ "${GPU_CHECK_DIRECT:-0}" != 1 ] && [ -x "$(dirname "$PY")/cmake" ] && CMAKE=$(dirname "$PY")/cmake
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -n "$NVCC" ] && [ -x "$(dirname "$NVCC")/compute-sanitizer" ] && SANITIZER=$(dirname "$NVCC")/compute-sanitizer
t0=$(date +%s)
if ! "$PY" -c "import sys" >/dev/null 2>&1; then
  record preflight fail 0 "no Python interpreter at '$PY' (set PYTHON)"
  PY=python3
  finish
fi
timeout 60 "$PY" - "$WORK/preflight.json" "$NVCC" "$CMAKE" "$SANITIZER" "$DRY" >"$WORK/preflight.log" 2>&1 <<'EOF'
import importlib.util, json, os, subprocess, sys, sysconfig
out, nvcc, cmake, sanitizer, dry = sys.argv[1:6]
info = dict(python=sys.executable, python_version=sys.version.split()[0], missing=[], build_missing=[], notes=[])
for mod in ("torch", "numpy", "pytest", "transformers"):
    if importlib.util.find_spec(mod) is None:
        info["missing"].append(mod)
if importlib.util.find_spec("pybind11") is None:
    info["build_missing"].append("pybind11")
info["pytest_timeout"] = importlib.util.find_spec("pytest_timeout") is not None
if "torch" not in info["missing"]:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = "%d%d" % torch.cuda.get_device_capability(0)
if "pybind11" not in info["build_missing"]:
    import pybind11
    info["pybind11_cmake_dir"] = pybind11.get_cmake_dir()
    info["pybind11_include"] = pybind11.get_include()
inc = sysconfig.get_paths()["include"]
info["python_include"] = inc
info["python_h"] = os.path.exists(os.path.join(inc, "Python.h"))
if not info["python_h"]:
    info["build_missing"].append(f"Python.h (in {inc})")
info["ext_suffix"] = sysconfig.get_config_var("EXT_SUFFIX")
info["nvcc"] = nvcc or None
if nvcc:
    v = [x for x in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines() if "release" in x]
    info["nvcc_version"] = v[0].strip() if v else "?"
else:
    info["build_missing"].append("nvcc (PATH or /usr/local/cuda/bin)")
# A dry run needs no build: what the build would lack is a note there, a failure otherwise.
if dry == "1":
    info["notes"] += [f"the build would need: {m}" for m in info["build_missing"]]
else:
    info["missing"] += info["build_missing"]
info["cmake"] = cmake or None
if not cmake:
    info["notes"].append("no cmake: the build step compiles with nvcc/g++ directly")
info["compute_sanitizer"] = sanitizer or None
json.dump(info, open(out, "w"), indent=2)
for k, v in info.items():
    print(f"{k}: {v}")
sys.exit(1 if info["missing"] else 0)
EOF
rc=$?
cat "$WORK/preflight.log" >>"$LOG"
pf() { "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v is None else v)" "$WORK/preflight.json" "$1" 2>/dev/null; }
if [ $rc -eq 0 ]; then
  record preflight ok $(($(date +%s) - t0)) "$PY (Python $(pf python_version)), torch $(pf torch) CUDA $(pf torch_cuda), gpu: $(pf gpu), nvcc: $(pf nvcc_version), cmake: ${CMAKE:-none}"
else
  record preflight fail $(($(date +%s) - t0)) "missing: $(pf missing) (see preflight.log)"
  finish
fi

# ---------------------------------------------------------------- wheels
GPU_WHEELS=${GPU_WHEELS:-$ROOT/build/gpu-wheels}
GPU_SITE=${GPU_SITE:-$ROOT/build/gpu-site}
LIST=${GPU_WHEEL_LIST:-$ROOT/benchmarks/gpu_wheels.txt}
t0=$(date +%s)
timeout 60 "$PY" - "$LIST" "$GPU_WHEELS" "$GPU_SITE" "$WORK/wheels.json" >"$WORK/wheels.log" 2>&1 <<'EOF'
# A module that does not import is unpacked from its wheel (a wheel is a zip archive laid out
# for site-packages), so nothing here needs pip or a network.
import importlib, importlib.util, json, re, sys, zipfile
from pathlib import Path
lst, wheels, site, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
sys.path.insert(0, str(site))
have = {norm(w.name.split("-")[0]): w for w in sorted(wheels.glob("*.whl"))} if wheels.is_dir() else {}
rows = []
for line in lst.read_text().splitlines():
    parts = line.split("#")[0].split()
    if not parts:
        continue
    if len(parts) < 2:
        sys.exit(f"{lst}: bad line {line!r}: want '<import name> <requirement> [optional]'")
    mod, req, optional = parts[0], parts[1], "optional" in parts[2:]
    dist = norm(re.split(r"[<>=!~;\[ ]", req)[0])
    row = dict(module=mod, requirement=req, optional=optional, wheel=have[dist].name if dist in have else None)
    row["status"] = "present" if importlib.util.find_spec(mod) is not None else "missing"
    if row["status"] == "missing" and row["wheel"]:
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(have[dist]) as z:
            z.extractall(site)
        importlib.invalidate_caches()
        row["status"] = "unpacked" if importlib.util.find_spec(mod) is not None else "missing"
    rows.append(row)
missing = [r["requirement"] for r in rows if r["status"] == "missing" and not r["optional"]]
json.dump(dict(list=str(lst), wheel_dir=str(wheels), site=str(site), wheels_found=len(have), modules=rows,
               missing=missing), open(out, "w"), indent=2)
for r in rows:
    print(f"{r['module']:24} {r['requirement']:34} {r['status']:9} {r['wheel'] or '-'}")
print("missing:", " ".join(missing) or "none")
sys.exit(3 if missing else 0)
EOF
rc=$?
cat "$WORK/wheels.log" >>"$LOG"
RUN_DEPS_OK=1
case $rc in
  0) record wheels ok $(($(date +%s) - t0)) "$(tail -1 "$WORK/wheels.log"); $(grep -c ' unpacked ' "$WORK/wheels.log") unpacked from $GPU_WHEELS" ;;
  3) RUN_DEPS_OK=0
     record wheels fail $(($(date +%s) - t0)) "$(tail -1 "$WORK/wheels.log") (no wheel in $GPU_WHEELS: run gpu_prepare_wheels.sh and carry build/gpu-wheels); the run step is skipped" ;;
  *) RUN_DEPS_OK=0; record wheels fail $(($(date +%s) - t0)) "the wheel check failed (see wheels.log)" ;;
esac
export PYTHONPATH="$ROOT/build/gpu-check-pkg:$GPU_SITE${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- the plan (and the dry run)
ARCH=${CUDA_ARCH:-$(pf compute_capability)}
ARCH=${ARCH:-90}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 4)}
BUILD=$ROOT/build/gpu-check
STAGE=$ROOT/build/gpu-check-pkg
# every CUDA case (the one test of CUDA tensors *without* a usable GPU is not one)
# GPU_CHECK_REHEARSE=1 (on a machine without a GPU, after a build): every step after the build
# on the CPU instead (a small test subset, bench --quick), to try the script's own plumbing.
DEV=cuda
SEL="cuda and not without_usable_cuda"
BENCH_QUICK=()
if [ "${GPU_CHECK_REHEARSE:-0}" = 1 ]; then DEV=cpu; SEL="cpu and misaligned"; BENCH_QUICK=(--quick); fi
TESTS=(-m pytest "$ROOT/tests/test_kv_kernels.py" -q -rs -p no:cacheprovider -k "$SEL")
[ "$(pf pytest_timeout)" = "True" ] && TESTS+=(--timeout 60)
SAN_TESTS=(-m pytest "$ROOT/tests/test_kv_kernels.py" -q -p no:cacheprovider -k "cuda and (misaligned or unchecked)")
RUN_ARGS=(run --methods beam_search,dvts --n 4 --beam-width 2 --limit 3 --num-iterations 4 --max-steps 6 --no-progress)
if [ $DRY -eq 1 ]; then
  t0=$(date +%s)
  ok=1
  for s in $STEPS_ALL; do
    case $s in preflight|wheels) continue ;; esac
    echo "plan: $s (cap ${CAP[$s]}s)$(skipped "$s" && echo ' skipped by --skip')" | tee -a "$LOG"
  done
  echo "plan: build sm_$ARCH with ${CMAKE:-direct nvcc/g++} -j $JOBS into $BUILD; PYTHONPATH=$PYTHONPATH" | tee -a "$LOG"
  echo "plan: tests: $PY ${TESTS[*]}" | tee -a "$LOG"
  echo "plan: sanitizer: ${SANITIZER:-compute-sanitizer (not found here)} --tool memcheck $PY ${SAN_TESTS[*]}" | tee -a "$LOG"
  echo "plan: run: $PY -m ponder ${RUN_ARGS[*]} --device cuda|cpu" | tee -a "$LOG"
  # the helper scripts compile and parse their arguments (gpu_hf_check.py runs on the CPU in CI)
  timeout 60 "$PY" -m py_compile "$ROOT"/benchmarks/{gpu_hf_check,bench_kernels,gpu_compare_runs}.py >>"$LOG" 2>&1 ||
    { ok=0; log "FAIL: a helper script does not compile"; }
  timeout 60 "$PY" "$ROOT/benchmarks/gpu_compare_runs.py" --help >>"$LOG" 2>&1 || { ok=0; log "FAIL: gpu_compare_runs.py --help"; }
  timeout 60 "$PY" "$ROOT/benchmarks/gpu_hf_check.py" --help >>"$LOG" 2>&1 || { ok=0; log "FAIL: gpu_hf_check.py --help"; }
  timeout 60 "$PY" -m ponder run --help >>"$LOG" 2>&1 || { ok=0; log "FAIL: ponder run --help"; }
  [ $RUN_DEPS_OK -eq 1 ] || ok=0
  caps=0
  for s in $STEPS_ALL; do caps=$((caps + CAP[$s])); done
  record dry-run "$([ $ok -eq 1 ] && echo planned || echo fail)" $(($(date +%s) - t0)) \
    "helper scripts compile and parse --help; the step caps sum to ${caps}s, the budget ${BUDGET}s bounds the whole run"
  finish
fi

# ---------------------------------------------------------------- build
build_direct() {  # the CMake build's sources and definitions, compiled without CMake
  local obj=$BUILD/direct version pyinc pybinc
  mkdir -p "$obj"
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/python/ponder/_version.py")
  pyinc=$(pf python_include)
  pybinc=$(pf pybind11_include)
  local defs=(-DPONDER_VERSION="\"$version\"" -DPONDER_WITH_CUDA=1 -DPONDER_CUDA_ARCHS="\"$ARCH-real\""
    -DPONDER_CUDA_VERSION="\"$(pf nvcc_version | sed 's/.*release \([0-9.]*\).*/\1/')\"" -DPONDER_SANITIZERS="\"\"" -DPONDER_BUILD_TYPE="\"Release\"")
  local srcs=() s
  for s in "$ROOT"/csrc/{common,tree,kv,kernels,cuda}/*.cpp; do [[ "$s" == *_stub.cpp ]] || srcs+=("$s"); done
  for s in "$ROOT"/csrc/bindings/*.cpp; do srcs+=("$s"); done
  local pids=() cflags=(-O3 -DNDEBUG -std=c++17 -fPIC -fvisibility=hidden -fopenmp -I"$ROOT/csrc" -I"$pyinc" -I"$pybinc" "${defs[@]}")
  for s in "${srcs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    g++ "${cflags[@]}" -c "$s" -o "$obj/$(basename "$s").o" &
    pids+=($!)
  done
  for s in "$ROOT"/csrc/kernels/*.cu "$ROOT"/csrc/cuda/*.cu; do
    "$NVCC" -O3 -DNDEBUG -std=c++17 -Xcompiler -fPIC -gencode "arch=compute_$ARCH,code=sm_$ARCH" -I"$ROOT/csrc" "${defs[@]}" \
      -c "$s" -o "$obj/$(basename "$s").o" &
    pids+=($!)
  done
  for s in "${pids[@]}"; do wait "$s" || return 1; done
  # nvcc links the static CUDA runtime from its own toolkit
  "$NVCC" -shared -cudart static -o "$BUILD/_core$(pf ext_suffix)" "$obj"/*.o -lgomp -ldl -lrt -lpthread
}
if skipped build; then
  record build skipped 0 "--skip build: using the extension already in $STAGE"
else
  t=$(step_timeout build)
  t0=$(date +%s)
  : >"$WORK/build.log"
  rm -f "$BUILD"/_core*.so
  if [ -n "$CMAKE" ]; then
    run_to "$WORK/build.log" "$t" bash -c '"$0" -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=Release -DPONDER_CUDA=ON -DPONDER_BUILD_PYTHON=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$3-real" -DCMAKE_CUDA_COMPILER="$4" -DPython_EXECUTABLE="$5" -Dpybind11_DIR="$6" &&
      "$0" --build "$2" -j "$7" --target _core' "$CMAKE" "$ROOT" "$BUILD" "$ARCH" "$NVCC" "$PY" "$(pf pybind11_cmake_dir)" "$JOBS"
    rc=$?
  else
    export -f build_direct pf
    export ROOT BUILD ARCH NVCC JOBS WORK PY
    run_to "$WORK/build.log" "$t" bash -c build_direct
    rc=$?
  fi
  if [ $rc -eq 0 ] && ls "$BUILD"/_core*.so >/dev/null 2>&1; then
    rm -rf "$STAGE" && mkdir -p "$STAGE"
    cp -r "$ROOT/python/ponder" "$STAGE/"
    rm -f "$STAGE/ponder/_core.py" "$STAGE"/ponder/_core*.so
    cp "$BUILD"/_core*.so "$STAGE/ponder/"
    record build ok $(($(date +%s) - t0)) "sm_$ARCH with ${CMAKE:+cmake}${CMAKE:-nvcc/g++}, $(grep -ci warning "$WORK/build.log") warning lines"
  else
    tail -30 "$WORK/build.log"
    record build "$(rc_status $rc)" $(($(date +%s) - t0)) "see build.log"
    finish
  fi
fi
(cd /tmp && timeout 60 "$PY" -c "
import ponder, sys
i = ponder.build_info()
print('ponder', ponder.__version__, 'from', ponder.__file__, '| cuda build', i['cuda'], i['cuda_architectures'], '| status', ponder._core.cuda_status())
if not ponder.__file__.startswith('$STAGE/'):
    sys.exit('ponder was not imported from the staged build $STAGE (an installed ponder shadows it)')
sys.exit(0 if i['cuda'] and ponder.cuda_available() else 1)") 2>&1 | tee -a "$LOG"
if [ "${PIPESTATUS[0]}" -ne 0 ] && [ "$DEV" = cuda ]; then
  record build fail 0 "the built extension does not run CUDA kernels here (see gpu_check.log)"
  finish
fi

# ---------------------------------------------------------------- tests
if skipped tests; then record tests skipped 0 "--skip"; else
  t0=$(date +%s)
  run_to "$WORK/tests.log" "$(step_timeout tests)" "$PY" "${TESTS[@]}"
  rc=$?
  summary=$(grep -E "passed|failed|error" "$WORK/tests.log" | tail -1)
  nskip=$(grep -c "^SKIPPED" "$WORK/tests.log")
  if [ $rc -eq 0 ] && [ "$nskip" -ne 0 ]; then
    record tests fail $(($(date +%s) - t0)) "$nskip CUDA cases were skipped: $summary"
  elif [ $rc -eq 0 ]; then
    record tests ok $(($(date +%s) - t0)) "$summary"
  else
    grep -E "^(FAILED|ERROR)" "$WORK/tests.log" | head -20 | tee -a "$LOG"
    record tests "$(rc_status $rc)" $(($(date +%s) - t0)) "$summary"
  fi
fi

# ---------------------------------------------------------------- hf
if skipped hf; then record hf skipped 0 "--skip"; else
  t0=$(date +%s)
  HF_HUB_OFFLINE=1 run_to "$WORK/hf.log" "$(step_timeout hf)" "$PY" "$ROOT/benchmarks/gpu_hf_check.py" --device "$DEV" --out "$WORK/hf_check.json"
  rc=$?
  cat "$WORK/hf.log"
  record hf "$(rc_status $rc)" $(($(date +%s) - t0)) "$(grep -cE '^(llama|qwen2|gpt2) .* ok$' "$WORK/hf.log") family x dtype cases ok, $(grep -cE '^(llama|qwen2|gpt2) .* FAIL$' "$WORK/hf.log") failed"
fi

# ---------------------------------------------------------------- run (CUDA beside CPU, concurrently)
if skipped run; then record run skipped 0 "--skip"
elif [ $RUN_DEPS_OK -ne 1 ]; then record run fail 0 "packages missing (see the wheels step)"
else
  t0=$(date +%s)
  t=$(step_timeout run)
  rm -rf "$WORK/run-cuda" "$WORK/run-cpu"
  (cd /tmp && HF_HUB_OFFLINE=1 timeout -k 5 "$t" "$PY" -m ponder "${RUN_ARGS[@]}" --device "$DEV" --out "$WORK/run-cuda" >"$WORK/run-cuda.log" 2>&1) &
  pid_cuda=$!
  (cd /tmp && HF_HUB_OFFLINE=1 timeout -k 5 "$t" "$PY" -m ponder "${RUN_ARGS[@]}" --device cpu --out "$WORK/run-cpu" >"$WORK/run-cpu.log" 2>&1) &
  pid_cpu=$!
  wait $pid_cuda; rc_cuda=$?
  wait $pid_cpu; rc_cpu=$?
  cat "$WORK/run-cuda.log" "$WORK/run-cpu.log" >>"$LOG"
  tail -5 "$WORK/run-cuda.log"
  "$PY" "$ROOT/benchmarks/gpu_compare_runs.py" "$WORK/run-cpu" "$WORK/run-cuda" --names cpu,cuda \
    --out "$WORK/run_compare.json" 2>&1 | tee "$WORK/run_compare.txt" | tee -a "$LOG"
  rc_cmp=${PIPESTATUS[0]}
  if [ $rc_cuda -ne 0 ]; then
    record run "$(rc_status $rc_cuda)" $(($(date +%s) - t0)) "ponder run --device cuda failed (see run-cuda.log): $(grep -E 'Error|error' "$WORK/run-cuda.log" | tail -1)"
  elif [ $rc_cpu -ne 0 ] || [ $rc_cmp -ne 0 ]; then
    record run "$(rc_status $rc_cpu)" $(($(date +%s) - t0)) "the CUDA run passed; the CPU run or the comparison failed (run-cpu.log, run_compare.txt)"
  else
    record run ok $(($(date +%s) - t0)) "$(tail -1 "$WORK/run_compare.txt")"
  fi
fi

# ---------------------------------------------------------------- bench
if skipped bench; then record bench skipped 0 "--skip"; else
  t0=$(date +%s)
  t=$(step_timeout bench)
  run_to "$WORK/bench.log" $((t - 35 > 10 ? t - 35 : 10)) "$PY" "$ROOT/benchmarks/bench_kernels.py" --device "$DEV" "${BENCH_QUICK[@]}" --out "$WORK/bench_kernels.json"
  rc=$?
  t=$(step_timeout bench)
  rc2=1
  if [ "$t" -gt 0 ]; then
    run_to "$WORK/bench.log" "$((t < 40 ? t : 40))" "$PY" "$ROOT/benchmarks/bench_kernels.py" --device "$DEV" --dtype bf16 --quick --out "$WORK/bench_kernels_bf16.json"
    rc2=$?
  fi
  grep -E "^(write_kv|copy_blocks|gather_kv|decode)" "$WORK/bench.log" | tee -a "$LOG"
  [ $rc -eq 0 ] && rc=$rc2
  record bench "$(rc_status $rc)" $(($(date +%s) - t0)) "GB/s and % of peak per kernel in bench_kernels.json (f16) and bench_kernels_bf16.json"
fi

# ---------------------------------------------------------------- sanitizer
if skipped sanitizer; then record sanitizer skipped 0 "--skip"
elif [ -z "$SANITIZER" ]; then record sanitizer fail 0 "compute-sanitizer not found"
else
  t0=$(date +%s)
  t=$(step_timeout sanitizer)
  if [ "$t" -eq 0 ]; then record sanitizer timeout 0 "no time left in the budget"; else
    # No caching allocator: every tensor is its own allocation, so memcheck sees overruns.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_to "$WORK/sanitizer.log" "$t" "$SANITIZER" --tool memcheck --print-limit 20 \
      --error-exitcode 9 "$PY" "${SAN_TESTS[@]}"
    rc=$?
    summary="$(grep -E 'ERROR SUMMARY' "$WORK/sanitizer.log" | tail -1); $(grep -E 'passed|failed' "$WORK/sanitizer.log" | tail -1)"
    if [ $rc -ne 0 ] && grep -q "Device not supported" "$WORK/sanitizer.log"; then
      # seen on the gVisor runtime of the H200 machines (device tool KINDS.md): the tool, not ponder
      record sanitizer unavailable $(($(date +%s) - t0)) "compute-sanitizer refused this device (Device not supported): no memcheck result"
    else
      record sanitizer "$(rc_status $rc)" $(($(date +%s) - t0)) "$summary"
    fi
  fi
fi

finish
