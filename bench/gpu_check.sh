#!/usr/bin/env bash
# `make gpu-check`, run on the lent GPU machine in one call: build in place against that machine's python3/torch,
# run the whole test suite with CUDA present, the CUDA benchmarks, and print a short table last. Full logs go to
# $OUT (the device tool brings them back) or bench/results/gpu. SANITIZE=1 adds compute-sanitizer memcheck runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
echo "== build ($(date +%T))"
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
grep -E "^pyops:" "$OUT/build.log"
$PY -c "import pyops, torch; print(pyops.build_info(), torch.cuda.get_device_name())" | tee "$OUT/build_info.txt"

echo "== tests ($(date +%T))"
$PY -m pytest tests -q -p no:cacheprovider -rfE > "$OUT/tests.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
tail -1 "$OUT/tests.log"

if [ "${SANITIZE:-0}" = 1 ]; then
  echo "== compute-sanitizer memcheck ($(date +%T))"
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest tests -q -p no:cacheprovider -k "cuda" \
    -x > "$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log"
fi

echo "== benchmarks ($(date +%T))"
$PY -m pytest bench --device cuda -q -p no:cacheprovider --benchmark-warmup=on --benchmark-min-rounds=10 \
  --benchmark-max-time=0.3 --benchmark-json="$OUT/bench-cuda.json" > "$OUT/bench.log" 2>&1 || status=1
tail -2 "$OUT/bench.log"
$PY bench/report.py "$OUT/bench-cuda.json" --out "$OUT" --quiet || status=1
echo "== summary ($(date +%T)); tests: $(tail -1 "$OUT/tests.log")"
cat "$OUT/summary.md"
exit $status
