"""Checkpoints: written atomically (serialised in memory, written to a temporary file in the same
folder, fsync, rename, fsync of the folder), so a crash, a SIGKILL or a full disk mid-write
never leaves a half-written file where the last good checkpoint was. A failed write is a
one-line :class:`CheckpointWriteError` and removes its temporary file; the previous file is
untouched. Temporary files a killed process left behind (``.NAME.tmp.PID``) are removed by
:func:`remove_stale_temporaries` when the next run starts.

Loading is safe: every file is opened with ``torch.load(weights_only=True)``, whose unpickler
builds only tensors, plain containers (dict, list, tuple, str, numbers, None) and allow-listed
types, and refuses every other Python global *before* calling anything. A file crafted to run
code when unpickled (a ``__reduce__`` naming ``os.system``, ``exec``...) is therefore refused
with a one-line :class:`RetinaFastError` and nothing of it runs. Our checkpoints need no
allow-list (the trainer stores numpy's RNG state as plain ints); checkpoints written before
that hold it as a numpy array, for which :func:`load_checkpoint` allows exactly the three numpy
globals an array needs (array reconstruction only: an object array's elements still go
through the same restricted unpickler).
"""

from __future__ import annotations

import glob
import io
import json
import os
import random

import numpy as np
import torch

from retina_fast.data.errors import RetinaFastError
from retina_fast.models.weights import CHECKPOINT_FORMAT, WeightsError, load_file

FORMAT = CHECKPOINT_FORMAT


class CheckpointWriteError(RetinaFastError):
    """A checkpoint (or another run file) could not be written; the previous one is intact."""


def _write_bytes(f, data: bytes) -> None:
    # One place where the bytes reach the file (tests patch it to simulate a full disk).
    f.write(data)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    return os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")


def atomic_write(data: bytes, path: str) -> None:
    """Replace ``path`` by ``data`` atomically; a failure is a :class:`CheckpointWriteError` and
    leaves ``path`` as it was."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            _write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        _remove(tmp)
        raise CheckpointWriteError(
            f"cannot write {path}: {e.strerror or e}; the previous file there is unchanged") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically. Serialised in memory first, so that a write
    error is the OSError of one write (torch's zip writer turns it into an unclear
    RuntimeError) and the file is only open for as long as one write takes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(buf.getbuffer().tobytes(), path)


def atomic_write_json(obj, path: str) -> None:
    atomic_write(json.dumps(obj).encode("utf-8"), path)


def remove_stale_temporaries(path: str) -> list:
    """Delete the temporary files of ``path`` that killed writers left (``.NAME.tmp.*``)."""
    gone = []
    for f in glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                                    f".{glob.escape(os.path.basename(path))}.tmp.*")):
        _remove(f)
        gone.append(f)
    return gone


def rng_state() -> dict:
    # numpy's state is ('MT19937', uint32[624], pos, has_gauss, cached_gaussian); the key is kept
    # as a list of ints so the checkpoint holds plain types only (weights_only, no allow-list).
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": (name, [int(k) for k in key], int(pos), int(has_gauss), float(cached)),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, *rest = state["numpy"]  # key: a list (now) or a uint32 array (older checkpoints)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ safe loading


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs: ndarray, dtype and ``_reconstruct`` (under
    numpy 2's ``numpy._core`` name and, for files pickled by numpy 1, ``numpy.core``)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allow = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]
    for name in ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        allow.append((_reconstruct, name))
    return allow


def safe_load(path: str, what: str = "checkpoint", map_location="cpu", allow=()):
    """``torch.load(path, weights_only=True)`` (:func:`retina_fast.models.weights.load_file`)
    with a one-line :class:`RetinaFastError` for a missing, unreadable or refused file.
    ``allow``: extra globals, allowed for this load only."""
    try:
        return load_file(path, what, map_location, allow)
    except WeightsError as e:
        raise RetinaFastError(str(e)) from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by the trainer (safely, see the module docstring); a missing,
    unreadable, refused or foreign file is a one-line :class:`RetinaFastError`."""
    ckpt = safe_load(path, "checkpoint", map_location, allow=_numpy_array_globals())
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise RetinaFastError(f"{path} is not a retina_fast checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu"):
    """Rebuild the model recorded in ``ckpt`` and load its weights (eval mode)."""
    from retina_fast.engine.model_factory import build_model

    cfg = ckpt["model_config"]
    model = build_model(cfg["name"], cfg["num_classes"], **cfg.get("kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
