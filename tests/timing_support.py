"""The timing tests' measured subprocesses (`-m timing`: A/A and A/B verdicts, the history gate) run at the highest
CPU priority this user may set, so that other work on the machine does not decide their verdicts.

Beside one busy loop per core on a 2-core machine, the tiny matrix's main thread waited for a CPU 27-66 % of each
step at the default priority (host contention, which keeps its runs out of history windows and makes A/A verdicts
UNKNOWN) and 0 % at nice -20, with the same thresholds. Where the priority cannot be raised (no root, no
CAP_SYS_NICE) the run keeps the default, and fluxgate's own contention notes say what the host did.
"""

from __future__ import annotations

import os

MEASURED_NICENESS = -20


def prioritized() -> None:
    """`preexec_fn` for a measured subprocess: nice -20 where permitted, else unchanged."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, MEASURED_NICENESS)
    except PermissionError:
        pass
