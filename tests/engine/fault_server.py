"""A fork server for the fault-injection tests (tests/engine/test_faults.py).

Started once per test (``python -m tests.engine.fault_server``); it imports torch and
retina_fast once, then for each JSON command on stdin forks a child that trains the tiny model
(tests/engine/helpers.py) with a fault injected, waits for it (killing it with SIGKILL at the
requested moment) and answers one JSON line: how the child ended. Forking from this
single-threaded process costs milliseconds, so twenty-odd kill trials stay quick, and every
child starts from the same state, so an undisturbed child is the bit-for-bit reference.

Commands: ``{"out": DIR, "epochs": E, "resume": null | "auto" | PATH, "kill": SPEC}``, SPEC one of
``null`` (no fault), ``{"after_s": T}`` (SIGKILL from the server after T seconds),
``{"iteration": K}`` (the child kills itself at iteration K), ``{"write": PHASE, "nth": N}``
(the child kills itself during its N-th checkpoint write, at PHASE: "start" (the temporary file
created, nothing written), "mid" (half the bytes written), "before_rename" (written and synced,
not yet renamed), "after_rename" (the checkpoint replaced, history.json not yet written)).
"""

import json
import os
import signal
import sys
import time


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _child(cmd):
    import torch

    from retina_fast.engine import checkpoint as ck
    from retina_fast.engine import train
    from tests.engine.helpers import CATEGORIES, tiny_config, tiny_stream

    kill = cmd.get("kill") or {}
    writes = {"n": 0}
    if "write" in kill:
        phase, nth = kill["write"], kill["nth"]
        real_write, real_replace = ck._write_bytes, os.replace

        def is_ckpt(path):
            return os.path.basename(str(path)).startswith(".checkpoint.pt.tmp")

        def write_bytes(f, data):
            if is_ckpt(f.name):
                writes["n"] += 1
                if writes["n"] == nth:
                    if phase == "start":
                        _die()
                    if phase == "mid":
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                        _die()
            real_write(f, data)

        def replace(src, dst):
            hit = is_ckpt(src) and writes["n"] == nth
            if hit and phase == "before_rename":
                _die()
            real_replace(src, dst)
            if hit and phase == "after_rename":
                _die()

        ck._write_bytes = write_bytes
        ck.os.replace = replace

    def callback(rec):
        if rec["iter"] == kill.get("iteration"):
            _die()

    torch.set_num_threads(1)
    cfg = tiny_config(cmd["out"], epochs=cmd["epochs"], batch_size=2, resume=cmd.get("resume"))
    train(cfg, tiny_stream(4), CATEGORIES, progress_callback=callback)


def main():
    import torch  # noqa: F401  (imported once, before any fork)

    import retina_fast.engine  # noqa: F401

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(cmd)
            except BaseException as e:  # noqa: BLE001 - reported through the exit status
                sys.stderr.write(f"child failed: {type(e).__name__}: {e}\n")
                code = 3
            finally:
                os._exit(code)
        after = (cmd.get("kill") or {}).get("after_s")
        killed_by_server = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if after is not None and time.monotonic() - t0 >= after:
                os.kill(pid, signal.SIGKILL)
                killed_by_server = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                          "killed_by_server": killed_by_server, "seconds": time.monotonic() - t0}), flush=True)


if __name__ == "__main__":
    main()
