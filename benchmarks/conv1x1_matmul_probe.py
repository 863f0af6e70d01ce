"""What computing R50-FPN's 1x1 stride-1 convolutions as matmuls would save in a training step.

    python -m benchmarks.conv1x1_matmul_probe [--size 512] [--batch 2] [--rounds 10]

Every 1x1 stride-1 convolution of torchvision's ``retinanet_resnet50_fpn`` (the ResNet-50's
bottleneck ends and the FPN's lateral convolutions) with the input shape it sees at ``--size``
px, timed under bfloat16 autocast on channels_last bfloat16 maps (what the bf16 + channels_last
training step feeds them), forward and forward + backward (input and weight gradients), as
``F.conv2d`` (oneDNN's convolution, what both models run) and as ``F.linear`` on the NHWC view
(autocast's bfloat16 matmul; the same products, summed in another order). Prints one line per
distinct shape and the totals weighted by how often each shape occurs: the most a 1x1-as-matmul
training forward could save. Not a pytest-benchmark file, and not part of the model: on the
2-core CPU the matmuls were no faster in all (forward + backward, four runs: 170.5 -> 164.7,
163.9 -> 174.8, 175.1 -> 182.0, 177.4 -> 182.8 ms; faster on the 2048-channel layer4 shapes,
slower on others; benchmarks/results/2026-12-05-conv1x1-matmul-probe-cpu-2core.txt).
"""

import argparse
import collections

import torch
import torch.nn.functional as F

from retina_fast.engine.speed import time_interleaved


def _median_ms(fn, rounds):
    return time_interleaved({"fn": fn}, rounds, warmup=2)["fn"] * 1e3


def conv1x1_as_linear(x, weight):
    """A 1x1 stride-1 convolution of a channels_last map as a matmul on its NHWC view."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1)).permute(0, 3, 1, 2)


def pointwise_shapes(size, batch):
    """{(in_channels, out_channels, h, w): count} of the 1x1 stride-1 convolutions."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    counts = collections.Counter()
    hooks = []
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1:
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out: counts.update([(mod.in_channels, mod.out_channels) + tuple(inp[0].shape[-2:])])))
    with torch.no_grad():
        model.backbone(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    counts = pointwise_shapes(args.size, args.batch)
    totals = collections.Counter()
    cl = torch.channels_last
    for (cin, cout, h, w), n in sorted(counts.items()):
        x0 = torch.randn(args.batch, cin, h, w, dtype=torch.bfloat16).contiguous(memory_format=cl)
        g = torch.randn(args.batch, cout, h, w, dtype=torch.bfloat16).contiguous(memory_format=cl)
        weight = (torch.randn(cout, cin, 1, 1) * cin ** -0.5).requires_grad_()
        row = {}
        for name, fn in (("conv", lambda x: F.conv2d(x, weight)), ("matmul", lambda x: conv1x1_as_linear(x, weight))):
            x = x0.clone().requires_grad_()

            def fwd(fn=fn, x=x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn(x)

            def fwd_bwd(fwd=fwd):
                weight.grad = None
                y = fwd()
                y.backward(g)

            row[name] = (_median_ms(fwd, args.rounds), _median_ms(fwd_bwd, args.rounds))
            totals[name + " fwd"] += n * row[name][0]
            totals[name + " fwd+bwd"] += n * row[name][1]
        print(f"{cin:>4} -> {cout:<4} at {h}x{w} (x{n}): conv fwd {row['conv'][0]:.2f} ms, fwd+bwd {row['conv'][1]:.2f} ms"
              f" | matmul fwd {row['matmul'][0]:.2f} ms, fwd+bwd {row['matmul'][1]:.2f} ms")
    print(f"weighted totals, batch {args.batch}, {args.size} px: conv fwd {totals['conv fwd']:.1f} ms, fwd+bwd "
          f"{totals['conv fwd+bwd']:.1f} ms | matmul fwd {totals['matmul fwd']:.1f} ms, fwd+bwd "
          f"{totals['matmul fwd+bwd']:.1f} ms")


if __name__ == "__main__":
    main()
