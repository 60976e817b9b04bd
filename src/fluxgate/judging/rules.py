"""History rules: the named decision rules a run's combos are judged against history by, registered through the
`fluxgate.rules` entry-point group like models and precisions (`fluxgate.registry`). `--history-rule NAME` picks one.

A rule is a name, a line saying what it decides, and the `compare.Policy` it judges with for a given minimum speed
effect (pytest-benchmark's `RegressionCheck`: a rule is a small object, its decision recorded, not re-derived). A team
registers its own, e.g. a stricter one for a combo it ships:

    STRICT = HistoryRule("strict-1pct", "rank test, 1 % minimum effect on every device",
                         lambda min_speed_effect: Policy(min_speed_effect=0.01))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fluxgate.registry import RULES_GROUP, Registry

if TYPE_CHECKING:
    from fluxgate.judging.compare import Policy

DEFAULT_RULE = "rank-test"


@dataclass(frozen=True)
class HistoryRule:
    """A decision rule against history: `policy(min_speed_effect)` -> the `compare.Policy` to judge with, given the
    run's minimum speed effect (a fraction: `--min-speed-effect`, or the device type's default)."""

    name: str
    description: str
    policy: Callable[[float], Policy]


def _rank_test(min_speed_effect: float) -> Policy:
    from fluxgate.judging.compare import Policy

    return Policy(min_speed_effect=min_speed_effect)


RULES_BUILTIN = (
    HistoryRule(DEFAULT_RULE, "one-sided Mann-Whitney U on step times, a minimum effect, beyond every window run's "
                "median (fluxgate.judging.compare)", _rank_test),
)
RULES: Registry[HistoryRule] = Registry(RULES_GROUP, HistoryRule, "history rule")
