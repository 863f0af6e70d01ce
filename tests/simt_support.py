"""The emulated CUDA device of the test suite: the CUDA sources built for the CPU by
``python build_tools/simt.py build`` (csrc/simt), loaded into this process.

``load(path)`` loads the library and names torch's PrivateUse1 backend "simt": tensors moved
``.to("simt")`` live in host memory on a device of their own, every ``torch.ops.retina_fast``
op on them runs the project's CUDA kernel under the emulator, and torch's own ops on them run
on the CPU (torch's CPU fallback). So a test compares CUDA with the CPU in one process, as on a
GPU. Never part of the package: the library is built for tests only.

Numerics: the emulated kernels call the host's ``expf``/``logf``, not the GPU's, so they can
agree with the CPU kernels more closely than a GPU does; the CUDA-vs-CPU tolerances of the
tests stay as derived for the GPU (a few ulps of the GPU's math library), not tightened to
what the emulator happens to reach.
"""

import os
import types

import torch

NAME = "simt"
_loaded = None
#: Races that tests provoke on purpose (the emulator's own tests of the race check): the session
#: fails when the race check finds more than these (tests/conftest.py).
expected_races = 0


def _module():
    m = types.ModuleType("torch.simt")
    m.is_available = lambda: True
    m.device_count = lambda: 1
    m.current_device = lambda: 0
    m.is_initialized = lambda: True
    m._is_in_bad_fork = lambda: False
    m.manual_seed = lambda seed: None
    m.manual_seed_all = lambda seed: None
    m.synchronize = lambda device=None: None
    return m


def load(path: str):
    """Load the emulator library at `path` (once per process) and register the device."""
    global _loaded
    if _loaded is not None:
        if os.path.realpath(path) != _loaded:
            raise RuntimeError(f"simt: {_loaded} is loaded already, cannot load {path} too")
        return
    torch.ops.load_library(path)
    torch.utils.rename_privateuse1_backend(NAME)
    torch._register_device_module(NAME, _module())
    torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)
    _loaded = os.path.realpath(path)


def ops():
    """torch.ops.retina_fast_simt: the emulated CUDA kernels on CPU tensors, and the controls."""
    return torch.ops.retina_fast_simt


def stats():
    """[errors recorded, races found, op calls, schedule, race check on]."""
    return list(torch.ops.retina_fast_simt._simt_stats())
