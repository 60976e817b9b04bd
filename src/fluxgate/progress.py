"""Where a long run is: one line as each combo starts and one as it ends (its time, the run's elapsed time and an
estimate for the combos left), written through pytest's terminal reporter, so that an xdist controller writes them
for its workers' combos too. Left out under `-q`.

    fluxgate: [3/16] flux1-dev[nvfp4] started (elapsed 0:41)
    fluxgate: [3/16] flux1-dev[nvfp4] passed in 12.4 s (elapsed 0:53; about 2:39 left for 13 more)
"""

from __future__ import annotations

import time
from typing import Iterable

import pytest


def clock(seconds: float) -> str:
    """`83.2` -> `1:23`, `4000` -> `1:06:40`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ComboProgress:
    """A pytest plugin (one process, or the xdist controller): the start and end line of each combo item, an item
    whose id ends in one of `combo_ids`. The estimate is the wall time per finished combo so far (under xdist, with
    the workers' combos overlapping) times the combos left."""

    def __init__(self, config: pytest.Config, combo_ids: Iterable[str]):
        self.config = config
        self.combo_ids = frozenset(combo_ids)
        self.total: int | None = None  # combo items selected, once collected
        self.first_start: float | None = None
        self.started: dict[str, tuple[int, float]] = {}  # nodeid -> (its number, start time)
        self.outcomes: dict[str, str] = {}  # nodeid -> outcome of its setup or call phase
        self.finished = 0

    def _is_combo(self, nodeid: str) -> bool:
        return nodeid.rsplit("::", 1)[-1] in self.combo_ids

    def _count(self, nodeids: Iterable[str]) -> None:
        if self.total is None:
            self.total = sum(map(self._is_combo, nodeids))

    def _write(self, text: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        reporter.ensure_newline()
        writer = getattr(reporter, "_tw", None)  # xdist's controller writes its dots without a current file
        if writer is not None and writer.width_of_current_line:
            writer.line()
        reporter.write_line(f"fluxgate: {text}")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._count(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._count(ids)

    @pytest.hookimpl(tryfirst=True)  # before the terminal reporter writes the item's name (-v)
    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        if not self._is_combo(nodeid) or nodeid in self.started:
            return
        now = time.monotonic()
        self.first_start = self.first_start or now
        self.started[nodeid] = (len(self.started) + 1, now)
        self._write(f"[{self._of(self.started[nodeid][0])}] {self._name(nodeid)} started "
                    f"(elapsed {clock(now - self.first_start)})")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.started:
            return
        if report.when in ("setup", "call") and (report.when == "call" or not report.passed):
            self.outcomes[report.nodeid] = report.outcome
        if report.when != "teardown":
            return
        number, start = self.started[report.nodeid]
        now = time.monotonic()
        self.finished += 1
        elapsed = now - self.first_start
        left = "" if self.total is None else self._left(elapsed, self.total - self.finished)
        outcome = "failed" if report.failed else self.outcomes.get(report.nodeid, report.outcome)
        self._write(f"[{self._of(number)}] {self._name(report.nodeid)} {outcome} in {now - start:.1f} s "
                    f"(elapsed {clock(elapsed)}{left})")

    def _left(self, elapsed: float, remaining: int) -> str:
        if remaining <= 0:
            return ""
        return f"; about {clock(elapsed / self.finished * remaining)} left for {remaining} more"

    def _of(self, number: int) -> str:
        return f"{number}/{self.total}" if self.total is not None else str(number)

    @staticmethod
    def _name(nodeid: str) -> str:
        return nodeid.rsplit("::", 1)[-1]
