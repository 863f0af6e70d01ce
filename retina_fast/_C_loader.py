"""Loads the compiled extension, which registers every torch.ops.retina_fast.* kernel."""

try:
    from retina_fast import _C  # noqa: F401  (import for its registrations)
except ImportError as e:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "retina_fast._C, the compiled extension, could not be imported "
        f"({e}). Build it with `pip install --no-build-isolation -e .` or "
        "`python setup.py build_ext --inplace` in the source tree."
    ) from e

import torch


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(torch.ops.retina_fast._cuda_built())
