"""postprocess_detections at every score density: the streaming top-k select with a rising logit
cut (CPU) and the radix select (CUDA) give exactly today's results (torchvision's semantics, ties
by lower index) whatever share of the scores passes ``score_thresh``, with memory independent of
that share.

CPU tests compare with the reference (``_reference.py``: sigmoid, ``scores > thresh``, a stable
sort over every survivor) bit for bit, and with an independent oracle where NMS cannot suppress
(disjoint anchors: every top-k candidate is a detection). CUDA tests compare with the CPU kernel
(emulated on the CPU with ``RETINA_FAST_TEST_CUDA=cpu``).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

import retina_fast.ops as R
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, requires_cuda
from tests.ops.test_cuda_paths import assert_dets_match
from tests.ops.test_nms import assert_dets_equal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INF, NAN = float("inf"), float("nan")
LOGIT_005 = math.log(0.05 / 0.95)


def _normal_icdf(p):
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0, dtype=torch.float64)).item()


def dense_logits(B, A, K, density, seed=0, dtype=torch.float32):
    """Logits with `density` of the scores above 0.05: N(mu, 1.5) with mu placed so."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, A, K, generator=g, dtype=torch.float64)
    if density >= 1.0:
        return (z * 1.5).to(dtype)
    mu = LOGIT_005 - 1.5 * _normal_icdf(1.0 - density) if density > 0 else -8.0
    return (z * 1.5 + mu).to(dtype)


def head(B, levels, K, density, seed=0, dtype=torch.float32, per_image_anchors=False):
    A = sum(levels)
    g = torch.Generator().manual_seed(seed + 1000)
    logits = dense_logits(B, A, K, density, seed, dtype)
    reg = (torch.randn(B, A, 4, generator=g) * 0.2).to(dtype)
    c = torch.rand(A, 2, generator=g) * 600
    wh = 16 + torch.rand(A, 2, generator=g) * 100
    anchors = torch.cat([c - wh / 2, c + wh / 2], 1).to(dtype)
    if per_image_anchors:
        anchors = torch.stack([anchors + 5 * b for b in range(B)])
    sizes = [(620 - 3 * b, 640 + 5 * b) for b in range(B)]
    return logits, reg, anchors, sizes


