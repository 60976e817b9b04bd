"""Errors a user acts on. Each message is one line that names the file or option and what is wrong."""


class FluxgateError(Exception):
    """Base class: an expected failure whose message is shown without a traceback."""


class FixtureError(FluxgateError):
    """A checkpoint or fixture file that cannot be made or loaded."""


class BaselineError(FluxgateError):
    """A missing, unreadable or stale baseline (reference image or thresholds)."""


class SkipCombo(FluxgateError):
    """This combo cannot run here (no CUDA for a GPU-only profile, a real checkpoint not downloaded); not a failure."""


class HistoryError(FluxgateError):
    """A history file that cannot be written or read."""


class RegistryError(FluxgateError):
    """A model, precision, rule or hook registration (an entry point) that cannot be read."""
