"""The bad-input matrix (tests/robustness/bad_input_cases.py): every public op and model entry
point with each class of bad input, in a subprocess, so a segfault, an abort or a hang is a
failed case rather than a dead test run. One subprocess runs all cases and reports each; if it
dies or stalls, the case it had started is recorded as a crash (or hang) and a fresh subprocess
goes on with the next one."""

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE_TIMEOUT = 120.0  # seconds without progress: a hang (the first case also imports torch)


def run_matrix(ids, selftest=False, case_timeout=CASE_TIMEOUT):
    """{case id: record}; a case whose process died or stalled gets outcome "crash"/"hang"."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    if selftest:
        env["RETINA_FAST_BAD_INPUT_SELFTEST"] = "1"
    todo, records = list(ids), {}
    while todo:
        err_file = tempfile.TemporaryFile()  # (a pipe nobody reads could fill and stall the run)
        proc = subprocess.Popen([sys.executable, "-m", "tests.robustness.bad_input_cases", "--ids",
                                 ",".join(map(str, todo))], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err_file, bufsize=0)
        # Lines are split here from raw reads: select() on a buffered file object can report
        # "nothing to read" while lines already sit in the object's buffer (a false hang).
        fd, started, buf, deadline = proc.stdout.fileno(), None, b"", time.monotonic() + case_timeout
        outcome = None
        while outcome is None:
            while b"\n" not in buf:
                r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not r:  # no progress: a hang
                    proc.kill()
                    proc.wait()
                    outcome = "hang"
                    break
                data = os.read(fd, 65536)
                if not data:  # the process ended
                    proc.wait()
                    outcome = "crash"
                    break
                buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode()
                deadline = time.monotonic() + case_timeout
                if line.startswith("START "):
                    started = int(line.split()[1])
                elif line.startswith("{"):
                    rec = json.loads(line)
                    records[rec["i"]] = rec
                    started = None
        proc.stdout.close()
        err_file.seek(0)
        stderr = err_file.read().decode(errors="replace")
        err_file.close()
        done = [i for i in todo if i in records]
        if started is not None:
            records[started] = {"i": started, "outcome": outcome, "rc": proc.returncode,
                                "msg": stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""}
            done.append(started)
        elif proc.returncode != 0 and len(done) < len(todo):
            raise AssertionError(f"the case runner failed before any case (rc {proc.returncode}): {stderr[-2000:]}")
        todo = [i for i in todo if i not in done]
    return records


def _count(selftest=False):
    env = dict(os.environ, PYTHONPATH=ROOT, **({"RETINA_FAST_BAD_INPUT_SELFTEST": "1"} if selftest else {}))
    out = subprocess.run([sys.executable, "-m", "tests.robustness.bad_input_cases", "--count"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.slow  # every public entry point x every bad input, in child processes
def test_every_entry_point_rejects_every_bad_input_cleanly():
    n = _count()
    records = run_matrix(range(n))
    assert len(records) == n
    bad = [r for r in records.values() if r["outcome"] not in ("raised", "returned")]
    assert not bad, "\n".join(json.dumps(r) for r in bad)
    pairs = Counter((r["entry"], r["cls"]) for r in records.values())
    entries = {e for e, _ in pairs}
    assert len(entries) >= 18 and len(pairs) >= 90, (len(entries), len(pairs))  # the matrix did not shrink


def test_the_harness_attributes_crashes_and_hangs():
    n = _count()
    assert _count(selftest=True) == n + 2
    records = run_matrix([n, 0, n + 1, 1], selftest=True, case_timeout=15.0)
    assert records[n]["outcome"] == "crash" and records[n]["rc"] != 0
    assert records[n + 1]["outcome"] == "hang"
    assert records[0]["outcome"] in ("raised", "returned") and records[1]["outcome"] in ("raised", "returned")
