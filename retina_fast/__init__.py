"""retina_fast: a fast, exact RetinaNet for PyTorch.

Importing the package loads the compiled kernels (``torch.ops.retina_fast.*``) and their
fake/autograd registrations; ``retina_fast.ops`` holds the public op API.

``__version__`` is the build's (``0.2.0+pt214cu130``: the release and the torch / CUDA the
kernels were compiled against, see ``retina_fast/_version.py``). Importing with a torch other
than the one the kernels were built for raises an ImportError that names both and says how to
rebuild; only the environment report (``python -m retina_fast.collect_env``,
``retina-fast env``) goes on without the kernels, to show what is wrong.
"""

import os as _os
import sys as _sys

from retina_fast import _version

_BUILD = _version.build_info()
__version__ = _BUILD["version"] if _BUILD else _version.RELEASE


def _reporting_environment() -> bool:
    """Whether this process is the environment report, which must run when the kernels do not
    load (``python -m retina_fast.collect_env``, ``python -m retina_fast env``,
    ``retina-fast env``)."""
    argv = list(getattr(_sys, "orig_argv", []))
    if "-m" in argv:
        i = argv.index("-m")
        mod, rest = argv[i + 1:i + 2], argv[i + 2:i + 3]
        return mod == ["retina_fast.collect_env"] or (mod == ["retina_fast"] and rest == ["env"])
    script = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    return script.startswith("retina-fast") and _sys.argv[1:2] == ["env"]


#: Why the kernels did not load, in the environment report only (elsewhere it is raised).
kernel_load_error = None
try:
    if _BUILD and not _os.environ.get("RETINA_FAST_LIBRARY"):
        import torch as _torch

        _why = _version.torch_mismatch(_BUILD, _torch.__version__, _torch.version.cuda)
        if _why:
            raise ImportError(_why)
    from retina_fast._C_loader import cpu_isa, cuda_built, empty_cpu_cache
    from retina_fast import ops
except ImportError as _e:
    if not _reporting_environment():
        raise
    kernel_load_error = _e

__all__ = ["ops", "cuda_built", "cpu_isa", "empty_cpu_cache", "patch_torchvision", "unpatch_torchvision", "patched_torchvision",
           "patch_torchvision_ops", "unpatch_torchvision_ops", "patch_effdet", "unpatch_effdet", "patch_ultralytics",
           "unpatch_ultralytics", "__version__"]


_LAZY = {"patch_torchvision", "unpatch_torchvision", "patched_torchvision"}
# Drop-ins for other detectors' code (retina_fast/dropin.py; never imports ultralytics or effdet).
_LAZY_DROPIN = {"patch_torchvision_ops", "unpatch_torchvision_ops", "patch_effdet", "unpatch_effdet",
                "patch_ultralytics", "unpatch_ultralytics"}


def __getattr__(name):
    # The torchvision patch imports torchvision and the models: only when asked for.
    if name in _LAZY:
        from retina_fast import patch

        return getattr(patch, name)
    if name in _LAZY_DROPIN:
        from retina_fast import dropin

        return getattr(dropin, name)
    raise AttributeError(f"module 'retina_fast' has no attribute {name!r}")
