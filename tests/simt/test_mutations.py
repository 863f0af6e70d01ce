"""Mutation proof of the CUDA emulator's checks: each mutant of the CUDA sources must fail the
emulated run, and the test names the check that catches it.

    remove the __syncthreads() in block_reduce_sum   -> the race check
    remove a barrier of the NMS mask kernel          -> the race check
    a tail read one element past the end             -> AddressSanitizer
    the wrong shuffle offset in block_reduce_sum     -> parity with the CPU kernel

Each mutant is the source with one exact edit (the test fails if the text to mutate is gone, so
a refactor cannot silently turn a mutant into the original), built by ``build_tools/simt.py
build --override ... --only ...`` with ASan + UBSan (only the .cu file it changes, linked with
the emulator's objects), then probed in a child process by tests/simt/mutant_probe.py: every
op of that file against the CPU kernel under the race check. The unmutated sources pass the
same probe (test_original_sources_pass_the_probe), so each failure is the mutation's.

To try a mutation of your own (a barrier of your choosing removed):
    python build_tools/simt.py build --override csrc/nms/nms_cuda.cu=/tmp/mutant.cu --only csrc/nms/nms_cuda.cu
    eval "$(python build_tools/simt.py env)"; python tests/simt/mutant_probe.py <the path it printed> --ops nms
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import EMULATED_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "build_tools"))
import simt as simt_build  # noqa: E402

pytestmark = [pytest.mark.simt, pytest.mark.slow,
              pytest.mark.skipif(not EMULATED_CUDA, reason="needs the CUDA emulator (python build_tools/simt.py test)")]

FOCAL = "csrc/focal_loss/focal_loss_cuda.cu"
NMS = "csrc/nms/nms_cuda.cu"
UTILS = "csrc/common/cuda_utils.cuh"

#: name: (file to mutate, the .cu file to build, exact text, its replacement, probe families)
MUTANTS = {
    "block_reduce_sum_without_barrier": (
        UTILS, FOCAL,
        "  if (lane == 0) shared[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) shared[warp] = v;\n",
        "focal"),
    "nms_mask_without_barrier": (
        NMS, NMS,
        "    __syncthreads();\n    const int64_t row = rb * kBlock + t;\n",
        "    const int64_t row = rb * kBlock + t;\n",
        "nms"),
    "dense_tail_reads_one_past_the_end": (
        FOCAL, FOCAL,
        "  const int64_t tail = nvec * kVec + gid;\n  if (tail < n) {\n    const acc_t v = loss",
        "  const int64_t tail = nvec * kVec + gid;\n  if (tail <= n) {\n    const acc_t v = loss",
        "focal"),
    "block_reduce_sum_wrong_shuffle_offset": (
        UTILS, FOCAL,
        "  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);\n  if (lane == 0)",
        "  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o - 1);\n  if (lane == 0)",
        "focal"),
}


def _mutate(name, tmp):
    path, _, old, new, _ = MUTANTS[name]
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    assert text.count(old) == 1, f"{name}: the text to mutate is not in {path} exactly once; update the mutant"
    out = os.path.join(tmp, name + os.path.splitext(path)[1])
    with open(out, "w") as f:
        f.write(text.replace(old, new))
    return out


@pytest.fixture(scope="module")
def mutant_libs(tmp_path_factory):
    """Every mutant built (two at a time), name -> library path."""
    tmp = str(tmp_path_factory.mktemp("mutants"))
    sanitize = "address" if os.environ.get("LD_PRELOAD", "").find("asan") >= 0 else "none"

    def one(name):
        path, only, *_ = MUTANTS[name]
        return name, simt_build.build(sanitize, [(path, _mutate(name, tmp))], quiet=True, only=[only])

    jobs = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = "1"
    try:
        with ThreadPoolExecutor(2) as pool:
            return dict(pool.map(one, MUTANTS))
    finally:
        if jobs is None:
            del os.environ["MAX_JOBS"]
        else:
            os.environ["MAX_JOBS"] = jobs


def _probe(lib, ops):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "simt", "mutant_probe.py"), lib, "--ops", ops],
                          capture_output=True, text=True, env=env, timeout=900)


def test_original_sources_pass_the_probe():
    r = _probe(os.environ["RETINA_FAST_SIMT_LIB"], "focal,boxes,nms")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("name", ["block_reduce_sum_without_barrier", "nms_mask_without_barrier"])
def test_a_removed_barrier_is_caught_by_the_race_check(mutant_libs, name):
    r = _probe(mutant_libs[name], MUTANTS[name][4])
    assert r.returncode == 3 and "RACE" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])


@pytest.mark.skipif("asan" not in os.environ.get("LD_PRELOAD", ""), reason="needs the ASan build")
def test_a_read_past_the_end_is_caught_by_asan(mutant_libs):
    r = _probe(mutant_libs["dense_tail_reads_one_past_the_end"], "focal")
    assert r.returncode != 0, r.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr and "forward_dense_vec_kernel" in r.stderr, r.stderr[-4000:]


def test_a_wrong_shuffle_offset_is_caught_by_parity(mutant_libs):
    r = _probe(mutant_libs["block_reduce_sum_wrong_shuffle_offset"], "focal")
    assert r.returncode == 4 and "PARITY" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])


@pytest.mark.skipif("asan" not in os.environ.get("LD_PRELOAD", ""), reason="needs the ASan build")
def test_a_read_past_a_shared_array_is_caught_by_asan():
    """Shared arrays are one heap block each: s[32] of a 32-int array is an ASan report."""
    code = ("import os, torch; torch.ops.load_library(os.environ['RETINA_FAST_SIMT_LIB']); "
            "torch.ops.retina_fast_simt._selftest_fault(6)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr and "fault_kernel" in r.stderr, r.stderr[-4000:]
