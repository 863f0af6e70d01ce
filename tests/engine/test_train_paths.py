"""Training paths no other test reached: AMP (bfloat16 autocast on the CPU), the step schedule
with ``lr_steps``, multi-scale ``min_size``. In-process and tiny (the command-line flags that
lead here are tests/test_cli_paths.py's)."""

import math

import torch

from retina_fast.engine import train
from retina_fast.models.loss import RetinaNetLoss

from .helpers import CATEGORIES, TINY_MODEL, tiny_config, tiny_stream


def _recording_loss(monkeypatch):
    """Wrap RetinaNetLoss.forward to record what each training step hands it."""
    seen = []
    forward = RetinaNetLoss.forward

    def record(self, cls_logits, bbox_regression, anchors, packed, box_loss="l1"):
        out = forward(self, cls_logits, bbox_regression, anchors, packed, box_loss)
        seen.append({"logits_dtype": cls_logits.dtype, "autocast": torch.is_autocast_enabled("cpu"),
                     "anchors": int(anchors.shape[0]), "loss_dtype": out["classification"].dtype})
        return out

    monkeypatch.setattr(RetinaNetLoss, "forward", record)
    return seen


def test_amp_bfloat16_training_on_cpu(tmp_path, monkeypatch):
    seen = _recording_loss(monkeypatch)
    res = train(tiny_config(tmp_path, amp=True, max_iters=3), tiny_stream(8), CATEGORIES)
    assert res.iterations == 3 and len(seen) == 3
    # the head ran under bfloat16 autocast; our losses accumulate in float32
    assert all(s["autocast"] and s["logits_dtype"] == torch.bfloat16 for s in seen)
    assert all(s["loss_dtype"] == torch.float32 for s in seen)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    # the parameters stay float32 and the checkpoint loads
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    from retina_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint

    again = model_from_checkpoint(load_checkpoint(res.checkpoint))
    for a, b in zip(again.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)
    # float32 (auto would choose bfloat16 on a CPU with native bfloat16): float32 logits, no autocast
    seen.clear()
    train(tiny_config(tmp_path / "fp32", precision="fp32", max_iters=1), tiny_stream(8), CATEGORIES)
    assert seen and not seen[0]["autocast"] and seen[0]["logits_dtype"] == torch.float32


def test_step_schedule_with_lr_steps(tmp_path, monkeypatch):
    # 8 images, batch 4: 2 iterations per epoch; the lr drops by lr_gamma at epochs 1 and 2.
    # Recorded as each optimizer step uses it (the history's "lr" is read after the scheduler
    # has stepped, i.e. it is the next iteration's).
    used = []
    step = torch.optim.AdamW.step

    def record(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = tiny_config(tmp_path, epochs=3, schedule="step", lr_steps=(1, 2), lr_gamma=0.1, warmup_iters=0, lr=1e-3)
    res = train(cfg, tiny_stream(8), CATEGORIES)
    assert len(used) == len(res.history) == 6
    for got, want in zip(used, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]):
        assert math.isclose(got, want, rel_tol=1e-9), used
    for got, want in zip([h["lr"] for h in res.history], used[1:] + [1e-5]):
        assert math.isclose(got, want, rel_tol=1e-9)


def test_multi_scale_min_size(tmp_path, monkeypatch):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    sides = []
    resize = GeneralizedRCNNTransform.resize

    def record(self, image, target=None):
        out = resize(self, image, target)
        sides.append(min(out[0].shape[-2:]))
        return out

    monkeypatch.setattr(GeneralizedRCNNTransform, "resize", record)
    kw = dict(TINY_MODEL, min_size=(48, 80), max_size=200)
    res = train(tiny_config(tmp_path, model_kwargs=kw, max_iters=4, epochs=4), tiny_stream(8), CATEGORIES)
    assert res.iterations == 4 and res.model.transform.min_size == (48, 80)
    # torchvision's transform draws one of the sizes per training image: both appear, nothing else
    assert len(sides) == 16 and set(sides) == {48, 80}, sides
