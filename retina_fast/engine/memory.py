"""Keep freed memory in the process for reuse, instead of giving it back to the system at once.

A training step allocates and frees the same large tensors every step: activations, their
gradients, BatchNorm's outputs. glibc's ``malloc`` serves blocks above a threshold (128 KiB at
first, raised dynamically up to 32 MiB) with fresh ``mmap`` pages, and gives the top of its heap
back to the system once more than twice that is free. So each step takes page faults on memory
it has just freed: on the 2-core VM, R50-FPN b2 512 px, up to 37k minor faults a bfloat16
channels_last step of ours and 285-362k a float32 NCHW one, each a few microseconds there. One
BatchNorm backward took 28 ms instead of 2 ms on faulting its 16 MiB output.

:func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` to 1 GiB, ``M_TRIM_THRESHOLD`` to
2 GiB and ``M_TOP_PAD`` to 64 MiB (``mallopt``): blocks up to 1 GiB come from the heap and stay
there when freed, so the next step reuses them without a fault. The peak resident memory stays
about the same (the step needs its peak either way; measured up to 7 % higher, fragmentation);
what changes is that it is not returned between steps. It is what
``python -m torch.backends.xeon.run_cpu`` gets by preloading jemalloc or tcmalloc, done without
a preload. Measured (``python -m benchmarks.malloc_probe``,
``benchmarks/results/2026-12-05-malloc-probe-*``): our training steps 1.07x (bf16 channels_last)
and 1.21x (float32 NCHW) faster, ~500 faults a step or none.

It is process-wide. The ``retina-fast`` program applies it at start (``--malloc auto``, the
default: when it is the program itself, not when :func:`retina_fast.cli.main` is called from
Python); a Python user calls :func:`keep_freed_memory` once, before training. It does nothing
(and says why) where the C library is not glibc, where another allocator is preloaded
(``LD_PRELOAD`` with jemalloc / tcmalloc / mimalloc), or where the user set glibc's own
``MALLOC_*`` variables (theirs win).
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30          # blocks up to 1 GiB from the heap
TRIM_THRESHOLD = (1 << 31) - 1    # give the heap's top back only past 2 GiB free (an int)
TOP_PAD = 64 << 20                # grow the heap 64 MiB at a time

_ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
              "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state = "system allocator: not asked to keep freed memory"


def describe() -> str:
    """What this process's allocator was set to, in words (for the log and summary.json)."""
    return _state


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc (whose ``mallopt`` this module sets)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _why_not() -> str | None:
    """Why :func:`keep_freed_memory` must leave the allocator alone, or None."""
    if not is_glibc():
        return f"the C library is not glibc ({platform.system()} {platform.libc_ver()[0] or '?'})"
    preload = os.environ.get("LD_PRELOAD", "")
    other = [a for a in _OTHER_ALLOCATORS if a in preload]
    if other:
        return f"{other[0]} is preloaded (LD_PRELOAD)"
    knobs = [k for k in _ENV_KNOBS if k in os.environ]
    if knobs:
        return f"the environment sets {knobs[0]}: the user's settings win"
    return None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks (up to 1 GiB) for reuse: see the module docstring.
    Returns whether it was applied; :func:`describe` says what happened."""
    global _state
    why = _why_not()
    if why is None:
        libc = ctypes.CDLL(None)  # this process's C library
        ok = all(libc.mallopt(p, v) == 1 for p, v in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
        why = None if ok else "glibc's mallopt refused the settings"
    if why is None:
        _state = (f"keeping freed memory for reuse (glibc mallopt: mmap threshold {MMAP_THRESHOLD >> 30} GiB, "
                  f"trim threshold {(TRIM_THRESHOLD + 1) >> 30} GiB, top pad {TOP_PAD >> 20} MiB): fewer page "
                  "faults per step")
        return True
    set_system(why)
    return False


def set_system(why: str) -> None:
    """Record that the allocator was left as the system set it, and why."""
    global _state
    _state = f"system allocator: {why}"
