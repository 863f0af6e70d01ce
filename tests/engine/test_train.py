import os

import pytest
import torch

from retina_fast.engine import NonFiniteLossError, build_model, load_checkpoint, train
from retina_fast.engine.model_factory import CrowdAwareRetinaNet

from .helpers import CATEGORIES, TINY_MODEL, tiny_config, tiny_stream


def test_shapes_small_matches_the_recipe():
    m = build_model("shapes-small", 3)
    n = sum(p.numel() for p in m.parameters())
    assert 1.7e6 < n < 1.95e6
    assert m.anchor_generator.sizes == ((8, 10, 12), (16, 20, 25), (32, 40, 50), (64, 80, 101))
    assert len(m.head.classification_head.conv) == 2
    assert m.head.regression_head._loss_type == "giou"
    m.eval()
    out = m([torch.rand(3, 160, 160)])
    assert set(out[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", 3)


def test_crowd_boxes_become_ignored_anchors(monkeypatch):
    torch.manual_seed(0)
    m = build_model("shapes-small", 3, **TINY_MODEL)
    assert isinstance(m, CrowdAwareRetinaNet)
    seen = {}
    match = m.loss.match

    def capture(anchors, packed):
        out = match(anchors, packed)
        seen["packed"], seen["matched"], seen["anchors"] = packed, out.matches, anchors
        return out

    monkeypatch.setattr(m.loss, "match", capture)
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0], [30.0, 30.0, 62.0, 62.0]])
    target = {"boxes": boxes, "labels": torch.tensor([0, 1]), "iscrowd": torch.tensor([0, 1])}
    m.train()
    m([torch.rand(3, 64, 64)], [target])
    matched, anchors, packed = seen["matched"][0], seen["anchors"], seen["packed"]
    # both boxes padded in order, the crowd one flagged: matching never matches it
    assert packed.counts.tolist() == [2] and packed.crowd.tolist() == [[False, True]]
    assert packed.boxes[0, :2].tolist() == boxes.tolist()
    assert matched.max() == 0 and (matched == 0).any()
    inside = ((anchors[:, 0] >= 30) & (anchors[:, 1] >= 30) & (anchors[:, 2] <= 62) & (anchors[:, 3] <= 62))
    assert inside.any() and (matched[inside] == -2).all()
    # without the crowd flag those anchors would be matched or background, never all ignored
    seen.clear()
    m([torch.rand(3, 64, 64)], [{"boxes": boxes, "labels": torch.tensor([0, 1])}])
    assert (seen["matched"][0][inside] != -2).any()


def test_tiny_training_loss_goes_down(tmp_path):
    # 8 images seen again and again: the loss must fall clearly.
    cfg = tiny_config(tmp_path, epochs=16, batch_size=4, lr=3e-3, warmup_iters=3, schedule="constant")
    res = train(cfg, tiny_stream(8, hflip=0.0), CATEGORIES)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 32
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)  # measured: ~1.57 -> ~1.03
    assert os.path.isfile(tmp_path / "checkpoint.pt") and os.path.isfile(tmp_path / "history.json")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Crash(Exception):
    pass


def _crash_at(iteration):
    def cb(rec):
        if rec["iter"] == iteration:
            raise _Crash()
    return cb


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_bit_for_bit(tmp_path, workers):
    # With workers, images are rendered and augmented in other processes: each sample's
    # randomness comes from (seed, epoch, index), so worker layout does not matter.
    full = train(tiny_config(tmp_path / "full", epochs=3, workers=workers), tiny_stream(8), CATEGORIES)
    # The same run, killed during its second epoch (after the epoch-0 checkpoint), then resumed.
    with pytest.raises(_Crash):
        train(tiny_config(tmp_path / "part", epochs=3, workers=workers), tiny_stream(8), CATEGORIES,
              progress_callback=_crash_at(3))
    assert load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))["epoch"] == 0
    resumed = train(tiny_config(tmp_path / "part", epochs=3, workers=workers,
                                resume=str(tmp_path / "part" / "checkpoint.pt")), tiny_stream(8), CATEGORIES)
    a, b = _state(full.model), _state(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    ca, cb = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt")), load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))
    assert ca["epoch"] == cb["epoch"] == 2 and ca["iteration"] == cb["iteration"] == 6
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]


class _NaNAfter:
    """A dataset whose images turn to NaN from epoch ``bad_epoch`` on."""

    def __init__(self, base, bad_epoch):
        self.base, self.bad_epoch = base, bad_epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        img, t = self.base[key]
        if key[0] >= self.bad_epoch:
            img = torch.full_like(img, float("nan"))
        return img, t


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1") as e:
        train(cfg, _NaNAfter(tiny_stream(8), 1), CATEGORIES)
    assert "checkpoint" in str(e.value)
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["epoch"] == 0 and ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_time_budget_stops_and_fits_the_schedule(tmp_path, capsys):
    cfg = tiny_config(tmp_path, epochs=10 ** 6, time_budget=3.0, log_every=5, warmup_iters=2,
                      progress="lines")
    res = train(cfg, tiny_stream(8), CATEGORIES)
    assert res.stopped_by == "time_budget" and res.train_seconds < 3.0 + 5.0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[train] it ")]
    # before the budget is fitted the length is unknown (not the epochs placeholder), then fitted
    assert lines[0].startswith("[train] it 1/? ") and "eta" not in lines[0], lines[0]
    totals = [ln.split()[2].split("/")[1] for ln in lines[1:]]
    assert totals and totals[-1].isdigit(), lines
    assert all(t == "?" or (t.isdigit() and int(t) < 10 ** 4) for t in totals), lines
    lrs = [h["lr"] for h in res.history]
    # the cosine was fitted to the budget: the last lr is well below the peak
    assert len(lrs) > 5 and lrs[-1] < 0.6 * max(lrs)
