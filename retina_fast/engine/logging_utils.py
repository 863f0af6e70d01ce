"""What a run reports: progress with an ETA, ``metrics.jsonl``, TensorBoard, and ``log.txt``.

* :class:`Progress`: a tqdm bar on a terminal (it shows its own ETA), otherwise a line every
  ``every`` steps ending in ``eta 4m05s`` (log files and CI consoles cannot show a bar).
* :class:`MetricsLogger`: one JSON object per line in ``OUT/metrics.jsonl`` (always; training
  records carry ``"kind": "train"``, evaluations ``"kind": "eval"``) and, with
  ``tensorboard=True``, the same numbers as TensorBoard scalars through
  ``torch.utils.tensorboard`` in ``OUT/tensorboard/``. ``tensorboard`` is an optional package:
  :func:`require_tensorboard` says what to install.
* :func:`start_console_log`: from then on everything written to stdout and stderr (prints and
  the ``retina_fast`` logger) also goes to a file, ``OUT/log.txt``; a terminal's tqdm redraws
  (``\\r`` lines) are left out of the file, which instead gets a progress line every ``every``
  steps (:func:`log_file_only`).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time

from retina_fast.data.errors import RetinaFastError

log = logging.getLogger("retina_fast")


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Progress of ``total`` steps, starting from step ``start`` (a resumed run).

    ``mode``: ``auto`` (a bar on a terminal, lines otherwise), ``bar``, ``lines`` or ``none``;
    ``enabled=False`` (ranks other than 0) shows nothing. In ``lines`` mode :meth:`update`
    prints ``{prefix} {noun} {n}/{total} {stats} eta ...`` every ``every`` steps and when
    ``force_line``; the ETA is the remaining steps at the average speed since the start.
    ``total`` 0 or None: not known yet (``n/?``, no ETA)."""

    def __init__(self, mode: str, total: int | None, prefix: str, enabled: bool = True,
                 every: int = 50, noun: str = "it", start: int = 0, clock=time.perf_counter):
        self.bar = None
        self.prefix, self.noun, self.every, self.total = prefix, noun, max(1, int(every)), total
        self.clock = clock
        self.start, self.t0 = start, clock()
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        if self.mode == "bar":
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total or None, initial=start, unit=noun, dynamic_ncols=True, leave=True)
            except ImportError:
                self.mode = "lines"

    def eta(self, n: int) -> float:
        done = n - self.start
        if done <= 0 or not self.total:
            return math.nan
        return (self.total - n) * (self.clock() - self.t0) / done

    def line(self, n: int, stats: dict) -> str:
        parts = [f"{self.prefix} {self.noun} {n}/{self.total or '?'}"]
        parts += [f"{k}={v}" for k, v in stats.items()]
        if n < (self.total or 0) and n > self.start:
            parts.append(f"eta {format_eta(self.eta(n))}")
        return " ".join(parts)

    def update(self, n: int, stats: dict | None = None, total: int | None = None,
               force_line: bool = False):
        """Step ``n`` (absolute) is done; ``total`` may change (a time-budgeted run)."""
        stats = stats or {}
        if total is not None:
            self.total = total
        due = force_line or n % self.every == 0 or n == self.total
        if self.mode == "bar":
            self.bar.total = self.total or None
            self.bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in stats.items()), refresh=False)
            self.bar.update(n - self.bar.n)
            if due:
                log_file_only(self.line(n, stats) + "\n")
        elif self.mode == "lines" and due:
            print(self.line(n, stats), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------- metrics


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error naming the package."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; say so plainly)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RetinaFastError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class MetricsLogger:
    """``OUT/metrics.jsonl`` and, optionally, TensorBoard scalars under ``OUT/tensorboard``.

    ``start_iter``: where this run starts. ``0`` begins a new file; a resumed run passes its
    iteration, and records of later iterations (written after the checkpoint it resumes from)
    are dropped from the file and purged from TensorBoard, so neither shows them twice. ``None``
    appends (e.g. the evaluation after training)."""

    def __init__(self, out_dir: str, tensorboard: bool = False, start_iter: int | None = None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if start_iter is not None:
            kept = []
            if start_iter > 0 and os.path.isfile(self.path):
                with open(self.path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut short by a crash
                        if rec.get("iter", 0) <= start_iter:
                            kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            writer_cls = require_tensorboard()
            self.writer = writer_cls(os.path.join(out_dir, "tensorboard"), purge_step=start_iter)

    def log(self, kind: str, step: int, values: dict, flush: bool = False):
        """One record: every number in ``values`` becomes the scalar ``{kind}/{name}``."""
        self._file.write(json.dumps({"kind": kind, "iter": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "epoch", "time"):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
        if flush:
            self.flush()

    def flush(self):
        self._file.flush()
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------------------- log.txt


class _Tee:
    """A text stream writing to the original stream and to the log file."""

    def __init__(self, stream, file):
        self._stream, self._file = stream, file

    def write(self, text):
        n = self._stream.write(text)
        if "\r" not in text:  # a terminal's progress-bar redraw; the file gets lines instead
            self._file.write(text)
        return n

    def flush(self):
        self._stream.flush()
        self._file.flush()

    def isatty(self):
        return self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


_active = {}


def start_console_log(path: str, command: str) -> None:
    """Copy stdout, stderr and the ``retina_fast`` logger to ``path`` (appended) until
    :func:`stop_console_log`. The run starts with a dated line holding ``command``."""
    stop_console_log()
    f = open(path, "a", encoding="utf-8")
    f.write(f"== {datetime.datetime.now().isoformat(timespec='seconds')} {command}\n")
    f.flush()
    out, err = _Tee(sys.stdout, f), _Tee(sys.stderr, f)
    swapped = []
    for h in log.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr):
            swapped.append((h, h.stream))
            h.setStream(out if h.stream is sys.stdout else err)
    _active.update(file=f, stdout=sys.stdout, stderr=sys.stderr, handlers=swapped)
    sys.stdout, sys.stderr = out, err


def log_file_only(text: str) -> None:
    """Write ``text`` to the log file only (the console shows a bar instead)."""
    f = _active.get("file")
    if f is not None:
        f.write(text)
        f.flush()


def stop_console_log() -> None:
    if not _active:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdout, sys.stderr = _active["stdout"], _active["stderr"]
    for h, stream in _active["handlers"]:
        h.setStream(stream)
    _active["file"].close()
    _active.clear()
