"""Loads the compiled extension, which registers every torch.ops.retina_fast.* kernel."""

# torch first: _C links against libc10/libtorch, which only torch's import puts in reach.
import torch  # noqa: E402

import os  # noqa: E402

# RETINA_FAST_LIBRARY=/path/libretina_fast.so: use a CMake-built library (same sources, no
# Python ABI in it) instead of the extension; scripts/gpu_check.sh uses it for a library built
# ahead of time against the GPU machine's torch, so no device time goes to compiling.
_LIBRARY = os.environ.get("RETINA_FAST_LIBRARY")
if _LIBRARY:
    torch.ops.load_library(_LIBRARY)
else:
    try:
        from retina_fast import _C  # noqa: F401  (import for its registrations)
    except ImportError as e:  # pragma: no cover - only when the build is missing
        raise ImportError(
            "retina_fast._C, the compiled extension, could not be imported "
            f"({e}). Build it with `pip install --no-build-isolation -e .` or "
            "`python setup.py build_ext --inplace` in the source tree."
        ) from e


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.retina_fast._cuda_built())


def cpu_isa() -> str:
    """The CPU kernels' instruction set in use: "avx512", "avx2" or "baseline" (the widest the
    CPU supports, or a narrower one named by RETINA_FAST_CPU_ISA, read once per process)."""
    return str(torch.ops.retina_fast._cpu_isa())


def empty_cpu_cache() -> int:
    """Free the CPU blocks kept for reuse (the focal loss's large gradients and 'none' outputs,
    at least 4 MB each, kept after they are freed so the next call of the same size writes
    into memory already touched), as ``torch.cuda.empty_cache`` does for CUDA; returns the
    bytes freed. At most ``RETINA_FAST_CPU_CACHE_MB`` (default 1024, read once; 0: none) is
    kept, the oldest blocks freed first. Tensors in use are not affected."""
    return int(torch.ops.retina_fast._cpu_cache_release())
