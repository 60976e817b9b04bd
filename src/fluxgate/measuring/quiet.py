"""Library chatter that explains no failure, kept out of a failing item's captured output: each of diffusers'
"modules ... should be kept in float32" and transformers' "requires torchvision" lines once per process (they
repeat for every component of every combo), and in one copy: diffusers' and transformers' own stderr handlers are
removed, so their records reach pytest's captured log only (Python's last-resort stderr handler outside pytest);
no progress bars; no Kineto log lines (`USDT ... profiler_start/stop`, `STAGE ...`) around each
kernel-path profile.
"""

from __future__ import annotations

import logging
import os

# The loggers that repeat one line per component built: diffusers' float32 casting note, transformers' torchvision
# fallback note.
REPEATING_LOGGERS = ("diffusers.models.modeling_utils", "transformers.utils.import_utils")
# Kineto logs at VERBOSE 0 .. ERROR 4, USDT 5; 6 is above all of them (its USDT probes log above ERROR, so no level
# keeps errors without them). A user's KINETO_LOG_LEVEL wins.
KINETO_SILENT = "6"


# diffusers' casting note naming no module at all ("... should be kept in float32: []. Casting directly ..."): it
# says nothing, in every process that builds a Z-Image transformer (each side of an A/B run).
EMPTY_NOTE = "should be kept in float32: []"


class OncePerProcess(logging.Filter):
    """Passes each distinct message of a logger once, and none that names an empty list of modules (`EMPTY_NOTE`);
    later copies are dropped before any handler sees them."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen or EMPTY_NOTE in message:
            return False
        self.seen.add(message)
        return True


def quiet_libraries() -> None:
    """Apply the above (idempotent). Call before the first pipeline is built or profiled."""
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_SILENT)  # read when the first profile starts
    for name in REPEATING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerProcess) for f in logger.filters):
            logger.addFilter(OncePerProcess())
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.disable_progress_bar()  # from_pretrained's "Loading pipeline components" (real profile)