def disjoint_head(logits):
    """Zero codes and zero-area anchors at integer points (x, y) = (a % 256, a // 256), exact in
    every dtype and through decoding: empty boxes neither suppress nor are suppressed, so every
    top-k candidate is a detection, and a box names its anchor."""
    B, A, _ = logits.shape
    assert A <= 256 * 256
    reg = torch.zeros(B, A, 4, dtype=logits.dtype)
    a = torch.arange(A)
    xy = torch.stack([a % 256, a // 256], 1).to(logits.dtype)
    return reg, torch.cat([xy, xy], 1), [(300, 300)] * B


def oracle_candidates(logits, levels, score_thresh, topk):
    """Per image: the set of (anchor, label, score) of the per-level top-k, ranked by (score desc,
    lower index first), computed with torch.sigmoid on each level's logits."""
    out = []
    for b in range(logits.shape[0]):
        got, start = set(), 0
        for n in levels:
            s = torch.sigmoid(logits[b, start:start + n]).flatten()
            idx = torch.nonzero(s > score_thresh).flatten()
            order = torch.sort(s[idx], descending=True, stable=True)[1][:topk]
            K = logits.shape[2]
            for i in idx[order].tolist():
                got.add((start + i // K, i % K, s[i].item()))
            start += n
        out.append(got)
    return out


def as_set(det):
    anchors = (det["boxes"][:, 1].long() * 256 + det["boxes"][:, 0].long()).tolist()
    return set(zip(anchors, det["labels"].tolist(), det["scores"].tolist()))


def one_thread(fn):
    """torch.sigmoid computes the tail of its vectorised loop (the last n mod 64 elements, and
    those of each thread's chunk of a long level) with the scalar exp, which can differ by an
    ulp; the kernel scores everything on the vectorised path. So the references run on one
    thread, on levels whose logit counts are multiples of 64, where torch has no tail."""
    def run(*args, **kw):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kw)
        finally:
            torch.set_num_threads(old)
    return run


reference = one_thread(ref.postprocess_detections)
oracle_candidates = one_thread(oracle_candidates)


def padded(logits, reg, anchors, sizes, levels, **kw):
    return R.postprocess_detections_padded(logits, reg, anchors, sizes, levels, **kw)


# ------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.25, 0.5, 1.0])
def test_any_density_matches_reference(density):
    # Level 0 has 3008 * 91 = 273,728 logits: more than one scan task, so streams meet.
    levels = [3008, 832, 128]
    kw = dict(score_thresh=-1.0) if density == 1.0 else {}
    logits, reg, anchors, sizes = head(2, levels, 91, density, seed=int(density * 1000))
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    exp = reference(logits, reg, anchors, sizes, levels, **kw)
    if density > 0:
        assert min(len(d["scores"]) for d in exp) > 100
    assert_dets_equal(got, exp)


@pytest.mark.parametrize("density", [0.02, 0.5])
def test_per_image_anchors_and_topk(density):
    levels = [2496, 608]
    logits, reg, anchors, sizes = head(3, levels, 20, density, seed=3, per_image_anchors=True)
    kws = [dict(topk_candidates=1), dict(topk_candidates=37, detections_per_img=20)]
    if density < 0.1:  # (the reference's NMS is slow on many candidates)
        kws += [dict(topk_candidates=5000), dict(topk_candidates=10**12)]
    for kw in kws:
        got = R.postprocess_detections(logits, reg, anchors, torch.tensor(sizes), levels, **kw)
        assert_dets_equal(got, reference(logits, reg, anchors, sizes, levels, **kw))


def test_topk_zero_and_thresholds_at_and_above_one():
    levels = [700, 90]
    logits, reg, anchors, sizes = head(2, levels, 7, 0.5, seed=5)
    logits[0, :30] = INF  # score exactly 1: not > 1
    for kw in [dict(topk_candidates=0), dict(score_thresh=1.0), dict(score_thresh=1.5),
               dict(score_thresh=INF), dict(detections_per_img=0)]:
        out = padded(logits, reg, anchors, sizes, levels, **kw)
        assert out[3].tolist() == [0, 0] and (out[2] == -1).all(), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_thresholds_near_zero_and_one(dtype):
    """score_thresh just below 1 (only saturated scores pass), 0 (score 0 fails), a subnormal
    threshold and negative ones (-inf logits, score 0, pass)."""
    levels = [1536, 320]
    logits, reg, anchors, sizes = head(2, levels, 9, 0.3, seed=6, dtype=dtype)
    logits[0, :100] = 40.0
    logits[1, 200:260] = -INF
    logits[1, 300:340] = -200.0
    one_minus = 1.0 - torch.finfo(dtype).eps / 2  # the largest value below 1 in the dtype
    for thr in [one_minus, 1 - 1e-7, 0.0, 1e-45, 1e-300, -1e-30, -0.5]:
        kw = dict(score_thresh=thr, topk_candidates=400, detections_per_img=1000)
        got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        assert_dets_equal(got, reference(logits, reg, anchors, sizes, levels, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["quantised", "saturated", "block_of_equal"])
def test_ties_at_the_cut(dtype, kind):
    """Many exactly equal scores at the k-th place: the lower index wins, as in a stable sort.
    NMS cannot suppress here, so the detections are exactly the oracle's candidates."""
    B, levels, K = 2, [4992, 704], 6
    A = sum(levels)
    g = torch.Generator().manual_seed(7)
    if kind == "quantised":
        logits = (torch.randn(B, A, K, generator=g) * 4).round() / 2  # 0.5 steps: many equal scores
    elif kind == "saturated":
        # 30 % of logits at 20..60: float32 (and every reduced dtype) rounds all their scores to 1
        logits = torch.randn(B, A, K, generator=g) * 2
        hot = torch.rand(B, A, K, generator=g) < 0.3
        logits[hot] = 20 + 40 * torch.rand(int(hot.sum()), generator=g)
    else:
        # a block of 3000 equal logits straddling the top-k boundary, with better and worse ones
        logits = torch.randn(B, A, K, generator=g) - 4
        logits.view(B, -1)[:, 4000:22000:6] = 1.25
        logits.view(B, -1)[:, 25000:25400] = 3.0
    logits = logits.to(dtype)
    reg, anchors, sizes = disjoint_head(logits)
    for topk in [50, 1000, 2999]:
        kw = dict(topk_candidates=topk, detections_per_img=10**6)
        got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        for d, o in zip(got, oracle_candidates(logits, levels, 0.05, topk)):
            assert as_set(d) == o
        if topk == 1000:  # order and labels too (the reference's NMS is slow on many candidates)
            assert_dets_equal(got, reference(logits, reg, anchors, sizes, levels, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_nan_and_infinite_logits_at_high_density(dtype):
    levels = [4000, 512]
    logits, reg, anchors, sizes = head(2, levels, 8, 0.5, seed=8, dtype=dtype)
    g = torch.Generator().manual_seed(8)
    u = torch.rand(logits.shape, generator=g)
    logits[u < 0.1] = NAN
    logits[(u >= 0.1) & (u < 0.2)] = INF
    logits[(u >= 0.2) & (u < 0.3)] = -INF
    for kw in [dict(), dict(score_thresh=-0.5), dict(score_thresh=0.0), dict(topk_candidates=3)]:
        got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        assert_dets_equal(got, reference(logits, reg, anchors, sizes, levels, **kw))


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_sorted_logits(order):
    """Ascending logits make every one a new best (the cut rises at each step); descending ones
    settle the cut at the first k."""
    levels = [3008]
    logits = torch.linspace(-3, 12, 3008 * 10).reshape(1, 3008, 10)
    if order == "descending":
        logits = logits.flip(1).flip(2).contiguous()
    reg, anchors, sizes = disjoint_head(logits)
    kw = dict(topk_candidates=500, detections_per_img=10**6)
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    assert as_set(got[0]) == oracle_candidates(logits, levels, 0.05, 500)[0]
    assert_dets_equal(got, reference(logits, reg, anchors, sizes, levels, **kw))


def test_float64_ranks_in_float64_at_high_density():
    """Half of the logits in [17, 40): all 1.0 in float32, distinct in float64. The top-k must
    be the largest float64 scores, not the lowest indices."""
    B, levels, K = 1, [6000], 4
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(B, 6000, K, generator=g, dtype=torch.float64)
    hot = torch.rand(B, 6000, K, generator=g) < 0.5
    logits[hot] = 17 + 23 * torch.rand(int(hot.sum()), generator=g, dtype=torch.float64)
    reg, anchors, sizes = disjoint_head(logits)
    kw = dict(topk_candidates=50, detections_per_img=1000)
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)[0]
    best = torch.sort(torch.sigmoid(logits).flatten(), descending=True)[0][:50]
    assert torch.equal(got["scores"], best)
    assert as_set(got) == oracle_candidates(logits, levels, 0.05, 50)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bitwise_independent_of_thread_count(dtype):
    # 7000 * 91 = 637,000 logits in level 0: 3 scan tasks, split mid-level across threads.
    levels = [7000, 1200, 90]
    logits, reg, anchors, sizes = head(2, levels, 91, 0.3, seed=10, dtype=dtype)
    logits[1, 100:3000, 5] = 30.0  # ties at 1.0
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(padded(logits, reg, anchors, sizes, levels))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


_PEAK_SCRIPT = r"""
import math, sys, torch
sys.path.insert(0, {root!r})
import retina_fast.ops as R
torch.set_num_threads(2)
B, A, K = 1, 30000, 91
g = torch.Generator().manual_seed(0)
logits = torch.randn(B, A, K, generator=g) * 2 + ({mu})
reg = torch.zeros(B, A, 4)
anchors = torch.rand(A, 4, generator=g).cumsum(1) * 100
sizes = torch.tensor([[800, 800]])
levels = [24000, 6000]
R.postprocess_detections_padded(logits[:, :100].contiguous(), reg[:, :100].contiguous(), anchors[:100], sizes, [100])
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS (Linux >= 4.0): the inputs' temporaries do not hide the call's peak
before = status("VmRSS:")
hwm = lambda: status("VmHWM:")
out = R.postprocess_detections_padded(logits, reg, anchors, sizes, levels)
print((hwm() - before) * 1024, float((torch.sigmoid(logits) > 0.05).float().mean()))
"""


def _peak_growth(mu):
    code = _PEAK_SCRIPT.format(root=ROOT, mu=mu)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    grow, density = out.stdout.split()
    return int(grow), float(density)


def test_memory_does_not_grow_with_survivors():
    """2.7M logits with half of the scores above 0.05 (1.4M survivors: materialising them took
    ~45 MB before): the call's peak RSS growth stays within a few MB (the top-k buffers and the
    outputs), as at a density of 0."""
    grow, density = _peak_growth(LOGIT_005)
    assert 0.45 < density < 0.55
    assert grow < 6 * 2**20, grow


# ------------------------------------------------------------------------------ CUDA vs CPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.5, 1.0])
def test_cuda_any_density_matches_cpu(dtype, density):
    """Logits over [-3, 2] in 0.25 steps: many exact ties (broken alike on both devices), and
    scores of different logits far more than an ulp apart even in bfloat16, so an ulp between
    the devices' sigmoids cannot reorder the top-k. Per-image anchors, an empty level."""
    levels = [3000, 700, 0, 90]
    B, K = 3, 20
    A = sum(levels)
    g = torch.Generator().manual_seed(int(density * 1000) + 11)
    logits = (torch.rand(B, A, K, generator=g) * 5 - 3).mul(4).round().div(4)
    keep = torch.rand(B, A, K, generator=g) < density
    logits[~keep] = -6.0
    logits = logits.to(dtype)
    reg = (torch.randn(B, A, 4, generator=g) * 0.2).to(dtype)
    c = torch.rand(A, 2, generator=g) * 600
    anchors = torch.cat([c - 30, c + 30], 1).to(dtype)
    anchors = torch.stack([anchors + 3 * b for b in range(B)])
    sizes = [(640, 640)] * B
    kw = dict(score_thresh=-1.0) if density == 1.0 else {}
    for extra in [dict(), dict(topk_candidates=7, detections_per_img=50)]:
        args = dict(kw, **extra)
        got = R.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels, **args)
        exp = R.postprocess_detections(logits, reg, anchors, sizes, levels, **args)
        assert sum(len(d["scores"]) for d in exp) > 0
        assert_dets_match(got, exp)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_exact_scores_and_ties_match_cpu_bitwise(dtype):
    """Logits whose scores every implementation computes exactly (-inf: 0, 0: 1/2, >= 20 and
    +inf: 1, NaN: never) in long runs of equal scores, so the select must go through the index
    digits; the two devices agree bit for bit, and with the oracle."""
    levels = [20000, 3000, 40]
    B, K = 2, 5
    A = sum(levels)
    g = torch.Generator().manual_seed(12)
    choice = torch.randint(0, 6, (B, A, K), generator=g)
    values = torch.tensor([-INF, 0.0, 20.0, 35.0, INF, NAN])
    logits = values[choice].to(dtype)
    logits[1, :3000] = 25.0  # one long run of 1.0 at the start of level 0
    reg, anchors, sizes = disjoint_head(logits)
    for kw in [dict(topk_candidates=1000), dict(topk_candidates=2), dict(score_thresh=-0.5, topk_candidates=5000),
               dict(score_thresh=0.5, topk_candidates=100), dict(score_thresh=0.0, topk_candidates=1000)]:
        kw = dict(kw, detections_per_img=10**5)
        got = padded(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels, **kw)
        exp = padded(logits, reg, anchors, sizes, levels, **kw)
        for a, e in zip(got, exp):
            assert torch.equal(a.cpu(), e)
        dets = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        for d, o in zip(dets, oracle_candidates(logits, levels, kw.get("score_thresh", 0.05),
                                                kw["topk_candidates"])):
            assert as_set(d) == o


@requires_cuda
def test_cuda_more_than_32_levels_and_image_batches():
    """40 levels (two launch groups of levels) and 8,200 images with a searched level (more than
    one batch of histograms: 2^24 counters / (1 level * 2048 bins) = 8,192 images)."""
    levels = [30 + (l % 7) for l in range(40)]
    logits, reg, anchors, sizes = head(2, levels, 4, 0.4, seed=13)
    for kw in [dict(topk_candidates=20), dict(topk_candidates=200)]:
        got = R.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels, **kw)
        exp = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        assert_dets_match(got, exp)
    B = 8200
    logits = torch.full((B, 3, 2), -6.0)
    logits[:, 0, 1] = 1.0
    logits[:, 2, 0] = 2.0
    logits[B - 1, 1, 1] = 3.0
    logits[B - 1, 0, 0] = 0.0
    reg, anchors, _ = disjoint_head(logits)
    sizes = torch.tensor([[10, 30]] * B)
    kw = dict(topk_candidates=2)
    got = padded(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes.to(CUDA), [3], **kw)
    exp = padded(logits, reg, anchors, sizes, [3], **kw)
    for j, (a, e) in enumerate(zip(got, exp)):
        if j == 1:  # scores: the devices' sigmoids may differ by an ulp
            torch.testing.assert_close(a.cpu(), e, rtol=2.5e-7, atol=0)
        else:
            assert torch.equal(a.cpu(), e)
    assert exp[3][0].item() == 2 and exp[3][B - 1].item() == 2
    assert exp[2][B - 1].tolist()[:2] == [1, 0]  # the two best of the last image: 3.0 and 2.0
