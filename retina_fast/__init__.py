"""retina_fast: a fast, exact RetinaNet for PyTorch.

Importing the package loads the compiled kernels (``torch.ops.retina_fast.*``) and their
fake/autograd registrations; ``retina_fast.ops`` holds the public op API.
"""

from retina_fast._C_loader import cpu_isa, cuda_built
from retina_fast import ops

__version__ = "0.1.0"

__all__ = ["ops", "cuda_built", "cpu_isa", "patch_torchvision", "unpatch_torchvision", "patched_torchvision", "__version__"]


_LAZY = {"patch_torchvision", "unpatch_torchvision", "patched_torchvision"}


def __getattr__(name):
    # The torchvision patch imports torchvision and the models: only when asked for.
    if name in _LAZY:
        from retina_fast import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'retina_fast' has no attribute {name!r}")
