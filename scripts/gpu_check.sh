#!/usr/bin/env bash
# The one prepared script for a GPU machine: build in place for the local GPU, run the CUDA
# tests (parity with the CPU kernels and the references), compute-sanitizer (memcheck and
# racecheck) on a short run of every kernel, and the CUDA benchmarks. Everything lands in
# OUTDIR (first argument, else $OUT, else ./gpu_check_out), at most 8 files:
#   summary.txt env.txt build.log tests.log sanitizer.log bench.log bench.json
# Fails fast, with a clear message, where there is no GPU. Meant to finish in < 8 min on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
t0=$(date +%s)

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  note "gpu_check: no NVIDIA GPU visible (nvidia-smi failed): nothing to check here"; exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)"; exit 2
fi
{ date -u; nvidia-smi; nvcc --version; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUTDIR/env.txt" 2>&1
note "env: $("$PY" -c "import torch; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)")"

# 1. build in place for this GPU
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if "$PY" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1 && "$PY" -c "import retina_fast, sys; sys.exit(0 if retina_fast.cuda_built() else 1)"; then
  note "build: ok ($(( $(date +%s) - t0 )) s)"
else
  note "build: FAILED (see build.log)"; tail -30 "$OUTDIR/build.log"; exit 1
fi

# 2. tests: the CUDA ones (parity with the CPU kernels and the references, gradcheck, opcheck,
#    compile) of the ops and the model; the CPU tests run in CI
t1=$(date +%s)
timeout 240 "$PY" -m pytest tests/ops tests/models -q -p no:cacheprovider -rs -k cuda > "$OUTDIR/tests.log" 2>&1
rc=$?
note "tests: rc=$rc ($(( $(date +%s) - t1 )) s): $(tail -1 "$OUTDIR/tests.log")"

# 3. compute-sanitizer on a short run of each kernel
t1=$(date +%s)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  : > "$OUTDIR/sanitizer.log"
  for tool in memcheck racecheck; do
    timeout 150 "$SAN" --tool "$tool" --error-exitcode 3 "$PY" scripts/cuda_smoke.py >> "$OUTDIR/sanitizer.log" 2>&1
    note "compute-sanitizer $tool: rc=$? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUTDIR/sanitizer.log") clean summaries so far)"
  done
else
  note "compute-sanitizer: not found"
fi
note "sanitizer time: $(( $(date +%s) - t1 )) s"

# 4. CUDA benchmarks (ours vs torchvision vs reference, same inputs, same run)
t1=$(date +%s)
timeout 150 "$PY" -m pytest benchmarks -q -p no:cacheprovider -k cuda --benchmark-only \
  --benchmark-json="$OUTDIR/bench.json" --benchmark-columns=median,iqr,rounds > "$OUTDIR/bench.log" 2>&1
note "benchmarks: rc=$? ($(( $(date +%s) - t1 )) s)"
"$PY" scripts/bench_table.py "$OUTDIR/bench.json" >> "$SUMMARY" 2>&1 || true
note "gpu_check total: $(( $(date +%s) - t0 )) s"
cat "$SUMMARY"
