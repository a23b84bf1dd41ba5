#!/usr/bin/env bash
# One GPU check, offline, on a bare GPU machine with PyTorch (CUDA) and Triton: the GPU
# tests, then bench.dp_noise's table (issue 28). Under 10 minutes on an H100.
#
#   here, once, where a package registry is reachable:  make gpu-kit
#   there, from a copy of this tree holding .gpu-kit/: bash bench/gpu_check.sh
#
# `make gpu-kit` downloads the wheels fedsilo's DP path needs beyond PyTorch, NumPy,
# SciPy, pytest and hypothesis (Opacus, cryptography and its cffi) into .gpu-kit/ for
# CPython $GPU_PY (default 3.12) on x86-64 Linux. This script installs them with no index
# into a scratch folder, makes this tree importable as `fedsilo`, and writes what it
# measured to $OUT (or .gpu-check/): gpu_tests.log, dp_noise_cuda.json, gpu_check.md.
# PYTHON (default python3) is the interpreter that holds the CUDA build of PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-$ROOT/.gpu-check}
SITE=$(mktemp -d /tmp/fedsilo-gpu-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$RESULTS"

if ls .gpu-kit/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" .gpu-kit/*.whl
fi
ln -s "$ROOT" "$SITE/fedsilo"  # the repository root is the package (pyproject: package-dir)
export PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
import torch, fedsilo.task.rng, fedsilo.task.chacha as c
print("torch", torch.__version__, "| cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "",
      "| triton kernel:", c.triton_available())
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this check is for a GPU machine")
PY
DEVICE=cuda
echo "== GPU tests"
# the tests that run on a GPU where there is one (they skip on CI's CPUs)
"$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
  tests/task/test_chacha.py tests/task/test_rng.py tests/task/test_train.py \
  2>&1 | tee "$RESULTS/gpu_tests.log" | tail -5
echo "== bench.dp_noise --device $DEVICE"
"$PYTHON" -m bench.dp_noise --device "$DEVICE" --models cnn,mlp_17m,mlp_67m \
  --precisions fp32,bf16,fp16 --reps 20 | tee "$RESULTS/gpu_check.md"
cp bench/results/dp_noise_cuda.json "$RESULTS/" 2>/dev/null || true
