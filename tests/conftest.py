"""Shared fixtures: pytester for the plugin tests, and the tiny FLUX.1 pipeline several modules measure; a line per
test file as its last test ends (the suite takes minutes: dots alone do not say where it is)."""

import os
import time
from collections import Counter

import pytest
import torch

# pytester's in-process runs (`runpytest`) drop every module first imported during them, and numpy's, scipy's and
# torch's extension modules and operator libraries cannot be imported twice. The plugin imports the run's modules only
# when a matrix test is collected and the builders and formats when a combo runs (free when unused), so this process
# imports them up front, once.
import fluxgate.gate  # noqa: F401
import fluxgate.measuring.runner  # noqa: F401
import fluxgate.session  # noqa: F401
import fluxgate.showing.publish  # noqa: F401
from fluxgate.matrix import Combo
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights.tiny import TinySource

pytest_plugins = ["pytester"]

for _model in MODELS.values():
    _model.builder  # noqa: B018 - imported for the reason above
for _precision in PRECISIONS.values():
    _precision.implementation  # noqa: B018


class FileProgress:
    """`tests/test_ab.py: 9 passed, 1 failed in 0:41 (12/44 files, 3:05 elapsed)` as a file's last test ends, in the
    process that writes the terminal (one process, or the xdist controller); not under -q."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.left: Counter[str] = Counter()  # file -> tests not yet ended
        self.outcomes: dict[str, Counter[str]] = {}
        self.first_seen: dict[str, float] = {}
        self.started = time.monotonic()
        self.files_done = 0

    def _count(self, nodeids) -> None:
        if not self.left:
            self.left.update(nodeid.split("::")[0] for nodeid in nodeids)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._count(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:
        self._count(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path = report.nodeid.split("::")[0]
        if path not in self.left:
            return
        self.first_seen.setdefault(path, time.monotonic())
        outcomes = self.outcomes.setdefault(path, Counter())
        if report.when == "call" or not report.passed:
            outcomes["error" if report.when != "call" and report.failed else report.outcome] += 1
        if report.when != "teardown":
            return
        self.left[path] -= 1
        if self.left[path]:
            return
        from fluxgate.progress import clock

        self.files_done += 1
        now = time.monotonic()
        tally = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        reporter.ensure_newline()
        if reporter._tw.width_of_current_line:  # xdist's controller writes its dots without a current file
            reporter._tw.line()
        reporter.write_line(f"{path}: {tally} in {clock(now - self.first_seen[path])} "
                            f"({self.files_done}/{len(self.left)} files, {clock(now - self.started)} elapsed)")


# Files by how long they take, longest first: those holding external tests (a fresh venv, minutes), then those
# holding subprocess tests (seconds each), then those marked slow (tens of seconds in-process), then the rest: the
# many short files fill the end, where one worker would otherwise run a 40 s file alone (clean-clone CI, 2026-12-07).
HEAVIEST_FIRST = ("external", "subprocess", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold external, then subprocess-heavy, then slow tests first (keeping the order within each file
    and among the files of one rank), so that under xdist a long file does not start last and leave one worker
    running alone."""
    rank: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        marks = [n for n, name in enumerate(HEAVIEST_FIRST) if item.get_closest_marker(name)]
        rank[path] = min([rank.get(path, len(HEAVIEST_FIRST)), *marks])
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


def pytest_configure(config: pytest.Config) -> None:
    # The many `python -m pytest perf ...` runs the tests start import torch and diffusers each (~4 s of CPU);
    # hypothesis's pytest plugin adds ~1 s more to each and none of them uses it. Set here, where the tests run (a
    # worker, or a run without xdist), not in an xdist controller: its workers, started after this, need the plugin.
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        os.environ["PYTEST_ADDOPTS"] = " ".join(
            filter(None, [os.environ.get("PYTEST_ADDOPTS"), "-p no:hypothesispytest"]))
    # xdist hands out whole files (--dist loadfile) in the order above only without its own reordering, which puts
    # the files with the most tests first (by count, not by time: the two venv-building files would start last).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    if not hasattr(config, "workerinput") and config.getoption("verbose") >= 0:
        config.pluginmanager.register(FileProgress(config), "fluxgate-tests-file-progress")


@pytest.fixture(scope="session")
def tiny_flux1(tmp_path_factory):
    """`precision -> FluxPipeline` at toy size on CPU, built exactly as the tiny profile builds it."""
    source, device = TinySource(tmp_path_factory.mktemp("cache"), seed=0), torch.device("cpu")
    model = Combo("flux1-dev", "bf16").model_spec
    components = source.components(model, device)

    def build(precision: str):
        transformer, _ = source.transformer(Combo("flux1-dev", precision), device)
        pipe = model.builder.pipeline_class(transformer=transformer, **components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


@pytest.fixture
def tiny_call_kwargs() -> dict:
    return {"prompt": "a red fox", "height": 256, "width": 256, "num_inference_steps": 8, "guidance_scale": 3.5,
            "max_sequence_length": 32, "output_type": "pil"}
