"""The CPU emulator of the CUDA execution model (csrc/simt) against CUDA's documented semantics:
warp shuffles and votes, block barriers with predicates, shared memory per block, CUB's block
scan, radix sorts (stable, bit ranges, signed and float keys, segments, the temp-storage size
protocol) and scans; and each fault it must report: a divergent barrier, a deadlock, a shuffle
from a lane that has exited, a failed device-side assertion, a bad launch configuration, too
much shared memory, and a race (the race check). Runs under ``python build_tools/simt.py test``
(the library loaded, ASan on); the shared-array overflow that only ASan sees runs in a child
process in test_mutations.py.
"""

import pytest
import torch

from tests.conftest import EMULATED_CUDA

pytestmark = [pytest.mark.simt, pytest.mark.skipif(not EMULATED_CUDA, reason="needs the CUDA emulator "
                                                   "(python build_tools/simt.py test)")]


def S():
    return torch.ops.retina_fast_simt


def _shfl_model(v, op, arg, width):
    """CUDA's __shfl*_sync for a full warp mask (CUDA C Programming Guide, warp shuffle functions)."""
    out = []
    for lane, x in enumerate(v):
        seg = lane - lane % width
        if op == 0:
            src = seg + arg % width
        elif op == 1:
            src = lane - arg if lane - seg >= arg else lane
        elif op == 2:
            src = lane + arg if lane - seg + arg < width else lane
        else:
            src = lane ^ arg
            if src // width > lane // width:
                src = lane
        out.append(v[src])
    return out


@pytest.mark.parametrize("op", [0, 1, 2, 3])
@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("arg", [0, 1, 3, 5, 16, 31])
def test_warp_shuffles_follow_cuda(op, width, arg):
    x = torch.arange(100, 164, dtype=torch.int32)  # two warps
    got = S()._selftest_shfl(x, op, arg, width, 64).tolist()
    want = []
    for w in range(2):
        want += _shfl_model(x[32 * w:32 * w + 32].tolist(), op, arg, width)
    assert got == want


