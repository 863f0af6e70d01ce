"""Where the CUDA toolkit and the nvidia-* wheel headers are, found without the user's help.

Used by setup.py, and runnable: `python build_tools/cuda_env.py` prints the toolkit root (for
CMake's CUDA_TOOLKIT_ROOT_DIR), or nothing when there is no toolkit.
"""

import glob
import os
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


def nvidia_wheel_includes():
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


if __name__ == "__main__":
    print(find_cuda_home() or "")
