"""The version of retina_fast, written once (:data:`RELEASE`), and what a build adds to it.

The compiled kernels (``retina_fast._C``) are tied to the torch they were compiled against, so
a build names that torch in a local version tag, as torchvision and mmcv name their builds:
``0.2.0+pt214cu130`` (torch 2.14, CUDA 13.0 kernels) or ``0.2.0+pt214cpu`` (no CUDA kernels),
and requires ``torch==2.14.*`` (as torchvision pins its torch). setup.py runs this file on its
own (it imports nothing of the package) for the wheel's version and torch requirement, and
records the build's facts in ``retina_fast/_build_info.py``; importing retina_fast then reads
them (:func:`build_info`) for ``retina_fast.__version__`` and checks the torch that runs against
the one the kernels were built for (:func:`torch_mismatch`). An sdist carries no tag: it has
not been built yet.
"""

from __future__ import annotations

import re

#: The release. The one place the version is written (setup.py reads it from here).
RELEASE = "0.2.0"


def torch_series(torch_version: str) -> str:
    """``"2.14.1+cu130"`` -> ``"2.14"``: the part of torch's version its C++ ABI follows."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m:
        raise ValueError(f"not a torch version: {torch_version!r}")
    return f"{m.group(1)}.{m.group(2)}"


def local_tag(torch_version: str, cuda_version: str | None) -> str:
    """The local version label of a build against torch ``torch_version`` with CUDA kernels
    for CUDA ``cuda_version`` (``None``: a build without CUDA kernels): ``pt214cu130``,
    ``pt214cpu``."""
    tag = "pt" + torch_series(torch_version).replace(".", "")
    if cuda_version is None:
        return tag + "cpu"
    m = re.match(r"(\d+)\.(\d+)", cuda_version)
    if not m:
        raise ValueError(f"not a CUDA version: {cuda_version!r}")
    return f"{tag}cu{m.group(1)}{m.group(2)}"


def build_version(torch_version: str, cuda_version: str | None) -> str:
    """The version of a build: ``RELEASE + "+" + local_tag(...)``."""
    return f"{RELEASE}+{local_tag(torch_version, cuda_version)}"


def torch_requirement(torch_version: str) -> str:
    """What a build requires of torch at run time: ``torch==2.14.*``."""
    return f"torch=={torch_series(torch_version)}.*"


def build_info() -> dict | None:
    """The facts the build recorded (``retina_fast/_build_info.py``: version, torch_version,
    cuda_version, with_cuda, cuda_toolkit, cuda_arch_list, sass_archs, ptx_archs, compiler,
    openmp), or ``None`` for a tree whose extension was built before builds recorded them."""
    try:
        from retina_fast._build_info import BUILD
    except ImportError:
        return None
    return dict(BUILD)


def _major(version: str) -> str:
    return version.split(".")[0]


def torch_mismatch(build: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why the kernels of ``build`` cannot load with torch ``torch_version`` (CUDA
    ``torch_cuda``, ``None`` for a CPU-only torch), or ``None`` when they can: the torch
    series must be the one built against, and CUDA kernels need a CUDA torch of the same CUDA
    major version (the soname of libcudart they link)."""
    built = build["torch_version"]
    what = build.get("version", RELEASE)
    if torch_series(built) != torch_series(torch_version):
        why = (f"retina_fast {what} was compiled against torch {built}, but the torch imported is "
               f"{torch_version}: its kernels load only with torch {torch_series(built)}.*")
    elif build.get("with_cuda") and torch_cuda is None:
        why = (f"retina_fast {what} was compiled with CUDA {build.get('cuda_version')} kernels "
               f"against torch {built}, but the torch imported ({torch_version}) is a CPU-only build")
    elif build.get("with_cuda") and _major(build["cuda_version"]) != _major(torch_cuda):
        why = (f"retina_fast {what} was compiled with CUDA {build['cuda_version']} kernels against "
               f"torch {built}, but the torch imported ({torch_version}) is built for CUDA "
               f"{torch_cuda}")
    else:
        return None
    return (why + ". Rebuild retina_fast against this torch: in a source checkout `pip install "
            "--no-build-isolation --no-deps -e .` (or `python setup.py build_ext --inplace`), "
            f"from the sdist `pip install --no-build-isolation --no-deps --force-reinstall "
            f"retina_fast-{RELEASE}.tar.gz`; or install torch=={torch_series(built)}.* "
            "(`python -m retina_fast.collect_env` shows both builds).")
