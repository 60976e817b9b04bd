"""A long run says where it is (`fluxgate.progress`): a line as each combo starts and as it ends, with its time, the
run's elapsed time and an estimate for the rest; library chatter stays out of a failing item's output
(`fluxgate.measuring.quiet`)."""

from __future__ import annotations

import logging
import re

import pytest

from fluxgate.measuring import quiet
from fluxgate.progress import clock

PLUGIN = """
from fluxgate.progress import ComboProgress

def pytest_configure(config):
    config.pluginmanager.register(ComboProgress(config, ["test_combo[a]", "test_combo[b]", "test_combo[c]"]))
"""
ITEMS = """
import pytest

@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_combo(name):
    assert name != "b"

def test_other():
    pass
"""


def test_each_combo_has_a_start_and_an_end_line_with_elapsed_time_and_what_is_left(pytester):
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile(test_items=ITEMS)
    lines = [line for line in pytester.runpytest().outlines if line.startswith("fluxgate: ")]
    assert [re.sub(r"\d+\.\d s|\d+:\d\d", "T", line) for line in lines] == [
        "fluxgate: [1/3] test_combo[a] started (elapsed T)",
        "fluxgate: [1/3] test_combo[a] passed in T (elapsed T; about T left for 2 more)",
        "fluxgate: [2/3] test_combo[b] started (elapsed T)",
        "fluxgate: [2/3] test_combo[b] failed in T (elapsed T; about T left for 1 more)",
        "fluxgate: [3/3] test_combo[c] started (elapsed T)",
        "fluxgate: [3/3] test_combo[c] passed in T (elapsed T)",
    ]


def test_the_lines_come_through_the_xdist_controller(pytester):
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile(test_items=ITEMS)
    lines = [line[line.index("fluxgate: "):] for line in pytester.runpytest("-n", "2").outlines if "fluxgate: " in line]
    events = sorted(re.sub(r"^fluxgate: \[\d/3\] (\S+) (\w+).*", r"\1 \2", line) for line in lines)
    assert events == ["test_combo[a] passed", "test_combo[a] started", "test_combo[b] failed", "test_combo[b] started",
                      "test_combo[c] passed", "test_combo[c] started"], lines


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (83.2, "1:23"), (4000, "1:06:40")])
def test_clock(seconds, text):
    assert clock(seconds) == text


def test_a_repeating_library_warning_is_kept_once():
    quiet.quiet_libraries()
    logger = logging.getLogger(quiet.REPEATING_LOGGERS[0])
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for _ in range(3):
            logger.warning("There are modules in AutoencoderKL that should be kept in float32: ['norm'] (test copy)")
            logger.warning("There are modules in ZImageTransformer2DModel that should be kept in float32: []. "
                           "Casting directly (test copy)")
        logger.warning("another message (test copy)")
    finally:
        logger.removeHandler(handler)
    # once each; the note that names no module not at all
    assert seen == ["There are modules in AutoencoderKL that should be kept in float32: ['norm'] (test copy)",
                    "another message (test copy)"]


def test_kineto_is_silenced_only_where_the_user_set_nothing(monkeypatch):
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    quiet.quiet_libraries()
    assert quiet.os.environ["KINETO_LOG_LEVEL"] == quiet.KINETO_SILENT
    monkeypatch.setenv("KINETO_LOG_LEVEL", "1")
    quiet.quiet_libraries()
    assert quiet.os.environ["KINETO_LOG_LEVEL"] == "1"
