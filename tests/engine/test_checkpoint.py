"""Safe loading: every file is opened with weights_only=True; a file crafted to run code when
unpickled is refused and nothing of it runs; our checkpoints (new and old) still load."""

import os
import random

import numpy as np
import pytest
import torch

from retina_fast.data.errors import RetinaFastError
from retina_fast.engine import load_checkpoint, train
from retina_fast.engine.checkpoint import FORMAT, atomic_save, rng_state, safe_load, set_rng_state

from .helpers import CATEGORIES, tiny_config, tiny_stream


class _WritesMarker:
    """Unpickling this object calls ``exec`` (or ``os.system``): it writes ``marker``."""

    def __init__(self, marker, how="exec"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def crafted_checkpoint(path, marker, how="exec", inside="top"):
    """A file that looks like ours (format tag, model weights) with the payload somewhere."""
    evil = _WritesMarker(marker, how)
    obj = {"format": FORMAT, "model": {"w": torch.zeros(2)}, "model_config": {"name": "shapes-small",
           "num_classes": 3, "kwargs": {}}, "categories": []}
    if inside == "top":
        obj["extra"] = evil
    elif inside == "numpy":  # inside an object array: the numpy allow-list must not let it through
        obj["rng"] = {"numpy": np.array([evil], dtype=object)}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    train(tiny_config(d, epochs=1, max_iters=1), tiny_stream(4), CATEGORIES, config={"seed": 0, "lr": 1e-3})
    return str(d / "checkpoint.pt")


def test_the_payload_is_live_without_weights_only(tmp_path):
    # So that the refusals below mean something: the same files do run code when fully unpickled.
    for how in ("exec", "system"):
        marker = tmp_path / f"ran_{how}"
        torch.load(crafted_checkpoint(tmp_path / f"{how}.pt", marker, how), weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("how,inside", [("exec", "top"), ("system", "top"), ("exec", "numpy")])
def test_crafted_checkpoint_is_refused_and_nothing_runs(tmp_path, how, inside):
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, how, inside)
    with pytest.raises(RetinaFastError) as e:
        load_checkpoint(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("refusing to load checkpoint") and "nothing of it was run" in msg
    # an object array is refused at its dtype, before any element is unpickled
    assert {"exec": "the Python object exec", "system": "the Python object posix.system",
            "numpy": "numpy.dtypes.ObjectDType"}["numpy" if inside == "numpy" else how] in msg
    assert not marker.exists()
    with pytest.raises(RetinaFastError, match="refusing to load weights"):
        safe_load(str(path), "weights")
    assert not marker.exists()


def test_trainer_checkpoint_holds_only_plain_types(trained_checkpoint):
    # No allow-list needed: torch's own weights-only unpickler takes the whole file.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(trained_checkpoint) == []
    raw = torch.load(trained_checkpoint, weights_only=True)
    assert raw["format"] == FORMAT and raw["config"] == {"seed": 0, "lr": 1e-3}
    assert isinstance(raw["rng"]["numpy"][1], list) and len(raw["rng"]["numpy"][1]) == 624
    assert load_checkpoint(trained_checkpoint)["epoch"] == 0


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    atomic_save({"rng": rng_state()}, str(tmp_path / "rng.pt"))
    want = (np.random.rand(5), random.random(), torch.rand(5))
    np.random.seed(9), random.seed(9), torch.manual_seed(9)
    set_rng_state(safe_load(str(tmp_path / "rng.pt"))["rng"])
    got = (np.random.rand(5), random.random(), torch.rand(5))
    assert np.array_equal(want[0], got[0]) and want[1] == got[1] and torch.equal(want[2], got[2])


def test_old_checkpoint_with_numpy_rng_state_still_loads_and_resumes(tmp_path, trained_checkpoint):
    # Checkpoints written before the RNG state became plain ints hold a numpy uint32 array.
    old = torch.load(trained_checkpoint, weights_only=True)
    np.random.seed(5)
    old["rng"]["numpy"] = np.random.get_state()
    want = np.random.rand(3)
    path = str(tmp_path / "old.pt")
    torch.save(old, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)  # numpy globals inside
    ck = load_checkpoint(path)
    assert isinstance(ck["rng"]["numpy"][1], np.ndarray)
    set_rng_state(ck["rng"])
    assert np.array_equal(np.random.rand(3), want)
    res = train(tiny_config(tmp_path / "resumed", epochs=2, resume=path), tiny_stream(4), CATEGORIES)
    assert res.iterations == 2


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    cases = {"nope.pt": "checkpoint not found", "junk.pt": "cannot read checkpoint",
             "trunc.pt": "cannot read checkpoint", "foreign.pt": "is not a retina_fast checkpoint",
             "module.pt": "torch.nn.modules.linear.Linear"}
    for name, needle in cases.items():
        with pytest.raises(RetinaFastError) as e:
            load_checkpoint(str(tmp_path / name))
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
