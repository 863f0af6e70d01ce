"""Where the CUDA toolkit and the nvidia-* wheel headers are, found without the user's help,
and the build facts setup.py records in retina_fast/_build_info.py (nvcc_version,
compiler_version, parse_arch_flags).

Used by setup.py, and runnable: `python build_tools/cuda_env.py` prints the toolkit root (for
CMake's CUDA_TOOLKIT_ROOT_DIR), or nothing when there is no toolkit; `python
build_tools/cuda_env.py --shim DIR` makes DIR hold links to the wheel headers the toolkit lacks
(see missing_header_shim) and prints it (for CMake's RETINA_FAST_CUDA_EXTRA_INCLUDE).
"""

import glob
import os
import re
import shlex
import shutil
import site
import subprocess


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")) and (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
    )


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # `nvcc --dryrun` prints `#$ _HERE_=<dir of the real nvcc binary>`.
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ _HERE_="):
                    cand = os.path.dirname(os.path.realpath(line.split("=", 1)[1].strip()))
                    if _is_toolkit(cand):
                        return cand
        except (OSError, subprocess.SubprocessError):
            pass
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(cand):
            return cand
    if _is_toolkit("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    return None


def nvidia_wheel_include_dirs():
    """The include folders of the nvidia-* wheels a CUDA build of torch installs."""
    roots = []
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some virtualenvs
        pass
    roots.append(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")
    try:
        import torch

        roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    except ImportError:
        pass
    dirs = []
    for r in roots:
        if not r:
            continue
        for d in sorted(glob.glob(os.path.join(r, "nvidia", "cu*", "include"))) + sorted(
            glob.glob(os.path.join(r, "nvidia", "*", "include"))
        ):
            d = os.path.realpath(d)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def toolkit_include_dirs(cuda_home):
    """Where the toolkit keeps its headers (include/, and targets/<arch>/include on Linux)."""
    if not cuda_home:
        return []
    dirs = [os.path.join(cuda_home, "include")]
    dirs += sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def missing_header_shim(cuda_home, shim_dir, wheel_dirs=None):
    """A folder of symbolic links to the wheel headers (files and folders, top level) that the
    toolkit at `cuda_home` lacks, for torch's CUDA headers to find (cusparse.h, cublas_v2.h,
    ...). Only what is missing: a header the toolkit has always comes from the toolkit, so a
    toolkit and wheels that differ by a minor version never mix their copies of the same file.
    Returns the folder, or None when nothing is missing. Rebuilt on every call.
    """
    if wheel_dirs is None:
        wheel_dirs = nvidia_wheel_include_dirs()
    have = set()
    for d in toolkit_include_dirs(cuda_home):
        have.update(os.listdir(d))
    links = {}
    for d in wheel_dirs:
        for name in sorted(os.listdir(d)):
            if name not in have and name not in links:
                links[name] = os.path.join(d, name)
    if os.path.isdir(shim_dir):
        for name in os.listdir(shim_dir):
            os.remove(os.path.join(shim_dir, name))
    if not links:
        return None
    os.makedirs(shim_dir, exist_ok=True)
    for name, target in links.items():
        os.symlink(target, os.path.join(shim_dir, name))
    return shim_dir


def nvcc_version(cuda_home):
    """The toolkit's version as its nvcc reports it ("13.0.88"), or None."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else None


def compiler_version():
    """The first line of the C++ compiler's --version (the compiler torch's build uses: $CXX,
    else c++), or None."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(shlex.split(cxx) + ["--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def parse_arch_flags(flags):
    """nvcc's -gencode flags -> (["sm_75", ...] machine code, ["compute_90", ...] PTX)."""
    sass, ptx = [], []
    for flag in flags:
        m = re.search(r",code=\[?([\w,]+)\]?", flag)  # "-gencode=arch=compute_90,code=sm_90"
        if not m:
            continue
        for code in m.group(1).split(","):
            dest = sass if code.startswith("sm_") else ptx if code.startswith("compute_") else None
            if dest is not None and code not in dest:
                dest.append(code)
    return sass, ptx


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--shim":
        # `python build_tools/cuda_env.py --shim DIR`: make the missing-header folder, print it.
        print(missing_header_shim(find_cuda_home(), sys.argv[2]) or "")
    else:
        print(find_cuda_home() or "")
