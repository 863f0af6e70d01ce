"""build_tools/: the header shim setup.py and CMake use, and the kernel-registration check."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
import cuda_env  # noqa: E402

sys.path.pop(0)


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("// " + os.path.basename(path) + "\n")


def test_shim_links_only_what_the_toolkit_lacks(tmp_path):
    """The wheels' copy of a header the toolkit has (cuda_runtime.h, crt/) is never used: on the
    GPU machine the toolkit and torch's wheels may differ by a minor version."""
    toolkit = tmp_path / "cuda"
    for h in ("include/cuda_runtime.h", "include/crt/host_defines.h", "bin/nvcc",
              "targets/x86_64-linux/include/cuda_fp16.h"):
        _touch(str(toolkit / h))
    wheel1, wheel2 = tmp_path / "cu13" / "include", tmp_path / "cudnn" / "include"
    for h in ("cuda_runtime.h", "crt/host_defines.h", "cuda_fp16.h", "cusparse.h", "cublas_v2.h", "cccl/x.h"):
        _touch(str(wheel1 / h))
    for h in ("cudnn.h", "cusparse.h"):
        _touch(str(wheel2 / h))
    shim = tmp_path / "shim"
    _touch(str(shim / "stale.h"))  # left from an earlier run: removed
    out = cuda_env.missing_header_shim(str(toolkit), str(shim), [str(wheel1), str(wheel2)])
    assert out == str(shim)
    assert sorted(os.listdir(shim)) == ["cccl", "cublas_v2.h", "cudnn.h", "cusparse.h"]
    # the first wheel that has a name wins, and links point at the wheel's file
    assert os.path.realpath(shim / "cusparse.h") == str(wheel1 / "cusparse.h")
    assert os.path.isfile(shim / "cccl" / "x.h")
    # nothing missing: no folder to add
    assert cuda_env.missing_header_shim(str(toolkit), str(tmp_path / "shim2"), [str(toolkit / "include")]) is None


def test_check_kernels_passes_for_this_build():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "build_tools", "check_kernels.py")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res.stdout + res.stderr
