"""The sync-free training step (issue 21 item 4): ``RetinaNet.forward_train_padded`` gives
``forward``'s losses and gradients; ``pad_batch`` raises ``forward``'s errors; the whole step
(forward, losses, backward) compiles with ``fullgraph=True`` into one graph with no break,
computes what eager does, and is not recompiled for another box count inside the bucket; the
trainer's ``compile=True`` trains like eager.

Two inductor compiles of the tiny model (30-50 s each on 2 cores, cold; ~80 s for the file):
one shared by the step tests through a module-scoped fixture, the trainer's own; the other
compiled checks use the aot_eager backend (no codegen)."""

import copy

import pytest
import torch

from retina_fast.engine import build_model, train
from retina_fast.engine.train_step import TrainStep, bucket_rows, make_train_step, pad_batch
from retina_fast.models.loss import InputError

from .helpers import CATEGORIES, TINY_MODEL, tiny_config, tiny_stream

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(name="shapes-small", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {**TINY_MODEL, **kw} if name == "shapes-small" else kw
    return build_model(name, 3, **kw).train()


def _batch(counts, seed=0, size=64, crowd_at=None):
    """Images [3, size, size] and targets with ``counts[b]`` random valid boxes each;
    ``crowd_at=(b, i)`` flags box i of image b as crowd (every target then has ``iscrowd``)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for b, n in enumerate(counts):
        images.append(torch.rand(3, size, size, generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = torch.rand(n, 2, generator=g) * size * 0.35 + 4
        t = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=g)}
        if crowd_at is not None:
            t["iscrowd"] = torch.zeros(n, dtype=torch.int64)
            if crowd_at[0] == b:
                t["iscrowd"][crowd_at[1]] = 1
        targets.append(t)
    return images, targets


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_bucket_rows():
    assert [bucket_rows(n) for n in (0, 1, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 32, 128]
    assert bucket_rows(3, minimum=1) == 4


@pytest.mark.parametrize("case", ["plain", "crowd", "empty_image", "resnet18"])
def test_padded_forward_equals_forward(case):
    """Same losses and gradients as ``forward(list, targets)``: the padded rows, the bucket and
    the always-present crowd mask (all False when no box is crowd) change nothing."""
    kw = {"crowd_at": (1, 0)} if case == "crowd" else {}
    counts = [3, 0, 2] if case == "empty_image" else [3, 2]
    if case == "resnet18":
        model = _model("resnet18-fpn", min_size=128, max_size=128)
        images, targets = _batch(counts, size=128)
    else:
        model = _model()
        images, targets = _batch(counts, **kw)
    twin = copy.deepcopy(model)
    want = model(images, targets)
    sum(want.values()).backward()
    batch = pad_batch(twin, images, targets)
    assert batch.boxes.shape == (len(counts), 8, 4) and batch.counts.tolist() == counts
    assert batch.crowd.sum().item() == (1 if case == "crowd" else 0)
    got = twin.forward_train_padded(*batch.tensors())
    sum(got.values()).backward()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(twin), _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["degenerate", "label", "shape", "no_targets", "channels"])
def test_pad_batch_raises_forwards_errors(bad):
    model = _model()
    images, targets = _batch([2, 1])
    if bad == "degenerate":
        targets[1]["boxes"][0, 2] = targets[1]["boxes"][0, 0]
    elif bad == "label":
        targets[0]["labels"][1] = 3
    elif bad == "shape":
        targets[0]["boxes"] = targets[0]["boxes"][:, :3]
    elif bad == "no_targets":
        targets = None
    else:
        images[0] = images[0][:2]
    with pytest.raises(InputError) as want:
        model(images, targets)
    with pytest.raises(InputError) as got:
        pad_batch(model, images, targets)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16_channels_last"])
def test_no_graph_break_in_forward_loss_or_whole_step(precision):
    model = _model()
    autocast, fmt = None, None
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
        autocast, fmt = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), torch.channels_last
    batch = pad_batch(model, *_batch([3, 1]), memory_format=fmt)
    eager = make_train_step(model, autocast=autocast)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(eager.forward_loss_fn)(*batch.tensors())
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch's dynamo cannot trace loss.backward() (torch >= 2.14 can)")
    # loss.backward() inside the function: traced as autograd.grad + .grad writes
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        model.zero_grad(set_to_none=True)
        ex = torch._dynamo.explain(eager.whole_step_fn)(*batch.tensors(), None)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    torch._dynamo.reset()


def test_forward_loss_compiled_aot_eager_equals_eager():
    """The forward-only compiled mode (whole_step=False): AOTAutograd's backward graph run by
    loss.backward() outside; bitwise eager's with the aot_eager backend."""
    model = _model()
    twin = copy.deepcopy(model)
    batch = pad_batch(model, *_batch([3, 1], crowd_at=(0, 2)))
    torch._dynamo.reset()
    step_c = make_train_step(model, compile=True, whole_step=False, backend="aot_eager")
    step_e = make_train_step(twin)
    lc, pc = step_c(batch)
    le, pe = step_e(batch)
    torch._dynamo.reset()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def compiled():
    """A tiny model, its initial state and its inductor-compiled whole step (one compile)."""
    torch._dynamo.reset()
    model = _model()
    state = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # zero_grad(set_to_none) before each step
    step = make_train_step(model, opt, compile=True)
    yield model, state, step
    torch._dynamo.reset()


def _unique_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_whole_step_equals_eager(compiled):
    model, state, step = compiled
    model.load_state_dict(state)
    twin = copy.deepcopy(model)
    batch = pad_batch(model, *_batch([3, 5]))
    lc, pc = step(batch)
    le, pe = make_train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.0))(batch)
    # inductor reorders sums: float32 rounding-level differences
    for k in pe:
        torch.testing.assert_close(pc[k], pe[k], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-6)
    for a, b in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # BatchNorm's running statistics were updated inside the graph as eager updates them
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_no_recompile_inside_a_bucket(compiled):
    model, state, step = compiled
    model.load_state_dict(state)
    step(pad_batch(model, *_batch([2, 2], seed=1)))  # compiled already, or now
    before = (_unique_graphs(), torch._dynamo.utils.counters["stats"]["calls_captured"])
    for seed, counts, crowd in ((2, [1, 8], None), (3, [0, 4], None), (4, [6, 3], (1, 2))):
        batch = pad_batch(model, *_batch(counts, seed=seed, crowd_at=crowd))
        assert batch.boxes.shape[1] == 8
        loss, _ = step(batch)
        assert torch.isfinite(loss)
    assert (_unique_graphs(), torch._dynamo.utils.counters["stats"]["calls_captured"]) == before


