"""Whether Winograd F(2x2, 3x3) would make the head's 3x3 convolutions cheaper on this CPU.

    python -m benchmarks.winograd_probe [--batch 2] [--sides 64,32,16] [--rounds 7]

The head's 3x3, 256 -> 256 channel convolutions (about 60 % of R50-FPN RetinaNet's FLOPs) on a
channels_last map of each pyramid side, float32 and bfloat16, timed as ``F.conv2d`` (oneDNN's
direct convolution, what both models run) and as Winograd F(2x2, 3x3) written with PyTorch ops:
4x4 input tiles transformed (B^T d B), 16 batched matmuls over the channels (2.25x fewer
multiplications), the 2x2 output tiles transformed back (A^T m A). Prints both medians, the
direct convolution's GFLOP/s and each one's largest error against the float32 convolution.

Not part of the model: the direct convolution already runs near the CPU's peak (~500 GFLOP/s
float32 on P3 on the 2-core AVX-512 VM) and this Winograd, whose transforms are memory passes,
was 1.8-3.8x slower (benchmarks/results/2026-12-05-winograd-probe-cpu-2core.txt). A Winograd
that wins would have to be a hand-tuned kernel with the transforms fused into the matmuls.
"""

import argparse

import torch
import torch.nn.functional as F

from retina_fast.engine.speed import time_interleaved

_BT = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_G = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
_AT = [[1, 1, 1, 0], [0, 1, -1, -1]]


def winograd_conv3x3(x, w, b):
    """``F.conv2d(x, w, b, padding=1)`` for a channels_last ``x`` [N, C, H, W], by F(2x2, 3x3)."""
    N, C, H, W = x.shape
    K = w.shape[0]
    f32 = dict(dtype=torch.float32)
    BB = torch.kron(torch.tensor(_BT, **f32), torch.tensor(_BT, **f32))  # 16 x 16
    AA = torch.kron(torch.tensor(_AT, **f32), torch.tensor(_AT, **f32))  # 4 x 16
    GG = torch.kron(torch.tensor(_G, **f32), torch.tensor(_G, **f32))    # 16 x 9
    th, tw = (H + 1) // 2, (W + 1) // 2
    xp = F.pad(x, (1, 2 * tw + 1 - W, 1, 2 * th + 1 - H)).permute(0, 2, 3, 1)  # N, H+2, W+2, C
    tiles = xp.unfold(1, 4, 2).unfold(2, 4, 2).reshape(N * th * tw, C, 16)     # overlapping 4x4
    V = torch.matmul(tiles, BB.T.to(x.dtype)).permute(2, 0, 1)                 # 16, T, C
    U = (GG @ w.float().reshape(K, C, 9).permute(2, 1, 0).reshape(9, C * K)).reshape(16, C, K)
    M = torch.bmm(V, U.to(x.dtype))                                            # 16, T, K
    Y = torch.matmul(M.permute(1, 2, 0), AA.T.to(x.dtype))                     # T, K, 4
    Y = Y.reshape(N, th, tw, K, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(N, 2 * th, 2 * tw, K)
    return Y[:, :H, :W].permute(0, 3, 1, 2) + b.view(1, K, 1, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sides", default="64,32,16")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    print(f"3x3 256->256 convolution, batch {args.batch}, channels_last, {torch.get_num_threads()} threads; "
          f"median ms of {args.rounds} interleaved rounds")
    for dtype in (torch.float32, torch.bfloat16):
        for side in map(int, args.sides.split(",")):
            x = torch.randn(args.batch, 256, side, side, generator=g).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            w = (torch.randn(256, 256, 3, 3, generator=g) * 0.02).to(dtype)
            w = w.contiguous(memory_format=torch.channels_last)
            b = torch.randn(256, generator=g).to(dtype)
            ref = F.conv2d(x.float(), w.float(), b.float(), padding=1)
            t = time_interleaved({"direct": lambda: F.conv2d(x, w, b, padding=1),
                                  "winograd": lambda: winograd_conv3x3(x, w, b)}, args.rounds, warmup=2)
            err = {k: ((f().float() - ref).abs().max() / ref.abs().max()).item() for k, f in
                   (("direct", lambda: F.conv2d(x, w, b, padding=1)), ("winograd", lambda: winograd_conv3x3(x, w, b)))}
            gflop = 2 * args.batch * side * side * 256 * 256 * 9 / 1e9
            print(f"{str(dtype).replace('torch.', ''):8} {side:3}x{side:<3} direct {t['direct'] * 1e3:7.2f} ms "
                  f"({gflop / t['direct']:5.0f} GFLOP/s, max rel. error {err['direct']:.1e})  winograd "
                  f"{t['winograd'] * 1e3:7.2f} ms ({t['winograd'] / t['direct']:.2f}x the time, max rel. error "
                  f"{err['winograd']:.1e})")


if __name__ == "__main__":
    main()
