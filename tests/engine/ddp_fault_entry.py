"""torchrun entry for test_faults.py's dead-rank test: ``retina-fast`` itself, except that on the
first attempt (TORCHELASTIC_RESTART_COUNT 0) the rank FAULT_KILL_RANK SIGKILLs itself when it
reaches iteration FAULT_KILL_ITER (counted at the per-iteration all-reduce every rank makes)."""

import os
import signal
import sys

from retina_fast.engine import distributed as rdist

if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        and os.environ.get("RANK") == os.environ.get("FAULT_KILL_RANK")):
    _real, _n, _at = rdist.all_reduce_max, [0], int(os.environ.get("FAULT_KILL_ITER", "-1"))

    def _all_reduce_max(t):
        if _n[0] == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        _n[0] += 1
        return _real(t)

    rdist.all_reduce_max = _all_reduce_max

from retina_fast.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