def test_votes_and_barrier_predicates():
    g = torch.Generator().manual_seed(3)
    pred = (torch.rand(96, generator=g) < 0.5).int()
    pred[32:64] = 1  # warp 1: all
    pred[64:96] = 0  # warp 2: none
    out = S()._selftest_vote(pred)
    for t in range(96):
        w = pred[32 * (t // 32):32 * (t // 32) + 32]
        ballot = sum(int(b) << i for i, b in enumerate(w.tolist()))
        assert out[t, 0].item() == int(bool(w.all()))
        assert out[t, 1].item() == int(bool(w.any()))
        assert out[t, 2].item() & 0xFFFFFFFF == ballot
        assert out[t, 3].item() == int(bool(pred.any()))
        assert out[t, 4].item() == int(bool(pred.all()))
        assert out[t, 5].item() == int(pred.sum())


def test_block_scan_is_cubs_exclusive_sum():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1000, 1000, (3 * 128,), generator=g)
    out, total = S()._selftest_block_scan(x)
    xs = x.view(3, 128)
    assert torch.equal(out.view(3, 128), xs.cumsum(1) - xs)
    assert torch.equal(total, xs.sum(1))


def test_shared_memory_is_per_block():
    out = S()._selftest_shared_per_block(5).view(5, 64)
    assert torch.equal(out, torch.arange(5).unsqueeze(1).expand(5, 64).int() + 5000)


def _ordered(keys, begin_bit, end_bit, unsigned):
    """CUB's radix order of keys over bits [begin_bit, end_bit) of the order-preserving form."""
    out = []
    for k in keys.tolist():
        if keys.dtype in (torch.float32, torch.float64):
            bits = 32 if keys.dtype == torch.float32 else 64
            fmt = "f" if bits == 32 else "d"
            import struct
            u = int.from_bytes(struct.pack("<" + fmt, k), "little")
            sign = 1 << (bits - 1)
            u = (~u) & ((1 << bits) - 1) if u & sign else u | sign
        else:
            bits = 64 if keys.dtype == torch.int64 else 32
            u = k & ((1 << bits) - 1)
            if not unsigned:
                u ^= 1 << (bits - 1)
        out.append((u >> begin_bit) & ((1 << (end_bit - begin_bit)) - 1))
    return out


@pytest.mark.parametrize("dtype,unsigned", [(torch.int64, False), (torch.int32, False), (torch.int32, True),
                                            (torch.float32, False), (torch.float64, False)])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("bits", ["all", "low", "high"])
@pytest.mark.parametrize("segmented", [False, True])
def test_radix_sorts_are_stable_cub_orders(dtype, unsigned, descending, bits, segmented):
    g = torch.Generator().manual_seed(11)
    n = 300
    if dtype.is_floating_point:
        keys = (torch.randn(n, generator=g, dtype=torch.float64) * 10).round().to(dtype)
        keys[::17] = -0.0
        keys[5::23] = 0.0
        keys[7] = float("inf")
        keys[9] = -float("inf")
    else:
        keys = torch.randint(-50, 50, (n,), generator=g, dtype=dtype)
    width = torch.iinfo(dtype).bits if not dtype.is_floating_point else torch.finfo(dtype).bits
    begin_bit, end_bit = {"all": (0, width), "low": (0, 5), "high": (width - 6, width)}[bits]
    offsets = torch.tensor([0, 40, 40, 170, 290], dtype=torch.int32) if segmented else None
    kout, vout = S()._selftest_radix_sort(keys, offsets, begin_bit, end_bit, descending, unsigned)
    digits = _ordered(keys, begin_bit, end_bit, unsigned)
    segs = list(zip(offsets[:-1].tolist(), offsets[1:].tolist())) if segmented else [(0, n)]
    covered = set()
    for lo, hi in segs:
        idx = sorted(range(lo, hi), key=lambda i: (-digits[i] if descending else digits[i], i))  # stable
        assert vout[lo:hi].tolist() == idx
        assert torch.equal(kout[lo:hi], keys[idx])
        covered |= set(range(lo, hi))
    untouched = [i for i in range(n) if i not in covered]
    assert all(vout[i].item() == -1 for i in untouched)  # items outside every segment are not written


@pytest.mark.parametrize("inclusive", [False, True])
def test_device_scans(inclusive):
    x = torch.randint(-9, 9, (1000,), generator=torch.Generator().manual_seed(2))
    want = x.cumsum(0) if inclusive else x.cumsum(0) - x
    assert torch.equal(S()._selftest_device_scan(x, inclusive), want)


@pytest.mark.parametrize("kind,message", [
    (0, "divergent __syncthreads"),
    (1, "deadlock"),
    (2, "lane 5 named in its mask has exited"),
    (3, "device-side assertion failed .* thread \\(7,0,0\\): selftest: thread 7 fails"),
])
def test_faults_are_reported(kind, message):
    with pytest.raises(RuntimeError, match=message):
        S()._selftest_fault(kind)


def test_race_check_finds_a_missing_barrier_and_passes_with_it():
    from tests import simt_support

    prev = S()._simt_set_race_check(True)
    try:
        with pytest.raises(RuntimeError, match="simt race check: _selftest_fault output 0 differs"):
            S()._selftest_fault(4)
        simt_support.expected_races += 1
        out = S()._selftest_fault(5)
        assert out.tolist() == [((t + 1) % 32) * 3 + 1 for t in range(32)]
    finally:
        S()._simt_set_race_check(prev)


@pytest.mark.parametrize("grid,block,shmem,message", [
    (1, 1025, 0, "invalid configuration argument"),
    (0, 32, 0, "invalid configuration argument"),
    (2 ** 31, 32, 0, "invalid configuration argument"),
    (1, 0, 0, "invalid configuration argument"),
    (1, 32, 48 * 1024 + 1, "more than 48 KiB"),
])
def test_bad_launches_fail_like_cuda(grid, block, shmem, message):
    with pytest.raises(RuntimeError, match=message):
        S()._selftest_launch(grid, block, shmem)
    S()._selftest_launch(1, 1024, 48 * 1024)  # the limits themselves launch


def test_schedules_change_order_not_results():
    """A kernel with barriers gives the same bits under every schedule (the race check's premise)."""
    x = torch.randint(-1000, 1000, (4 * 128,), generator=torch.Generator().manual_seed(9))
    outs = []
    for mode in (0, 1, 2):
        S()._simt_set_schedule(mode, 1234)
        outs.append(S()._selftest_block_scan(x))
    S()._simt_set_schedule(0, 0)
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])
