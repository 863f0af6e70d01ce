#!/usr/bin/env bash
# Set up retina_fast from nothing: a virtual environment (.venv unless VENV is set), torch +
# torchvision and the test/demo dependencies, then the extension built in place (with its CUDA
# kernels when a CUDA toolkit is found; FORCE_CUDA=1 makes that mandatory, FORCE_CUDA=0 skips it).
# Idempotent: a second run reuses the venv and rebuilds only what changed.
# The packages are pyproject.toml's extras [cli] and [test] (tests/test_packaging.py checks that
# both lists below hold every one), installed by name here because the editable install below
# runs with --no-deps (it must not replace the torch installed first).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
# (YOLO_OFFLINE: importing ultralytics probes the network otherwise)
if ! YOLO_OFFLINE=1 "$VENV/bin/python" -c "import torch, torchvision, numpy, pycocotools, PIL, matplotlib, tqdm, yaml, tensorboard, pytest, pytest_benchmark, expecttest, faster_coco_eval, ninja, build, hypothesis, onnx, onnxruntime, onnxscript, ultralytics, effdet" 2>/dev/null; then
  echo "== installing $TORCH_SPEC and dependencies"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC numpy \
      pycocotools pillow matplotlib tqdm pyyaml tensorboard \
      pytest pytest-benchmark expecttest faster-coco-eval ninja build hypothesis onnx onnxruntime onnxscript \
      ultralytics==8.4.190 effdet==0.4.1
fi

echo "== building the extension (FORCE_CUDA=${FORCE_CUDA:-auto}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
# --no-build-isolation: compile against the torch installed above, not a second copy.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import retina_fast, torch; print('retina_fast', retina_fast.__version__, '| torch', torch.__version__, '| CUDA kernels compiled:', retina_fast.cuda_built())"
