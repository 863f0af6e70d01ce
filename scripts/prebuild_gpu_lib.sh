#!/usr/bin/env bash
# Build the CMake library with its CUDA kernels against the GPU machine's torch (2.11.0, from
# .venv-torch211, which .ci/run creates) into prebuilt/ (git-ignored), to carry to the device:
#   device.run(command="bash scripts/gpu_check.sh 1", carry=["prebuilt"])
# scripts/gpu_check.sh then loads it (RETINA_FAST_LIBRARY) instead of compiling there, which
# saves a few of the 15 device minutes. It is used only if prebuilt/SOURCE_HASH matches the
# sources on the device and the library loads there; otherwise gpu_check builds as usual.
# Takes ~10 min on 2 cores. Usage: bash scripts/prebuild_gpu_lib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
V2=${VENV:-.venv-torch211}
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}
"$V2/bin/python" -c "import torch; assert torch.__version__.startswith('2.11'), torch.__version__" \
  || { echo "prebuild_gpu_lib: $V2 must hold torch 2.11 (run .ci/run, or see its torch 2.11 step)"; exit 2; }
SP=$("$V2/bin/python" -c 'import site; print(site.getsitepackages()[0])')
CUDA_ROOT=$("$V2/bin/python" build_tools/cuda_env.py)
SHIM=$("$V2/bin/python" build_tools/cuda_env.py --shim "$PWD/build-prebuilt-include")
cmake -S . -B build-prebuilt -DCMAKE_PREFIX_PATH="$("$V2/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
  -DRETINA_FAST_WITH_CUDA=ON -DRETINA_FAST_CUDA_ARCH_LIST="$ARCHS" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DRETINA_FAST_CUDA_EXTRA_INCLUDE="$SHIM" \
  -DCUDA_nvrtc_LIBRARY="$SP/nvidia/cu13/lib/libnvrtc.so.13" > build-prebuilt.log 2>&1 || { tail -30 build-prebuilt.log; exit 1; }
cmake --build build-prebuilt -j"${MAX_JOBS:-2}" >> build-prebuilt.log 2>&1 || { tail -30 build-prebuilt.log; exit 1; }
mkdir -p prebuilt
cp build-prebuilt/libretina_fast.so prebuilt/
bash scripts/source_hash.sh > prebuilt/SOURCE_HASH
"$V2/bin/python" build_tools/check_kernels.py --lib prebuilt/libretina_fast.so --require-cuda | tail -1
echo "prebuilt/libretina_fast.so for torch 2.11, archs $ARCHS, sources $(cat prebuilt/SOURCE_HASH)"
