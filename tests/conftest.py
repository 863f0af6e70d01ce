"""Shared test settings: which devices the kernel tests run on, and the `cuda` marker.

CUDA tests carry the ``cuda`` marker (``pytest -m cuda`` selects them; ``scripts/gpu_check.sh``
does): tests decorated with :data:`requires_cuda` / :data:`requires_gpu`, and every test
parametrised with the device ``"cuda"`` (marked at collection).

``RETINA_FAST_TEST_CUDA=cpu`` runs the :data:`requires_cuda` tests without a GPU, with the CPU
standing in for it (:data:`CUDA` is then ``"cpu"``: each CUDA-vs-CPU comparison compares the
CPU kernels with themselves). It proves the tests themselves run, so a typo, a shape mistake or
a wrong API call is found here (CI runs this), not on the rarely lent GPU machine. Tests that
need a real GPU (streams, a second device, device-side errors, memory limits) use
:data:`requires_gpu` and skip in that mode.
"""

import os

import pytest
import torch

import retina_fast  # noqa: F401  (loads the kernels)

HAS_CUDA = torch.cuda.is_available() and retina_fast.cuda_built()
EMULATED_CUDA = not HAS_CUDA and os.environ.get("RETINA_FAST_TEST_CUDA") == "cpu"

#: The device CUDA tests run their "CUDA" side on: "cuda", or "cpu" in the emulated mode.
CUDA = "cuda" if HAS_CUDA else "cpu"


_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(
    not (HAS_CUDA or EMULATED_CUDA),
    reason="needs a CUDA device and a CUDA build (or RETINA_FAST_TEST_CUDA=cpu to emulate)")]
_GPU_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")]


def _apply(marks):
    def deco(f):
        for m in marks:
            f = m(f)
        return f

    return deco


#: A CUDA test that can also run emulated on the CPU (RETINA_FAST_TEST_CUDA=cpu).
requires_cuda = _apply(_CUDA_MARKS)
#: A CUDA test that needs a real GPU.
requires_gpu = _apply(_GPU_MARKS)


def cuda_param():
    """The CUDA entry of a device parametrisation (emulated on the CPU where asked)."""
    return pytest.param(CUDA, marks=_CUDA_MARKS, id="cuda")


def devices():
    """Devices the kernel tests run on: cpu always, cuda where present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _has_cuda_param(value) -> bool:
    if isinstance(value, str):
        return value.startswith("cuda")
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, (tuple, list)):
        return any(_has_cuda_param(v) for v in value)
    return False


def pytest_addoption(parser):
    parser.addoption("--run-bigmem", action="store_true", default=False,
                     help="also run the tests marked bigmem (more than 2^31 elements, ~10 GB of memory)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--run-bigmem"):
        keep = [i for i in items if i.get_closest_marker("bigmem") is None]
        if len(keep) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("bigmem") is not None])
            items[:] = keep
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_has_cuda_param(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.cuda)


# ---------------------------------------------------------------- hypothesis profiles
# tests/fuzz/ fuzzes every op with hypothesis. "ci" (the default) is derandomised: the same
# examples every run, a fixed count per op, so CI is reproducible and stays within ~2 minutes.
# "long" (pytest tests/fuzz --hypothesis-profile=long --hypothesis-show-statistics) draws
# thousands of random examples per op. Registered here, before the hypothesis plugin reads
# --hypothesis-profile (tests/fuzz/conftest.py is collected too late for that).
try:
    from hypothesis import HealthCheck, settings as _hsettings
except ImportError:  # hypothesis is a test dependency of tests/fuzz only (skipped without it)
    pass
else:
    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
    _hsettings.register_profile("ci", derandomize=True, max_examples=100, **_common)
    _hsettings.register_profile("long", derandomize=False, max_examples=3000, **_common)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
