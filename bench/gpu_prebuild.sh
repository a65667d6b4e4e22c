#!/usr/bin/env bash
# Builds pyops/_C here for the lent GPU machine's python and torch, so `make gpu-check` there spends no device time
# compiling (it uses a carried _C that imports and matches torch, else builds in place). Nothing built in .venv runs
# there: that machine has its own Python (3.12) and torch (2.11.0+cu130 as of 2026-11-27; see shared/ENVIRONMENT.md).
#
#   bash bench/gpu_prebuild.sh            # ~12 min on the 2-core dev machine (sm_90 only), then:
#   device run: `OUT=$OUT bash bench/gpu_check.sh` with carry ["pyops/_C.cpython-312-x86_64-linux-gnu.so"]
#
# Knobs: GPU_PYTHON (an interpreter of the GPU machine's Python version), GPU_TORCH (its torch version, from the
# local package mirror), TORCH_CUDA_ARCH_LIST (9.0: H100/H200), WORK (scratch folder, reused between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON=${GPU_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}
GPU_TORCH=${GPU_TORCH:-2.11.0}
WORK=${WORK:-/tmp/pyops-gpu-prebuild}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

if [ ! -x "$WORK/venv/bin/python" ]; then
  "$GPU_PYTHON" -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q --upgrade pip
  "$WORK/venv/bin/python" -m pip install -q "torch==$GPU_TORCH" numpy pybind11 ninja setuptools
fi
mkdir -p "$WORK/src"
git ls-files -z csrc setup.py pyproject.toml pyops | xargs -0 tar -cf - | tar -xf - -C "$WORK/src"  # tracked files, as edited
(cd "$WORK/src" && "$WORK/venv/bin/python" setup.py build_ext --inplace > build.log 2>&1) || {
  tail -30 "$WORK/src/build.log"; exit 1; }
so=$(cd "$WORK/src" && ls pyops/_C.cpython-*.so)
strip --strip-debug -o "$so" "$WORK/src/$so"  # debug info would be ~20 MB of the 64 MB a device call may carry
"$WORK/venv/bin/python" -c "import sys; sys.path.insert(0, '.'); import pyops; print(pyops.build_info())"
echo "built $so: carry it in the device call"
