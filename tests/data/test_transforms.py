import torch

from retina_fast.data import (
    Compose, EpochSampler, RandomHorizontalFlip, RandomResize, Resize, ToFloat, collate_detection,
)


def _image_with_boxes(h, w, boxes):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        img[i % 3, y1:y2, x1:x2] = 255
    return img, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(len(boxes))}


def _pixel_box(img, channel):
    ys, xs = torch.nonzero(img[channel] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip_moves_boxes_with_the_pixels():
    img, t = _image_with_boxes(20, 30, [(2, 3, 10, 8), (25, 0, 30, 20)])
    out, t2 = RandomHorizontalFlip(1.0)(img, t)
    assert t2["boxes"].tolist() == [[20, 3, 28, 8], [0, 0, 5, 20]]
    for i in range(2):
        assert _pixel_box(out, i) == t2["boxes"][i].tolist()
    same, t3 = RandomHorizontalFlip(0.0)(img, t)
    assert torch.equal(same, img) and torch.equal(t3["boxes"], t["boxes"])
    # empty targets survive
    _, te = RandomHorizontalFlip(1.0)(img, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    assert te["boxes"].shape == (0, 4)


def test_resize_scales_boxes_with_the_pixels():
    img, t = _image_with_boxes(40, 80, [(8, 4, 40, 24), (60, 20, 80, 40)])
    out, t2 = Resize(20, 100)(img, t)          # shorter side 40 → 20: factor 0.5
    assert out.shape == (3, 20, 40) and out.dtype == torch.uint8
    assert t2["boxes"].tolist() == [[4, 2, 20, 12], [30, 10, 40, 20]]
    for i in range(2):
        got = _pixel_box(out, i)
        assert max(abs(a - b) for a, b in zip(got, t2["boxes"][i].tolist())) <= 1
    out, t3 = Resize(100, 120)(img, t)         # max_size binds: factor 1.5
    assert out.shape == (3, 60, 120)
    assert torch.allclose(t3["boxes"], t["boxes"] * 1.5)


def test_random_resize_and_flip_follow_the_generator():
    img, t = _image_with_boxes(40, 40, [(1, 2, 10, 20)])
    tf = Compose([RandomResize([20, 30, 40]), RandomHorizontalFlip(0.5), ToFloat()])
    runs = [tf(img, t, torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3, 4, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    assert len({r[0].shape for r in runs}) > 1                    # several scales drawn
    assert all(r[0].dtype == torch.float32 and r[0].max() <= 1 for r in runs)


def test_epoch_sampler_partitions_and_reshuffles():
    s = [EpochSampler(10, num_replicas=3, rank=r, seed=4) for r in range(3)]
    keys = [list(x) for x in s]
    assert all(len(k) == 4 for k in keys)                    # padded to 12
    idx = sorted(i for k in keys for _, i in k)
    assert set(idx) == set(range(10)) and all(e == 0 for k in keys for e, _ in k)
    s[0].set_epoch(1)
    assert [i for _, i in s[0]] != [i for _, i in keys[0]] and all(e == 1 for e, _ in s[0])
    assert list(EpochSampler(10, 3, 0, seed=4)) == keys[0]     # deterministic


def test_collate_keeps_different_sizes():
    a = (torch.zeros(3, 10, 12), {"boxes": torch.zeros(0, 4)})
    b = (torch.zeros(3, 7, 5), {"boxes": torch.ones(1, 4)})
    images, targets = collate_detection([a, b])
    assert [im.shape for im in images] == [(3, 10, 12), (3, 7, 5)] and len(targets) == 2
