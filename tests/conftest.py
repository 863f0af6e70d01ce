import pytest
import torch

import retina_fast  # noqa: F401  (loads the kernels)

HAS_CUDA = torch.cuda.is_available() and retina_fast.cuda_built()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")


def devices():
    """Devices the kernel tests run on: cpu always, cuda where present."""
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])
