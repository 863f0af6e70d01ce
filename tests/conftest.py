"""Shared test settings: which devices the kernel tests run on, and the `cuda` marker.

CUDA tests carry the ``cuda`` marker (``pytest -m cuda`` selects them; ``scripts/gpu_check.sh``
does): tests decorated with :data:`requires_cuda` / :data:`requires_gpu`, and every test
parametrised with the device ``"cuda"`` (marked at collection).

``RETINA_FAST_TEST_CUDA=simt`` runs the :data:`requires_cuda` tests without a GPU on the CUDA
kernels themselves, executed by the CPU emulator of the CUDA execution model (csrc/simt):
``python build_tools/simt.py test`` builds it with AddressSanitizer and UBSan, sets this mode
(``RETINA_FAST_SIMT_LIB`` names the library) and turns the race check on. :data:`CUDA` is then
``"simt"``, the emulated device (tests/simt_support.py): each CUDA-vs-CPU comparison compares the
CUDA kernel with the CPU kernel. Tests that need a real GPU (streams, a second device, memory
limits, torch.compile's CUDA code) use :data:`requires_gpu` and skip in that mode.
"""

import os

import pytest
import torch

import retina_fast  # noqa: F401  (loads the kernels)

HAS_CUDA = torch.cuda.is_available() and retina_fast.cuda_built()
_MODE = os.environ.get("RETINA_FAST_TEST_CUDA", "")
if _MODE == "cpu":
    raise pytest.UsageError(
        "RETINA_FAST_TEST_CUDA=cpu (the CPU kernels on both sides) is gone: run the CUDA tests on the "
        "emulated CUDA kernels with `python build_tools/simt.py test`")
#: The CUDA tests run on the emulated CUDA kernels (build_tools/simt.py).
EMULATED_CUDA = not HAS_CUDA and _MODE == "simt"
if EMULATED_CUDA:
    from tests import simt_support

    _lib = os.environ.get("RETINA_FAST_SIMT_LIB")
    if not _lib:
        raise pytest.UsageError("RETINA_FAST_TEST_CUDA=simt needs RETINA_FAST_SIMT_LIB: use build_tools/simt.py test")
    simt_support.load(_lib)

#: The device CUDA tests run their "CUDA" side on: "cuda", or the emulated device "simt".
CUDA = "cuda" if HAS_CUDA else ("simt" if EMULATED_CUDA else "cuda")


_CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(
    not (HAS_CUDA or EMULATED_CUDA),
    reason="needs a CUDA device and a CUDA build (or the CUDA emulator: python build_tools/simt.py test)")]
_GPU_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")]


def _apply(marks):
    def deco(f):
        for m in marks:
            f = m(f)
        return f

    return deco


#: A CUDA test that also runs on the emulated CUDA kernels (RETINA_FAST_TEST_CUDA=simt).
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
        return value.startswith("cuda") or value == "simt"
    if isinstance(value, torch.device):
        return value.type in ("cuda", "simt")
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


def pytest_sessionfinish(session, exitstatus):
    """Under the emulator: a race the race check found fails the run even where a test caught
    the exception (beyond the ones the emulator's own tests provoke). The count of emulator
    errors is reported, not judged: the bad-value tests provoke device-side assertions."""
    if not EMULATED_CUDA:
        return
    errors, races, calls, _, race_check = simt_support.stats()
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    line = (f"simt: {calls} emulated CUDA op calls, race check {'on' if race_check else 'off'}, "
            f"{races} race(s), {errors} emulator error(s) recorded")
    if tr is not None:
        tr.write_line(line)
    if races > simt_support.expected_races and session.exitstatus == 0:
        if tr is not None:
            tr.write_line(f"simt: {races - simt_support.expected_races} race(s) found beyond the provoked ones: failing")
        session.exitstatus = 1


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
