"""The CMake-built shared library (for LibTorch/C++ users) registers the same ops.

It is loaded in a subprocess that never imports the retina_fast package: both register the
retina_fast namespace, and one process can hold only one of them. `.ci/run` builds the library
and sets RETINA_FAST_REQUIRE_CMAKE_LIB=1, so there a missing library fails instead of skipping.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.environ.get("RETINA_FAST_CMAKE_LIB", os.path.join(ROOT, "build-cmake", "libretina_fast.so"))

SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
labels = torch.tensor([1, -1])
out = torch.ops.retina_fast.sigmoid_focal_loss_labels(x, labels, None, 0.25, 2.0, 0, 0.0)
t = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
p = torch.sigmoid(x)
ce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
p_t = p * t + (1 - p) * (1 - t)
expected = (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2
torch.testing.assert_close(out, expected)
try:
    torch.ops.retina_fast.sigmoid_focal_loss_labels(x, torch.tensor([5, 0]), None, 0.25, 2.0, 0, 0.0)
except RuntimeError as e:
    assert "expected every label" in str(e), e
else:
    raise AssertionError("bad label accepted")
print("OK")
"""


def test_cmake_library_loads_and_runs():
    if not os.path.exists(LIB):
        if os.environ.get("RETINA_FAST_REQUIRE_CMAKE_LIB") == "1":
            pytest.fail(f"CMake library not found at {LIB}")
        pytest.skip(f"CMake library not built ({LIB}); see CMakeLists.txt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, LIB], capture_output=True, text=True, cwd="/", env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_cmake_library_registers_every_kernel():
    """Every op has a CPU kernel and, when the library was built with RETINA_FAST_WITH_CUDA=ON,
    a CUDA kernel (checked without a GPU: registration happens at load). `.ci/run` builds it
    with CUDA and sets RETINA_FAST_REQUIRE_CMAKE_CUDA=1, so there a CPU-only library fails."""
    if not os.path.exists(LIB):
        if os.environ.get("RETINA_FAST_REQUIRE_CMAKE_LIB") == "1":
            pytest.fail(f"CMake library not found at {LIB}")
        pytest.skip(f"CMake library not built ({LIB}); see CMakeLists.txt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, os.path.join(ROOT, "build_tools", "check_kernels.py"), "--lib", LIB]
    if os.environ.get("RETINA_FAST_REQUIRE_CMAKE_CUDA") == "1":
        cmd.append("--require-cuda")
    res = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=env)
    assert res.returncode == 0 and ": OK" in res.stdout, res.stdout + res.stderr


def test_extension_registers_every_kernel():
    """The same check for the Python extension this test run imports."""
    import retina_fast

    sys.path.insert(0, os.path.join(ROOT, "build_tools"))
    try:
        import check_kernels
    finally:
        sys.path.pop(0)
    cov = check_kernels.coverage()
    assert len(cov) >= 15, sorted(cov)
    assert all(k["CPU"] for k in cov.values()), cov
    if retina_fast.cuda_built():
        assert all(k["CUDA"] for k in cov.values()), cov
