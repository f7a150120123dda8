#!/usr/bin/env bash
# Everything GPU-side in one call on the lent H100/H200 (torch, triton, timm, nvcc, ncu and
# compute-sanitizer there; no DALI, no network): build the extension against that torch, record
# each CUDA kernel's registers / shared memory, run the whole test suite (CUDA and Triton tests
# run on the GPU, bf16 included), compute-sanitizer memcheck over the CUDA kernel tests and
# racecheck over the shared-memory ones, then every benchmark suite; JSON and logs under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} TRITON_PRINT_AUTOTUNING=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $1 ($(date +%T))"; }

step env
{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > "$OUT/env.txt" 2>&1
$PY -m pip install safetensors pydicom pytest-benchmark > "$OUT/pip.log" 2>&1 || true

step build
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build_seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/env.txt"
$PY -m usfmae_fast.cli info --json > "$OUT/info.json"
"$CUDA_HOME/bin/cuobjdump" --dump-resource-usage usfmae_fast/_C*.so > "$OUT/cuda_resource_usage.txt" 2>&1

step tests
# No -x: one call must report everything. The GPU machine lacks the ingest / DALI packages
# (opencv, PyAV, nibabel, DALI), so those modules' collection errors are reported, not fatal.
$PY -m pytest tests -q --continue-on-collection-errors --durations=15 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -25 "$OUT/tests.log"

step sanitizer
SAN="$CUDA_HOME/bin/compute-sanitizer"
[ -x "$SAN" ] || SAN=$(command -v compute-sanitizer)
if [ -n "$SAN" ] && [ -f tests/test_cuda_kernels.py ]; then
  "$SAN" --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_cuda_kernels.py -q -x -k "not fuzz" > "$OUT/memcheck.log" 2>&1 || status=1
  "$SAN" --tool racecheck --error-exitcode 3 $PY -m pytest tests/test_cuda_kernels.py -q -x -k "not fuzz and (masking or attention)" > "$OUT/racecheck.log" 2>&1 || status=1
  tail -5 "$OUT/memcheck.log" "$OUT/racecheck.log"
fi

step benchmarks
# usfmae-fast bench: every suite, JSON + summary.md + speedups.png + provenance.json under $OUT/bench
$PY -m usfmae_fast.cli bench --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log" "$OUT/bench/summary.md"
exit "$status"
