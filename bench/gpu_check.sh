#!/usr/bin/env bash
# `make gpu-check`, run on the lent GPU machine in one call, against that machine's own python3 and torch:
#   1. the extension: a carried pyops/_C for this exact python/torch is used if it imports with CUDA; else it is
#      built in place here for the visible GPU;
#   2. the CUDA half of the test suite (`-m cuda`: the cuda side of the `device` fixture and the CUDA-only tests;
#      the CPU half is CI's), in parallel when pytest-xdist is there;
#   3. bench/profile_conv1d.py, conv1d's pieces timed alone (a diagnostic; its table stays in the archive);
#   4. the CUDA benchmarks, one pytest run per suite so a suite that overruns loses only its own numbers;
#   5. a short table last.
# Full logs go to $OUT (the device tool brings them back) or bench/results/gpu.
# Knobs: PHASES="tests profile bench" (any of them), BENCH="conv_bn_relu conv1d ..." (suites, in order), BENCH_K (a
# pytest -k expression for the benchmarks), SANITIZE=1 adds a compute-sanitizer memcheck run of the CUDA tests,
# TEST_TIMEOUT / PROFILE_TIMEOUT / BENCH_TIMEOUT in seconds. At the end, everything in $OUT but summary.md goes into gpu-check.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
PHASES=${PHASES:-tests profile bench}
BENCH=${BENCH:-peak conv_bn_relu conv1d sliding smooth_max fuse}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
export PYOPS_BENCH_COMPILE=0  # torch.compile's GPU numbers are in shared/anchors already
status=0
t0=$(date +%s)
stamp() { echo "== $1 (+$(( $(date +%s) - t0 )) s)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
probe='import pyops, torch; i = pyops.build_info(); assert i["cuda"] and i["torch_version"] == torch.__version__, i; print(i, torch.__version__, torch.cuda.get_device_name())'
if $PY -c "$probe" > "$OUT/build_info.txt" 2>&1; then
  stamp "carried extension imports"
else
  stamp "build"
  cat "$OUT/build_info.txt"
  rm -f pyops/_C*.so
  if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  $PY -c "$probe" > "$OUT/build_info.txt" 2>&1 || { cat "$OUT/build_info.txt"; exit 1; }
fi
cat "$OUT/build_info.txt"

if [[ " $PHASES " == *" tests "* ]]; then
  stamp "tests"
  par=(); $PY -c "import xdist" 2>/dev/null && par=(-n 8)
  to=(); $PY -c "import pytest_timeout" 2>/dev/null && to=(--timeout 120)
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest tests -m cuda -q -p no:cacheprovider -rfE "${par[@]}" "${to[@]}" \
    > "$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-200 | head -40
  tail -1 "$OUT/tests.log"
  if [ "${SANITIZE:-0}" = 1 ]; then
    stamp "compute-sanitizer memcheck"
    compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest tests -m cuda -q -p no:cacheprovider -x \
      > "$OUT/memcheck.log" 2>&1 || status=1
    tail -3 "$OUT/memcheck.log"
  fi
fi

if [[ " $PHASES " == *" profile "* ]]; then
  stamp "profile_conv1d"
  timeout "${PROFILE_TIMEOUT:-120}" $PY bench/profile_conv1d.py > "$OUT/profile-conv1d.md" 2>&1 || status=1
  echo "$(grep -c '^| ' "$OUT/profile-conv1d.md") rows in profile-conv1d.md"
fi

if [[ " $PHASES " == *" bench "* ]]; then
  jsons=()
  for suite in $BENCH; do
    stamp "bench_$suite"
    timeout "${BENCH_TIMEOUT:-150}" $PY -m pytest "bench/bench_$suite.py" --device cuda -q -p no:cacheprovider \
      -k "${BENCH_K:-not nothing}" --benchmark-warmup=on --benchmark-min-rounds=10 --benchmark-max-time=0.2 \
      --benchmark-json="$OUT/bench-$suite.json" > "$OUT/bench-$suite.log" 2>&1 || status=1
    tail -1 "$OUT/bench-$suite.log"
    [ -s "$OUT/bench-$suite.json" ] && jsons+=("$OUT/bench-$suite.json")
  done
  if [ ${#jsons[@]} -gt 0 ]; then
    $PY bench/report.py "${jsons[@]}" --out "$OUT" --quiet || status=1
    stamp "summary"
    cat "$OUT/summary.md"
  fi
fi
[ -f "$OUT/tests.log" ] && echo "tests: $(tail -1 "$OUT/tests.log")"
# The device tool brings back at most 8 files: everything but the summary travels as one archive.
(cd "$OUT" && tar czf gpu-check.tgz --exclude=gpu-check.tgz --exclude=summary.md -- * && \
  find . -maxdepth 1 -type f ! -name gpu-check.tgz ! -name summary.md -delete)
exit $status
