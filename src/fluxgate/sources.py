"""Kept for scripts written against fluxgate 0.1's flat modules (e.g. the real-layout cases, which call
`fluxgate.sources.RealSource`): each profile's source now lives in `fluxgate.weights`."""

from fluxgate.weights.real import RealSource  # noqa: F401
from fluxgate.weights.sources import Source, for_profile  # noqa: F401
