"""A short run of every CUDA kernel on small inputs, for compute-sanitizer (memcheck,
racecheck): each op once, forward and backward, odd sizes (vector body + scalar tail), empty
inputs. Exits non-zero on any error. Usage: python scripts/cuda_smoke.py"""

import torch

import retina_fast
from retina_fast import ops

assert torch.cuda.is_available() and retina_fast.cuda_built(), "needs a CUDA device and a CUDA build"
dev = "cuda"


def focal_loss():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n, k in ((1027, 81), (3, 1), (0, 5)):
            x = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
            t = (torch.rand(n, k, device=dev) < 0.1).to(dtype)
            lab = torch.randint(-2, k, (n,), device=dev)
            for red in ("none", "mean", "sum"):
                out = ops.sigmoid_focal_loss(x, t, reduction=red)
                out.sum().backward()
                out = ops.sigmoid_focal_loss_labels(x, lab, reduction=red, label_smoothing=0.1)
                out.sum().backward()


CHECKS = [focal_loss]

if __name__ == "__main__":
    for f in CHECKS:
        f()
        torch.cuda.synchronize()
        print("ok", f.__name__)
    print("cuda_smoke: all ok")
