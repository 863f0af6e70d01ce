"""Build retina_fast._C: a CUDAExtension when a CUDA toolkit is found (or FORCE_CUDA=1),
a CppExtension otherwise (or with FORCE_CUDA=0).

The toolkit is located without the user's help: CUDA_HOME / CUDA_PATH when they point at a
toolkit, else the directory the real nvcc runs from (asked of nvcc itself, because nvcc on
PATH may be a wrapper script: torch's own guess, the parent of the PATH entry, is then wrong),
else /usr/local/cuda. Headers that torch's CUDA headers include but a bare toolkit lacks
(cusparse.h, cublas_v2.h, ...) come from the nvidia-* wheels that a CUDA build of torch
installs (site-packages/nvidia/cu13/include, or nvidia/*/include for CUDA 12 wheels): only
those, through a folder of links (build/nvidia-missing-include), never the wheels' copies of
headers the toolkit has (toolkit and wheels may differ by a minor version).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
from cuda_env import find_cuda_home, missing_header_shim  # noqa: E402


def want_cuda(cuda_home):
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    import torch

    if torch.version.cuda is None:
        if force == "1":
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU-only build "
                     f"(torch {torch.__version__}); install a CUDA build of torch.")
        return False
    if cuda_home is None:
        if force == "1":
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                     "toolkit root (the directory holding bin/nvcc and include/cuda_runtime.h).")
        return False
    return True


def make_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    use_cuda = want_cuda(cuda_home)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    # -fno-trapping-math lets GCC if-convert (and so vectorise) loops with ?: on floats;
    # -ffp-contract=off keeps a*b+c rounded twice, as torch computes it (bitwise parity).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    # at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp
    # in *our* compile it silently runs on one thread. The runtime is the libgomp.so.1 torch
    # already loaded (same soname).
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = [("RETINA_FAST_PYTHON_MODULE", "1")]
    if use_cuda:
        nvcc = [
            "-O3",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            # IoU ties are compared with ==: no FMA contraction anywhere, so CUDA,
            # the CPU kernel and torchvision round identically.
            "-fmad=false",
            "-Xcompiler=-ffp-contract=off,-fno-trapping-math",
        ]
        shim = missing_header_shim(cuda_home, os.path.join(ROOT, "build", "nvidia-missing-include"))
        ext = CUDAExtension(
            "retina_fast._C",
            sources + cu_sources,
            # the shim holds only names the toolkit lacks, so search order cannot pick a wheel
            # copy of a toolkit header (and a quoted include inside a linked header resolves
            # against the shim folder, then the toolkit)
            include_dirs=include_dirs + ([shim] if shim else []),
            define_macros=define_macros + [("RETINA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "retina_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    print(f"retina_fast: building with CUDA={use_cuda} (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    return ext, BuildExtension


ext, build_ext = make_extension()

setup(
    name="retina_fast",
    version="0.1.0",
    description="Fast, exact RetinaNet for PyTorch: fused focal loss, anchor matching, NMS kernels",
    packages=find_packages(include=["retina_fast", "retina_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "torchvision>=0.26", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest"],
        "coco": ["pycocotools", "pillow", "matplotlib", "tqdm"],
    },
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["retina-fast=retina_fast.cli:main"]},
    zip_safe=False,
)
