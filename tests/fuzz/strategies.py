"""Hypothesis strategies for the op fuzzers: tensors in every dtype and memory layout, boxes that
are degenerate, huge, duplicated or non-finite, and the NaN/inf-aware comparisons."""

import math

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 1e5, -1e5, 1e7, -1e7, NAN, INF, -INF]

dtypes = st.sampled_from(FLOAT_DTYPES)


def finite_floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)


def wild_floats(lo=-30.0, hi=30.0):
    """Mostly ordinary values, sometimes 0, +-1e5, +-1e7, NaN, +-inf."""
    return st.one_of(finite_floats(lo, hi), finite_floats(lo, hi), st.sampled_from(SPECIAL))


@st.composite
def layout(draw, t):
    """The same values as ``t`` in a random memory layout: contiguous, at a storage offset
    (misaligned), strided (every other element of a wider buffer), or transposed (column-major)."""
    kind = draw(st.sampled_from(["contiguous", "offset", "strided", "transposed"]))
    if kind == "offset" and t.numel():
        k = draw(st.integers(1, 3))
        buf = torch.full((t.numel() + k,), 7.0, dtype=torch.float64).to(t.dtype)
        v = buf[k:].view(t.shape)
        v.copy_(t)
        return v
    if kind == "strided" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        v = wide[..., ::2]
        v.copy_(t)
        return v
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@st.composite
def tensors(draw, shape, dtype, elements):
    n = math.prod(shape)
    vals = draw(st.lists(elements, min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=torch.float64).reshape(shape).to(dtype)
    if n > 1 and draw(st.booleans()):  # duplicates: copy some entries over others
        flat = t.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            flat[i] = flat[j]
    return t


@st.composite
def box_rows(draw, n, dtype, kind=None):
    """Tensor[n, 4] boxes (x1, y1, x2, y2): "int" (integer coordinates, exact in every dtype),
    "float", or "wild" (zero or negative width/height, 1e5/1e7 coordinates, NaN, inf); some rows
    duplicate others."""
    kind = kind or draw(st.sampled_from(["int", "float", "wild"]))
    if kind == "int":
        c, s = st.integers(-20, 120).map(float), st.integers(-4, 60).map(float)
    elif kind == "float":
        c, s = finite_floats(-20, 200), finite_floats(-5, 120)
    else:
        c = st.one_of(finite_floats(-20, 200), st.sampled_from([0.0, 1e5, -1e5, 1e7, NAN, INF, -INF]))
        s = st.one_of(finite_floats(-5, 120), st.sampled_from([0.0, -1.0, 1e5, 1e7, NAN, INF]))
    rows = []
    for _ in range(n):
        if rows and draw(st.integers(0, 4)) == 0:
            rows.append(list(draw(st.sampled_from(rows))))
            continue
        x1, y1, w, h = draw(c), draw(c), draw(s), draw(s)
        rows.append([x1, y1, x1 + w, y1 + h])
    return torch.tensor(rows, dtype=torch.float64).reshape(n, 4).to(dtype)


def is_integer_valued(t):
    t = t.double()
    return bool(torch.isfinite(t).all()) and bool((t == t.round()).all()) and bool((t.abs() < 4096).all())


def eps(dtype):
    return torch.finfo(dtype).eps


def assert_close(ours, exact, tol, what="", overflow_ok=None):
    """``ours`` against the float64 ``exact``: the same NaNs, the same infinities, and finite
    values within the element-wise tolerance ``tol`` (a tensor or float). ``overflow_ok``: a
    finite value past this magnitude may stand for an infinity (and vice versa): the two sides
    round differently at the dtype's overflow threshold."""
    assert ours.shape == exact.shape, (what, ours.shape, exact.shape)
    o, e = ours.detach().double(), exact.detach().double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(e) if o.numel() else tol
    if o.numel() == 0:
        return
    on, en = torch.isnan(o), torch.isnan(e)
    bad = on != en
    assert not bad.any(), f"{what}: NaN where the reference is not (or not where it is): ours {o[bad][:5].tolist()} exact {e[bad][:5].tolist()}"
    fin = torch.isfinite(o) & torch.isfinite(e)
    inf_mismatch = ~on & ~fin & (o != e)
    if overflow_ok is not None:
        inf_mismatch &= ~((o.abs() >= overflow_ok) & (e.abs() >= overflow_ok) & (torch.sign(o) == torch.sign(e)))
    assert not inf_mismatch.any(), f"{what}: infinities differ: ours {o[inf_mismatch][:5].tolist()} exact {e[inf_mismatch][:5].tolist()}"
    d = (o - e).abs()
    far = fin & (d > tol)
    assert not far.any(), (f"{what}: {int(far.sum())} values off: ours {o[far][:5].tolist()} exact "
                           f"{e[far][:5].tolist()} tol {tol[far][:5].tolist()}")


def assert_bitwise(a, b, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    assert bool(same.all()), f"{what}: differs at {torch.nonzero(~same)[:5].tolist()}: {a[~same][:5].tolist()} vs {b[~same][:5].tolist()}"
