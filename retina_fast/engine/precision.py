"""The run's numeric precision and memory format, chosen for the hardware.

``--precision auto|fp32|bf16|fp16`` and ``--channels-last/--no-channels-last`` of ``train``,
``eval``, ``predict``, ``demo`` and ``bench`` resolve here into a :class:`RunSettings`: what
autocast dtype the convolutions run in, whether tensors are channels_last, whether a
GradScaler is needed, and a sentence saying why (the run's log and ``summary.json`` carry it).

``auto``:

* CPU: bfloat16 autocast where the CPU computes bfloat16 natively (AMX tiles or
  AVX-512-BF16: asked from torch, ``/proc/cpuinfo`` as the fallback) and oneDNN can use it,
  float32 otherwise. channels_last whenever oneDNN is available: its convolutions are
  channels_last inside, so an NCHW model pays a reorder around every convolution (measured
  on a 2-core AVX-512-BF16 EPYC, R50-FPN b2 512 px: 7-9 % faster in float32, 17-18 % in
  bfloat16; see the README's model table).
* CUDA: bfloat16 where the device supports it (Ampere and newer), else float16 with the
  GradScaler; channels_last (tensor-core convolutions are NHWC).

Our kernels take the head's bfloat16/float16 outputs and compute in float32 inside; losses
and detections are float32 whatever the precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

from retina_fast.data.errors import RetinaFastError

# torch is imported inside the functions: the command line adds these flags before it loads torch.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunSettings:
    precision: str          # fp32 | bf16 | fp16 (resolved)
    channels_last: bool
    device: str             # cpu | cuda (the device type)
    grad_scaler: bool       # fp16 on CUDA: scale the loss
    reason: str             # why, in one sentence
    requested: str = "auto"  # what was asked for (precision)

    @property
    def dtype(self):
        """The autocast dtype, or None for float32 (no autocast)."""
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def memory_format(self):
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """The context the model's forward runs in (a no-op for float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device, dtype=self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"precision {self.precision}{' (auto)' if self.requested == 'auto' else ''}, "
                f"{'channels_last' if self.channels_last else 'NCHW'}: {self.reason}")


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_features() -> dict:
    """What the CPU offers for bfloat16: ``{"amx": bool, "avx512_bf16": bool,
    "onednn_bf16": bool, "capability": str}``."""
    import torch

    flags = None

    def flag(name, fn):
        nonlocal flags
        probe = getattr(torch.cpu, fn, None)
        if probe is not None:
            try:
                return bool(probe())
            except Exception:  # noqa: BLE001 -- an old torch: fall back to /proc/cpuinfo
                pass
        if flags is None:
            flags = _cpuinfo_flags()
        return name in flags

    amx = flag("amx_bf16", "_is_amx_tile_supported")
    avx512_bf16 = flag("avx512_bf16", "_is_avx512_bf16_supported")
    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        onednn = False
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cap = "unknown"
    return {"amx": amx, "avx512_bf16": avx512_bf16, "onednn_bf16": onednn, "capability": cap}


def resolve(precision: str = "auto", channels_last: bool | None = None, device="cpu",
            amp: bool = False) -> RunSettings:
    """:class:`RunSettings` for ``precision`` (one of :data:`PRECISIONS`) and ``channels_last``
    (None: the hardware's choice) on ``device``. ``amp`` is the old switch: with ``precision``
    ``auto`` it means bfloat16 on CPU, float16 on CUDA, whatever the hardware."""
    import torch

    if amp and precision == "auto":
        precision = "fp16" if torch.device(device).type == "cuda" else "bf16"
    if precision not in PRECISIONS:
        raise RetinaFastError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    kind = "cuda" if dev.type == "cuda" else "cpu"
    if kind == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(dev) if torch.cuda.is_available() else "CUDA"
        if precision == "auto":
            chosen = "bf16" if bf16_ok else "fp16"
            why = (f"{name} computes bfloat16 natively" if bf16_ok
                   else f"{name} has no bfloat16: float16 with loss scaling")
        else:
            chosen, why = precision, "as asked"
            if precision == "bf16" and not bf16_ok:
                raise RetinaFastError(f"--precision bf16: {name} does not support bfloat16; use fp16")
        cl = True if channels_last is None else bool(channels_last)
        if channels_last is None:
            why += "; channels_last for the tensor cores"
        return RunSettings(chosen, cl, kind, chosen == "fp16", why, precision)

    feats = cpu_features()
    native = (feats["amx"] or feats["avx512_bf16"]) and feats["onednn_bf16"]
    if precision == "auto":
        if native:
            what = "AMX" if feats["amx"] else "AVX-512-BF16"
            chosen, why = "bf16", f"the CPU computes bfloat16 natively ({what}, oneDNN)"
        else:
            chosen, why = "fp32", (f"the CPU has no native bfloat16 (no AMX or AVX-512-BF16; "
                                   f"{feats['capability']}): bfloat16 would be emulated and slower")
    else:
        chosen, why = precision, "as asked"
        if precision == "fp16":
            # CPU autocast supports float16, but without AMX-FP16 it is emulated: allowed, said.
            why = "as asked (float16 autocast on the CPU, no loss scaling)"
    onednn = torch.backends.mkldnn.is_available()
    if channels_last is None:
        cl = onednn
        why += ("; channels_last because oneDNN's convolutions are NHWC inside" if cl
                else "; NCHW (no oneDNN)")
    else:
        cl = bool(channels_last)
    return RunSettings(chosen, cl, kind, False, why, precision)


def add_flags(p) -> None:
    """``--precision`` and ``--channels-last/--no-channels-last`` on parser ``p``."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="numeric precision of the convolutions: auto = bfloat16 autocast where "
                        "the hardware computes it natively (CPU with AMX or AVX-512-BF16; CUDA "
                        "Ampere+), float16 + loss scaling on older GPUs, else float32. Losses, "
                        "box decoding and NMS are float32 always")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="channels_last memory format (default: where it is faster, see --precision)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW (default: off, see --channels-last)")


def from_args(args, device) -> RunSettings:
    """The settings for a parsed command line; the old ``--amp`` means ``--precision``
    bf16 on CPU / fp16 on CUDA when ``--precision`` is left at auto."""
    return resolve(getattr(args, "precision", "auto") or "auto", getattr(args, "channels_last", None), device,
                   amp=getattr(args, "amp", False))
