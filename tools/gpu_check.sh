#!/usr/bin/env bash
# One-command check of the CUDA backend on a bare GPU machine (no network needed).
#
#   bash tools/gpu_check.sh 2>&1 | tee gpu_check.log        # from the repository root
#
# Steps (each timed; a failure is reported and the next step still runs):
#   env        GPU, nvcc, torch, the Python build tools; fails when torch sees no GPU
#   install    FWPKM_CUDA=1 FWPKM_CUDA_ARCHS=90 pip install --no-build-isolation --no-deps --no-index .
#   build_info the installed fwpkm_ext's build_info(); fails unless it has CUDA kernels
#   test_cuda  python -m pytest -q python_tests/test_cuda.py (log: pytest_cuda.log)
#   sanitizer  compute-sanitizer --tool memcheck on a tiny fwpkm_memory and streaming run on CUDA
#              (skipped with a message when compute-sanitizer is absent or refuses the device)
#   bench      tools/gpu_bench.py (paper configuration; JSON in the output folder)
#   bench_rows tools/bench.py --device cuda: streaming, layer, PKM, the LM with and without its
#              memory, the floor (bench_rows.json)
#   profile    tools/gpu_profile.py: wall vs device-busy time, kernels per call (profile.json)
#   selftest   nvcc-builds and runs csrc/cuda/tests/selftest.cu --bench (kernels vs CPU kernels)
#   test_cpu   the CPU functional tests (python_tests/test_functional.py; log: pytest_cpu.log)
# then a summary table. Exit status: 0 when no step FAILED or TIMED OUT, 1 otherwise.
#
# Python runs with PYTHONSAFEPATH=1 after the install, so the tests import the INSTALLED package,
# not the source folder (which has no compiled _C there). If pip install fails (it is reported as
# a failure), a fallback in-place CMake build lets the GPU steps run on the source tree.
#
# Environment (all optional):
#   PYTHON                 interpreter (default: python3, else python)
#   FWPKM_CUDA_ARCHS       CUDA architectures to build (default 90: H100/H200)
#   FWPKM_CHECK_BUDGET_S   total seconds for all steps (default 570, to fit a 10-minute call)
#   FWPKM_CHECK_OUT        folder for bench.json and summary.txt (default $OUT if set, else
#                          /tmp/fwpkm_gpu_check)
#   FWPKM_CHECK_CPU_TESTS  CPU test files to run (default python_tests/test_functional.py)
#   FWPKM_CHECK_BENCH_ARGS extra arguments for tools/gpu_bench.py (e.g. "--no-train")
#   FWPKM_CHECK_ROWS_ARGS  extra arguments for the tools/bench.py step
#   FWPKM_CHECK_SKIP       step names to skip, space-separated (e.g. "selftest test_cpu")
# shellcheck disable=SC2317  # the step functions run indirectly, through `bash -c`
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
export REPO

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi
export PY
export FWPKM_CUDA=1
export FWPKM_CUDA_ARCHS=${FWPKM_CUDA_ARCHS:-90}
export PYTHONUNBUFFERED=1
BUDGET=${FWPKM_CHECK_BUDGET_S:-570}
CHECK_OUT=${FWPKM_CHECK_OUT:-${OUT:-/tmp/fwpkm_gpu_check}}
mkdir -p "$CHECK_OUT"
WORK=$(mktemp -d /tmp/fwpkm_check.XXXXXX)
export CHECK_OUT WORK
START=$(date +%s)
DEADLINE=$((START + BUDGET))

NAMES=(); STATUS=(); SECS=(); NOTES=()
BUILD_OK=1

# run_step NAME CAP_SECONDS FUNCTION: runs FUNCTION under `timeout`, capped by the time left.
# The function's exit status: 0 PASS, 77 SKIP, 124/137 TIMEOUT, anything else FAIL.
run_step() {
  local name=$1 cap=$2 fn=$3 note=""
  local now left rc t0 t1 secs st
  case " ${FWPKM_CHECK_SKIP:-} " in
    *" $name "*) skip_step "$name" "in FWPKM_CHECK_SKIP"; return ;;
  esac
  now=$(date +%s); left=$((DEADLINE - now - 5))
  if [ "$left" -lt 15 ]; then
    NAMES+=("$name"); STATUS+=("NOTRUN"); SECS+=("0.0"); NOTES+=("no time left in the ${BUDGET}s budget")
    echo "=== [$name] not run: no time left"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo
  echo "=================================================================== [$name] (limit ${cap}s)"
  rm -f "$WORK/note"
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$cap" bash -c "$fn"
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  [ -f "$WORK/note" ] && note=$(head -c 200 "$WORK/note" | tr '\n' ' ')
  case $rc in
    0) st=PASS ;;
    77) st=SKIP ;;
    124|137) st=TIMEOUT; note="killed after ${cap}s ${note}" ;;
    *) st=FAIL; note="exit $rc ${note}" ;;
  esac
  echo "=== [$name] $st in ${secs}s ${note}"
  NAMES+=("$name"); STATUS+=("$st"); SECS+=("$secs"); NOTES+=("$note")
}

