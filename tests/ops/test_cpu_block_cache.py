"""The CPU block cache of large outputs (csrc/common/cpu_block_cache.h): the focal loss's
[N, K] gradient comes from a freed block of the same size when there is one (a fresh
allocation this large re-faults every page at every call), the results do not depend on what
the block held before, and the cache stays within RETINA_FAST_CPU_CACHE_MB."""

import subprocess
import sys
import textwrap

import torch

import retina_fast  # noqa: F401  (loads the ops)
from retina_fast.ops import sigmoid_focal_loss_labels

OPS = torch.ops.retina_fast
N, K = 40_000, 80  # 12.8 MB of float32: large enough for the cache (>= 4 MB)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=g) * 3
    lab = torch.randint(-2, K, (N,), generator=g)
    return x, lab


def _grad(x, lab):
    xg = x.clone().requires_grad_()
    sigmoid_focal_loss_labels(xg, lab, reduction="sum").backward()
    return xg.grad


def test_a_freed_gradient_block_is_reused_and_its_old_contents_never_show():
    OPS._cpu_cache_release()
    x, lab = _inputs()
    fresh = _grad(x, lab).clone()  # computed into a fresh block (the cache was empty)
    kept, blocks, hits, misses = OPS._cpu_cache_stats()
    assert blocks >= 1 and kept >= N * K * 4, (kept, blocks)
    # fill the kept block with NaN: a 'none' loss of NaN logits, same size, then freed
    poison = sigmoid_focal_loss_labels(torch.full((N, K), float("nan")), lab, reduction="none")
    assert poison.isnan().any()
    del poison
    h0 = OPS._cpu_cache_stats()[2]
    again = _grad(x, lab)
    assert OPS._cpu_cache_stats()[2] > h0           # the gradient came from a kept block
    assert torch.equal(again, fresh)                # every element written: nothing stale
    del again
    assert retina_fast.empty_cpu_cache() > 0
    assert OPS._cpu_cache_stats()[:2] == [0, 0]


def test_small_outputs_do_not_go_through_the_cache():
    OPS._cpu_cache_release()
    before = OPS._cpu_cache_stats()
    x = torch.randn(100, K, requires_grad=True)
    sigmoid_focal_loss_labels(x, torch.zeros(100, dtype=torch.long), reduction="sum").backward()
    del x
    assert OPS._cpu_cache_stats() == before


def _run(code, env_mb):
    import os

    env = dict(os.environ, RETINA_FAST_CPU_CACHE_MB=str(env_mb))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


_LIMIT_CODE = """
    import torch, retina_fast
    ops = torch.ops.retina_fast
    def out(rows):  # a 'none' loss of [rows, 80] float32
        return retina_fast.ops.sigmoid_focal_loss_labels(torch.zeros(rows, 80), torch.zeros(rows, dtype=torch.long), reduction="none")
    a = out(131072)        # 40 MB
    del a
    s1 = ops._cpu_cache_stats()
    b = out(65536)         # 20 MB: no kept block fits it (40 MB is more than 25 % larger)
    del b
    s2 = ops._cpu_cache_stats()
    print(s1[:2] + s2)
"""


def test_the_cache_stays_within_its_limit_and_evicts_the_oldest():
    mb = 2 ** 20
    # limit 50 MB: the 40 MB block is kept; the 20 MB one does not fit beside it, so the older
    # 40 MB block is freed and the 20 MB one kept; one miss each, no hit
    assert _run(_LIMIT_CODE, 50) == str([40 * mb, 1, 20 * mb, 1, 0, 2])
    # limit 0: nothing is kept
    assert _run(_LIMIT_CODE, 0) == str([0, 0, 0, 0, 0, 2])
    # limit 1 GB: both are kept
    assert _run(_LIMIT_CODE, 1024) == str([40 * mb, 1, 60 * mb, 2, 0, 2])
