"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), so a crash or a
full disk mid-write never leaves a half-written file where the last good checkpoint was."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from retina_fast.data.errors import RetinaFastError

FORMAT = "retina_fast.checkpoint/1"


def atomic_save(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by the trainer; a missing or unreadable file is a one-line error."""
    if not os.path.isfile(path):
        raise RetinaFastError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise RetinaFastError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
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