skip_step() {  # skip_step NAME REASON
  NAMES+=("$1"); STATUS+=("SKIP"); SECS+=("0.0"); NOTES+=("$2")
  echo "=== [$1] skipped: $2"
}

# ------------------------------------------------------------------------------- the steps
step_env() {
  nvidia-smi -L || nvidia-smi || echo "(nvidia-smi failed)"
  command -v nvcc && nvcc --version | tail -2
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "pybind11", "cmake", "ninja", "setuptools", "pytest", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:<11}{getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"  {name:<11}MISSING ({type(exc).__name__})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
if not torch.cuda.is_available():
    open(__import__("os").environ["WORK"] + "/note", "w").write("torch sees no GPU")
    sys.exit(1)
print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
}

# pyrun ARGS...: Python that imports the fwpkm_ext under test: the installed one (PYTHONSAFEPATH:
# the source folder is not on sys.path), or, after a failed pip install whose fallback in-place
# build worked, the source folder (PYTHONPATH=$REPO).
pyrun() {
  if [ "${FWPKM_CHECK_MODE:-installed}" = inplace ]; then
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$@"
  else
    PYTHONSAFEPATH=1 "$PY" "$@"
  fi
}

step_install() {
  echo "FWPKM_CUDA=$FWPKM_CUDA FWPKM_CUDA_ARCHS=$FWPKM_CUDA_ARCHS"
  "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir . || {
    echo "pip install failed (see above; pyproject.toml needs setuptools>=77)" > "$WORK/note"
    return 1; }
}

step_build_inplace() {
  # Fallback after a failed pip install, so that the GPU steps still run: CMake directly (the
  # same CMakeLists.txt that setup.py drives), no setuptools involved, _C into ./fwpkm_ext.
  local version gen=() cmake_bin
  version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1)
  cmake_bin=$(command -v cmake || true)
  [ -z "$cmake_bin" ] && cmake_bin=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  if ! "$cmake_bin" -S . -B "$WORK/cmake_build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DFWPKM_CUDA=ON -DFWPKM_CUDA_ARCHS="$FWPKM_CUDA_ARCHS" -DFWPKM_VERSION="${version:-0.0.0}" \
      -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
      -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$REPO/fwpkm_ext" ||
     ! "$cmake_bin" --build "$WORK/cmake_build" --parallel "$(nproc)"; then
    echo "in-place CMake build failed too" > "$WORK/note"; return 1
  fi
  echo "in-place CMake build: the next steps import fwpkm_ext from $REPO" > "$WORK/note"
}

step_build_info() {
  cd "$WORK" && pyrun - <<'EOF'
import os, sys
import fwpkm_ext
info = fwpkm_ext.build_info()
print("fwpkm_ext", fwpkm_ext.__version__, "from", os.path.dirname(fwpkm_ext.__file__))
print("build_info:", info)
open(os.environ["WORK"] + "/note", "w").write(f"cuda={info.get('cuda')} archs={info.get('cuda_archs')!r}")
if not info.get("cuda"):
    open(os.environ["WORK"] + "/note", "w").write("installed build has no CUDA kernels")
    sys.exit(1)
EOF
}

run_pytest() {  # run_pytest FILES...: pytest, its closing line becomes the step's note
  set -o pipefail
  pyrun -m pytest -q -rs --tb=short -p no:cacheprovider "$@" 2>&1 | tee "$WORK/pytest.log"
  local rc=$?
  cp "$WORK/pytest.log" "$CHECK_OUT/pytest_${PYTEST_NAME:-tests}.log" 2>/dev/null
  grep -E "(passed|failed|error|skipped|no tests ran)" "$WORK/pytest.log" | tail -1 | tr -d '=' > "$WORK/note"
  return "$rc"
}

step_test_cuda() {
  PYTEST_NAME=cuda run_pytest python_tests/test_cuda.py
}

