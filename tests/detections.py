"""Tie-tolerant comparison of detections made by two implementations (ours against
torchvision, eager against export, the command line against the API).

The documented tie rule (docs/design.md, "NMS"): results are equal up to exact score ties.
Ours orders tied scores by index; torchvision's CPU sort is unstable, and a score written
rounded (COCO results: 5 decimals) ties more often still. So two correct outputs may list tied
detections in another order. What no tie can change, and what these helpers check:

* per image, the same number of detections;
* the scores in output order, within the tolerance (both are sorted by descending score, so a
  swap of tied detections leaves this sequence unchanged);
* per image and label, the detections as multisets: a one-to-one pairing in which each pair's
  score and box agree within the tolerances. The pairing is a maximum bipartite matching, so a
  greedy choice among near-identical boxes cannot fail a pairing that exists.

A detection left unpaired fails the comparison, unless ``ranks`` says it may: detections at
rank >= ``ranks`` on both sides may go unpaired (a cut-off, such as ``detections_per_img``,
that a near-tie at the boundary moves).
"""

import sys

import torch


def _close(a, b, atol, rtol):
    """[n, m] or elementwise: |a - b| <= atol + rtol |b|, NaN equal to NaN, inf to inf."""
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    return same | ((a - b).abs() <= atol + rtol * b.abs())


def _max_matching(cand):
    """Maximum bipartite matching of a boolean [n, m] candidate matrix (Kuhn's augmenting
    paths); returns owner[m]: the row paired with each column, or -1."""
    n, m = cand.shape
    adj = [torch.nonzero(cand[r]).flatten().tolist() for r in range(n)]
    owner = [-1] * m

    def augment(r, seen):
        for c in adj[r]:
            if not seen[c]:
                seen[c] = True
                if owner[c] == -1 or augment(owner[c], seen):
                    owner[c] = r
                    return True
        return False

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, n + 200))
    try:
        for r in range(n):
            if adj[r]:
                augment(r, [False] * m)
    finally:
        sys.setrecursionlimit(limit)
    return owner


def assert_same_image_detections(o, t, score_atol=0.0, score_rtol=0.0, box_atol=0.0, box_rtol=0.0,
                                 ranks=None, what=""):
    """One image: ``o`` and ``t`` dicts of "boxes" [n, 4], "scores" [n], "labels" [n] (any
    device and float dtype). See the module docstring."""
    o = {k: o[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    t = {k: t[k].detach().cpu() for k in ("boxes", "scores", "labels")}
    n_o, n_t = len(o["scores"]), len(t["scores"])
    assert n_o == n_t, f"{what}: {n_o} detections, expected {n_t}"
    if n_t == 0:
        return
    lim = n_t if ranks is None else min(ranks, n_t)
    in_order = _close(o["scores"][:lim], t["scores"][:lim], score_atol, score_rtol)
    assert bool(in_order.all()), (
        f"{what}: scores in output order differ at ranks {torch.nonzero(~in_order).flatten()[:5].tolist()}: "
        f"{o['scores'][:lim][~in_order][:5].tolist()} vs {t['scores'][:lim][~in_order][:5].tolist()}")
    unpaired_o, unpaired_t = [], []
    for lab in torch.unique(torch.cat([o["labels"], t["labels"]])).tolist():
        io = torch.nonzero(o["labels"] == lab).flatten()
        it = torch.nonzero(t["labels"] == lab).flatten()
        cand = (_close(o["scores"][io][:, None], t["scores"][it][None, :], score_atol, score_rtol)
                & _close(o["boxes"][io][:, None, :], t["boxes"][it][None, :, :], box_atol, box_rtol).all(-1))
        owner = _max_matching(cand)
        paired = set(owner)
        unpaired_t += [int(it[c]) for c in range(len(it)) if owner[c] == -1]
        unpaired_o += [int(io[r]) for r in range(len(io)) if r not in paired]
    bad_o = [r for r in unpaired_o if r < lim]
    bad_t = [r for r in unpaired_t if r < lim]

    def show(d, rows):
        return [(r, int(d["labels"][r]), float(d["scores"][r]), [round(v, 4) for v in d["boxes"][r].tolist()])
                for r in rows[:3]]

    assert not bad_o and not bad_t, (
        f"{what}: {len(bad_o)} detection(s) without a counterpart of the same label, score and box "
        f"(rank, label, score, box): ours {show(o, bad_o)}; expected {show(t, bad_t)}")


def assert_same_detections(ours, theirs, score_atol=0.0, score_rtol=0.0, box_atol=0.0, box_rtol=0.0,
                           ranks=None):
    """Lists of per-image detection dicts (torchvision's detection output)."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert_same_image_detections(o, t, score_atol, score_rtol, box_atol, box_rtol, ranks, f"image {i}")


def coco_results_as_detections(results):
    """COCO results (dicts of image_id, category_id, score, bbox [x, y, w, h]), in file order,
    as {image_id: detections dict} (bbox kept as x, y, w, h: only compared, not used)."""
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return {i: {"boxes": torch.tensor([r["bbox"] for r in rs], dtype=torch.float64).reshape(-1, 4),
                "scores": torch.tensor([r["score"] for r in rs], dtype=torch.float64),
                "labels": torch.tensor([r["category_id"] for r in rs], dtype=torch.int64)}
            for i, rs in by_image.items()}


def assert_same_coco_results(got, want, score_atol=0.0, box_atol=0.0):
    """Two COCO results lists: the same images, and per image the same detections (above)."""
    g, w = coco_results_as_detections(got), coco_results_as_detections(want)
    assert sorted(g) == sorted(w), (sorted(g), sorted(w))
    for i in w:
        assert_same_image_detections(g[i], w[i], score_atol=score_atol, box_atol=box_atol, what=f"image_id {i}")


def assert_same_keep(ours, theirs, scores):
    """Kept indices of two NMS implementations: the same indices, in descending score order,
    any order among exactly tied scores (NaN ties NaN)."""
    assert ours.dtype == theirs.dtype == torch.int64, (ours.dtype, theirs.dtype)
    ours, theirs, s = ours.cpu(), theirs.cpu(), scores.cpu()
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    torch.testing.assert_close(s[ours], s[theirs], rtol=0, atol=0, equal_nan=True)

    def canonical(keep):  # by descending score, index among ties
        v = s[keep].double().nan_to_num(float("inf"))
        order = sorted(range(len(keep)), key=lambda k: (-v[k].item(), int(keep[k])))
        return [int(keep[k]) for k in order]

    assert canonical(ours) == canonical(theirs)
