"""Build retina_fast._C: a CUDAExtension when a CUDA toolkit is found (or FORCE_CUDA=1),
a CppExtension otherwise (or with FORCE_CUDA=0).

Everything about the package that does not depend on the build (name, licence, Python
versions, dependencies other than torch, extras, the command) is in pyproject.toml. Here is
what does: the extension; the version's local tag and the torch requirement (``0.2.0+pt214cu130``
requires ``torch==2.14.*``: the kernels load only with the torch they were compiled against;
see retina_fast/_version.py); and retina_fast/_build_info.py, the build's facts (torch, CUDA
toolkit, archs, compiler) for the import-time torch check and ``retina-fast env``. An sdist,
and a wheel built from one, carry the plain release version (see local_tag_wanted).

The toolkit is located without the user's help: CUDA_HOME / CUDA_PATH when they point at a
toolkit, else the directory the real nvcc runs from (asked of nvcc itself, because nvcc on
PATH may be a wrapper script: torch's own guess, the parent of the PATH entry, is then wrong),
else /usr/local/cuda. Headers that torch's CUDA headers include but a bare toolkit lacks
(cusparse.h, cublas_v2.h, ...) come from the nvidia-* wheels that a CUDA build of torch
installs (site-packages/nvidia/cu13/include, or nvidia/*/include for CUDA 12 wheels): only
those, through a folder of links (build/nvidia-missing-include), never the wheels' copies of
headers the toolkit has (toolkit and wheels may differ by a minor version).

CUDA archs: TORCH_CUDA_ARCH_LIST when set; else, with a GPU visible, torch's own default (the
visible GPUs' archs); else DEFAULT_ARCH_LIST, Turing to Hopper plus PTX for newer GPUs.
"""

import glob
import os
import pprint
import runpy
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
from cuda_env import find_cuda_home, missing_header_shim, nvcc_version, parse_arch_flags, compiler_version  # noqa: E402

VERSION = runpy.run_path(os.path.join(ROOT, "retina_fast", "_version.py"))

#: Without a GPU at build time: T4 / RTX 20xx (7.5), A100 (8.0), RTX 30xx / A10 (8.6),
#: RTX 40xx / L4 (8.9), H100 / H200 (9.0), and PTX that newer GPUs compile at load time.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


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


def local_tag_wanted():
    """Whether the build's version carries the local tag (0.2.0+pt214cu130): yes in a source
    checkout, no in an unpacked sdist (it holds PKG-INFO), whose wheel must carry the sdist's
    version: pip discards an sdist whose built metadata has another version ("inconsistent
    version") when it resolves `retina_fast` by name, and PEP 643 requires the two to match.
    Such a wheel still requires torch==X.Y.* and records its torch in _build_info.py.
    RETINA_FAST_LOCAL_VERSION=1 / 0 decides instead."""
    env = os.environ.get("RETINA_FAST_LOCAL_VERSION")
    if env in ("0", "1"):
        return env == "1"
    return not os.path.isfile(os.path.join(ROOT, "PKG-INFO"))


def make_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
    use_cuda = want_cuda(cuda_home)
    import torch

    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    from torch.utils.cpp_extension import CppExtension, CUDAExtension, _get_cuda_arch_flags

    # csrc/simt is the CPU emulator of the CUDA sources, for tests only (build_tools/simt.py).
    sources = sorted(s for s in glob.glob("csrc/**/*.cpp", recursive=True) if not s.startswith("csrc/simt/"))
    cu_sources = sorted(s for s in glob.glob("csrc/**/*.cu", recursive=True) if not s.startswith("csrc/simt/"))
    # -fno-trapping-math lets GCC if-convert (and so vectorise) loops with ?: on floats;
    # -ffp-contract=off keeps a*b+c rounded twice, as torch computes it (bitwise parity).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    # at::parallel_for is a header template around `#pragma omp parallel`: without -fopenmp
    # in *our* compile it silently runs on one thread. The runtime is the libgomp.so.1 torch
    # already loaded (same soname).
    link = []
    openmp = sys.platform.startswith("linux")
    if openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = [("RETINA_FAST_PYTHON_MODULE", "1")]
    facts = {
        "version": (VERSION["build_version"](torch.__version__, torch.version.cuda if use_cuda else None)
                    if local_tag_wanted() else VERSION["RELEASE"]),
        "torch_version": torch.__version__,
        # the CUDA of the torch the kernels link (its libcudart); None: no CUDA kernels
        "cuda_version": torch.version.cuda if use_cuda else None,
        "with_cuda": use_cuda,
        "cuda_toolkit": None,
        "cuda_arch_list": None,
        "sass_archs": [],
        "ptx_archs": [],
        "compiler": compiler_version(),
        "openmp": openmp,
    }
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
        # the flags BuildExtension will pass to nvcc (it asks the same function)
        facts["sass_archs"], facts["ptx_archs"] = parse_arch_flags(_get_cuda_arch_flags())
        facts["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "torch's default (the visible GPUs)"
        facts["cuda_toolkit"] = nvcc_version(cuda_home)
    else:
        ext = CppExtension(
            "retina_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    print(f"retina_fast: building {facts['version']} with CUDA={use_cuda} (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}, "
          f"archs {' '.join(facts['sass_archs'] + facts['ptx_archs']) or '-'})")
    return ext, facts


def build_ext_class(facts):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """BuildExtension that also writes retina_fast/_build_info.py beside the extension
        (in the source tree for --inplace and editable installs, in build/lib for a wheel)."""

        def run(self):
            super().run()
            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
                with open(path, "w") as f:
                    f.write('"""Written by setup.py when retina_fast._C was built: what it was built '
                            'with (see retina_fast/_version.py)."""\n\nBUILD = ')
                    f.write(pprint.pformat(facts, sort_dicts=False) + "\n")

    return BuildExt


#: The oldest torch the sources build against (CI builds with it: .ci/run).
MIN_TORCH = "2.11"


def is_sdist():
    return "sdist" in sys.argv[1:]


ext, facts = make_extension()
import torch  # noqa: E402  (after make_extension: CUDA_HOME must be set before torch's cpp_extension loads)

# An sdist has not been built: it carries the release and builds against any torch from
# MIN_TORCH on; a build names its torch and CUDA and requires that torch series.
if is_sdist():
    version, torch_req = VERSION["RELEASE"], f"torch>={MIN_TORCH}"
else:
    version, torch_req = facts["version"], VERSION["torch_requirement"](torch.__version__)

setup(
    version=version,
    install_requires=[torch_req, "torchvision>=0.26", "numpy"],
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext_class(facts)},
)
