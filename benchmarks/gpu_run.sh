#!/usr/bin/env bash
# Everything GPU-side in one call (the lent H100/H200 has torch, triton, timm and nvcc, no DALI):
# build the extension against the machine's torch, run the whole test suite (CUDA tests included)
# and every benchmark suite, writing reports and JSON under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda)"; } > "$OUT/env.txt" 2>&1
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
pip install safetensors pydicom pytest-benchmark > "$OUT/pip.log" 2>&1 || true
$PY -m usfmae_fast.cli info --json > "$OUT/info.json"
$PY -m pytest tests -q -x -m "not slow" --junitxml="$OUT/tests.xml" 2>&1 | tail -20
status=${PIPESTATUS[0]}
for suite in benchmarks/bench_*.py; do
  name=$(basename "$suite" .py)
  $PY -m pytest "$suite" -q --benchmark-json="$OUT/${name}.json" 2>&1 | tail -5
done
exit "$status"