step_test_cpu() {
  local files=${FWPKM_CHECK_CPU_TESTS:-python_tests/test_functional.py} have="" f
  for f in $files; do [ -e "$f" ] && have="$have $f"; done
  if [ -z "$have" ]; then echo "no CPU test file found ($files)" | tee "$WORK/note"; return 77; fi
  # shellcheck disable=SC2086
  PYTEST_NAME=cpu run_pytest $have
}

step_selftest() {
  local first=${FWPKM_CUDA_ARCHS%%[;, ]*} arch=native
  first=${first%-real}; first=${first%-virtual}
  case $first in [0-9]*) arch="sm_$first" ;; esac
  echo "nvcc -arch=$arch ..."
  nvcc -std=c++17 -O3 -DFWPKM_WITH_CUDA -Icsrc -arch="$arch" csrc/cuda/tests/selftest.cu \
    csrc/cuda/kernels.cu csrc/cpu/kernels.cpp csrc/cpu/dispatch.cpp -o "$WORK/fwpkm_selftest" || {
    echo "selftest did not compile" > "$WORK/note"; return 1; }
  "$WORK/fwpkm_selftest" --bench
}

step_sanitizer() {
  local cs
  cs=$(command -v compute-sanitizer || true)
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$cs" ] && [ -x "$c" ] && cs=$c
  done
  if [ -z "$cs" ]; then
    echo "compute-sanitizer not found: memcheck skipped" | tee "$WORK/note"; return 77
  fi
  cat > "$WORK/sanitize_case.py" <<'EOF'
# Tiny CUDA run of every kernel path under memcheck (forward, backward, both score kinds, shared
# and per-sequence state, vectorized and scalar row widths, the atomic scatter).
import torch
import fwpkm_ext
from fwpkm_ext import recurrence, _native
from fwpkm_ext.functional import fwpkm_memory

torch.manual_seed(0)
for dv, per_seq, score in ((64, False, "idw"), (37, True, "dot")):
    B, T, H, dk, n = 2, 21, 2, 16, 8
    S = (B,) if per_seq else ()
    q = torch.randn(B, T, H, dk, device="cuda", requires_grad=True)
    v = torch.randn(B, T, dv, device="cuda", requires_grad=True)
    g = torch.rand(B, T, device="cuda", requires_grad=True)
    keys = ((torch.rand(*S, H, 2, n, dk // 2, device="cuda") * 2 - 1) / dk ** 0.5).requires_grad_()
    values = (torch.randn(*S, n * n, dv, device="cuda") / dv ** 0.5).requires_grad_()
    out = fwpkm_memory(q, v, g, keys, values, topk=3, chunk_size=8, score=score, backend="cuda")
    sum((o * o).sum() for o in out).backward()
    torch.cuda.synchronize()
rows = torch.randint(0, 50, (120,), device="cuda")
urows, offsets, order, _ = recurrence.segments(rows)
table = torch.zeros(50, 37, device="cuda")
_native.scatter_rows(table, urows, offsets, order, torch.randn(120, device="cuda"),
                     torch.randn(40, 37, device="cuda"), 3, deterministic=False)
torch.cuda.synchronize()
# the streaming path: in-place state, pending tokens across calls, skip mode with a NaN
st = fwpkm_ext.MemoryState(
    config=fwpkm_ext.MemoryConfig(n_subkeys=8, key_dim=16, value_dim=24, heads=2, topk=3,
                                  chunk_size=8, lookahead=1, lr=1.0),
    keys=(torch.rand(1, 2, 2, 8, 8, device="cuda") * 2 - 1) / 4,
    values=torch.randn(1, 64, 24, device="cuda") / 5, per_sequence=False)
with torch.no_grad():
    for a, b in ((0, 5), (5, 19), (19, 30)):
        q = torch.randn(2, b - a, 2, 16, device="cuda")
        q[0, 0, 0, 0] = float("nan")
        _, st = fwpkm_ext.memory_step(q, torch.randn(2, b - a, 24, device="cuda"),
                                      torch.rand(2, b - a, device="cuda"), st, inplace=True,
                                      flush=b == 30, nonfinite="skip")
torch.cuda.synchronize()
print("sanitize case ran")
EOF
  # no caching allocator: every tensor is its own allocation, so memcheck sees every overrun
  local pyenv="PYTHONSAFEPATH=1"
  [ "${FWPKM_CHECK_MODE:-installed}" = inplace ] && pyenv="PYTHONPATH=$REPO"
  cd "$WORK" && env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$pyenv" \
    "$cs" --tool memcheck --error-exitcode 1 --report-api-errors no "$PY" sanitize_case.py \
    > "$WORK/sanitizer.log" 2>&1
  local rc=$?
  cp "$WORK/sanitizer.log" "$CHECK_OUT/sanitizer.log" 2>/dev/null
  tail -n 40 "$WORK/sanitizer.log"
  if grep -q -e "Device not supported" -e "device is not supported" "$WORK/sanitizer.log"; then
    echo "compute-sanitizer refused this device (e.g. under gVisor): memcheck skipped" | tee "$WORK/note"
    return 77
  fi
  grep -o "ERROR SUMMARY: [0-9]* error[s]*" "$WORK/sanitizer.log" | tail -1 > "$WORK/note"
  return "$rc"
}

step_bench() {
  # shellcheck disable=SC2086
  pyrun tools/gpu_bench.py --json "$CHECK_OUT/bench.json" ${FWPKM_CHECK_BENCH_ARGS:-}
}

step_bench_rows() {
  # tools/bench.py's rows on the GPU: memory_step streaming (in place), the layer, static PKM,
  # the default model's LM with and without its memory (training step and streaming) and the
  # floor; no peers (not installed there) and no reference rows (gpu_bench has those)
  # shellcheck disable=SC2086
  pyrun tools/bench.py --device cuda --no-peers --no-reference --timeout 90 \
    --stream-seqs 4096 32768 --stream-seqs-b8 4096 \
    --only stream/native layer_stream/native pkm_fwd/native pkm_train/native lm_train lm_stream floor \
    --json "$CHECK_OUT/bench_rows.json" ${FWPKM_CHECK_ROWS_ARGS:-}
}

step_profile() {
  # wall time against the device's busy time and the launches per call (host-bound or not)
  pyrun tools/gpu_profile.py --json "$CHECK_OUT/profile.json"
}

export -f pyrun run_pytest step_bench_rows step_profile step_env step_install step_build_inplace step_build_info step_test_cuda step_test_cpu step_selftest \
  step_sanitizer step_bench

# ------------------------------------------------------------------------------- run them
echo "fwpkm_ext GPU check: repo $REPO, python $PY, archs $FWPKM_CUDA_ARCHS, budget ${BUDGET}s,"
echo "output folder $CHECK_OUT, scratch $WORK"

run_step env 60 step_env
export FWPKM_CHECK_MODE=installed
run_step install 300 step_install
if [ "${STATUS[-1]}" != PASS ]; then
  run_step build_inplace 240 step_build_inplace
  if [ "${STATUS[-1]}" = PASS ]; then FWPKM_CHECK_MODE=inplace; else BUILD_OK=0; fi
fi
# most important first: when the budget runs out, the later steps are the ones reported NOTRUN
if [ "$BUILD_OK" = 1 ]; then
  run_step build_info 60 step_build_info
  run_step test_cuda 240 step_test_cuda
  run_step sanitizer 150 step_sanitizer
  run_step bench 200 step_bench
  run_step bench_rows 180 step_bench_rows
  run_step profile 90 step_profile
else
  for s in build_info test_cuda sanitizer bench bench_rows profile; do skip_step "$s" "no build"; done
fi
run_step selftest 150 step_selftest
if [ "$BUILD_OK" = 1 ]; then
  run_step test_cpu 150 step_test_cpu
else
  skip_step test_cpu "no build"
fi

# ------------------------------------------------------------------------------- summary
# FAIL, TIMEOUT and NOTRUN fail the check; SKIP (a tool or file that is absent, or the steps
# after a failed install, which has failed the check already) does not.
FAILED=0
SUMMARY="$CHECK_OUT/summary.txt"
{
  echo
  echo "fwpkm_ext GPU check summary ($(date -u +%FT%TZ), total $(( $(date +%s) - START ))s," \
    "archs $FWPKM_CUDA_ARCHS)"
  printf '%-13s %-8s %8s  %s\n' step status seconds note
  printf '%-13s %-8s %8s  %s\n' ------------- -------- -------- ----
  for i in "${!NAMES[@]}"; do
    printf '%-13s %-8s %8s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done
} > "$SUMMARY"
for st in "${STATUS[@]}"; do
  case $st in FAIL|TIMEOUT|NOTRUN) FAILED=1 ;; esac
done
if [ "$FAILED" = 0 ]; then echo "RESULT: OK" >> "$SUMMARY"; else echo "RESULT: FAILED" >> "$SUMMARY"; fi
cat "$SUMMARY"
rm -rf "$WORK"
exit "$FAILED"