def test_compiled_training_iterations_follow_eager(compiled):
    """Three optimizer steps: the compiled step's losses stay close to eager's."""
    model, state, step = compiled
    model.load_state_dict(state)
    twin = copy.deepcopy(model)
    opt_c = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_e = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    step_c = TrainStep(model, step.forward_loss_fn, step.whole_step_fn, opt_c)  # the compiled graph
    step_e = make_train_step(twin, opt_e)
    got, want = [], []
    for i, counts in enumerate(([3, 5], [1, 2], [4, 0])):
        batch = pad_batch(model, *_batch(counts, seed=10 + i))
        got.append(step_c(batch)[0].item())
        opt_c.step()
        want.append(step_e(batch)[0].item())
        opt_e.step()
    assert got == pytest.approx(want, rel=1e-3), (got, want)
    assert want[0] != want[2]


def test_trainer_compile_follows_eager(tmp_path):
    # compiles the trainer's own step: 27-54 s on 2 cores, cold (under a minute: not marked slow)
    torch._dynamo.reset()
    runs = {}
    for compile in (False, True):
        cfg = tiny_config(tmp_path / str(compile), epochs=1, batch_size=4, compile=compile, precision="fp32")
        runs[compile] = [h["loss"] for h in train(cfg, tiny_stream(12), CATEGORIES).history]
    torch._dynamo.reset()
    assert len(runs[True]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=2e-3), runs


class _NaNBoxes:
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        img, t = self.base[key]
        t = dict(t, boxes=t["boxes"].clone())
        t["boxes"][0, 1] = float("nan")
        return img, t


def test_trainer_compile_stops_on_bad_data_like_eager(tmp_path):
    """pad_batch's InputError is caught where forward's is: the same BadTrainingDataError."""
    from retina_fast.engine.train import BadTrainingDataError

    msgs = []
    for compile in (False, True):
        with pytest.raises(BadTrainingDataError) as e:
            train(tiny_config(tmp_path / str(compile), batch_size=2, compile=compile), _NaNBoxes(tiny_stream(4)),
                  CATEGORIES)
        msgs.append(str(e.value).replace(str(tmp_path / str(compile)), "OUT"))
    assert msgs[0] == msgs[1] and "positive height and width" in msgs[0], msgs


def test_pad_batch_size_bucket_and_memory_format():
    model = _model()
    images, targets = _batch([2, 1])
    batch = pad_batch(model, images, targets, size_bucket=96, memory_format=torch.channels_last)
    assert batch.images.shape == (2, 3, 96, 96) and batch.image_sizes == [(64, 64), (64, 64)]
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    plain = pad_batch(model, images, targets)
    assert torch.equal(batch.images[..., :64, :64], plain.images) and (batch.images[..., 64:, :] == 0).all()


def test_a_new_bucket_compiles_one_dynamic_graph():
    """Past the bucket, dynamo recompiles once with M symbolic (automatic dynamic shapes); that
    graph then serves every M and still equals eager (aot_eager: no codegen, exact)."""
    model = _model()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    step = make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), compile=True, backend="aot_eager")
    eager = make_train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.0))
    graphs = []
    for seed, counts in enumerate(([3, 2], [12, 1], [40, 5], [2, 9])):
        batch = pad_batch(model, *_batch(counts, seed=seed))
        got, want = step(batch)[0], eager(batch)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        graphs.append(_unique_graphs())
    torch._dynamo.reset()
    assert [g - graphs[0] for g in graphs] == [0, 1, 1, 1], graphs
