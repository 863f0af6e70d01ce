"""make_loader's packed batches: what the workers send is what collate_detection gives."""

import torch

from retina_fast.data import EpochSampler, ShapesConfig, ShapesStream, make_loader, train_transforms
from retina_fast.data.loader import PackedBatch, collate_detection


def _item(h, w, n, dtype=torch.uint8, extra=True):
    t = {"boxes": torch.rand(n, 4) * 10, "labels": torch.arange(n), "iscrowd": torch.zeros(n, dtype=torch.int64)}
    if extra:
        t.update(image_id=n * 7, orig_size=(h, w))
    return torch.randint(0, 255, (3, h, w), dtype=torch.uint8).to(dtype), t


def _same(a, b):
    (ia, ta), (ib, tb) = a, b
    assert len(ia) == len(ib) and len(ta) == len(tb)
    for x, y in zip(ia, ib):
        assert x.dtype == y.dtype and torch.equal(x, y)
    for x, y in zip(ta, tb):
        assert list(x) == list(y)
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_packed_batch_round_trip():
    torch.manual_seed(0)
    cases = [
        [_item(32, 32, 3), _item(32, 32, 0), _item(32, 32, 5)],  # one shape: stacked; an empty image
        [_item(32, 40, 2), _item(48, 32, 1)],  # shapes differ: images stay a list
        [_item(32, 32, 2, torch.float32), _item(32, 32, 1, torch.float32, extra=False)],  # keys differ
    ]
    for batch in cases:
        pb = PackedBatch(batch)
        _same(pb.unpack(), collate_detection(batch))
    assert isinstance(PackedBatch(cases[0]).images, torch.Tensor)
    assert set(PackedBatch(cases[0]).packed) == {"boxes", "labels", "iscrowd"}
    assert isinstance(PackedBatch(cases[1]).images, list)
    assert PackedBatch(cases[2]).packed == {}


def test_worker_batches_equal_in_process_batches():
    ds = ShapesStream(12, seed=3, cfg=ShapesConfig(size=48, min_object_size=6, max_object_size=30),
                      transforms=train_transforms(hflip=0.5, to_float=False))
    got = [list(make_loader(ds, 4, EpochSampler(len(ds), shuffle=True, seed=1), num_workers=w)) for w in (0, 1)]
    assert len(got[0]) == len(got[1]) == 3
    for a, b in zip(*got):
        _same(a, b)
        assert a[0][0].dtype == torch.uint8
