"""The fluxgate pytest plugin: options, markers, one item per combo, and hooks that hand each event to the run's
`session.RunSession`. Installed packages expose it through the `pytest11` entry point; nothing here decides anything.
"""

from __future__ import annotations

import os

# Nothing may reach the network unless the user opts in (HF_HUB_OFFLINE=0). Set before anything imports
# huggingface_hub, which reads it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from fluxgate import options, workers  # noqa: E402
from fluxgate.matrix import (
    RUNTIMES,  # noqa: E402
    Combo,  # noqa: E402
)
from fluxgate.models import MODELS  # noqa: E402
from fluxgate.precisions import PRECISIONS  # noqa: E402
from fluxgate.session import RunSession  # noqa: E402

SESSION_KEY = pytest.StashKey[RunSession]()
COMBO_KEY = pytest.StashKey[Combo]()
MATRIX_ATTR = "_fluxgate_matrix_test"


def matrix_test(function):
    """Decorator: collect `function` once per selected combo, as items named like `flux2-dev[nvfp4]`."""
    setattr(function, MATRIX_ATTR, True)
    return function


def run_session(config: pytest.Config) -> RunSession:
    """This pytest session's fluxgate run."""
    return config.stash[SESSION_KEY]


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add(parser)


def pytest_configure(config: pytest.Config) -> None:
    workers.pin_this_worker(config)  # first: before anything initializes CUDA in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # again: the module-level default ran once per process
    if workers.controller_workers(config):
        if config.getoption("write_baselines"):
            raise pytest.UsageError("--write-baselines with xdist (-n): workers would rewrite the same thresholds "
                                    "file at once; write baselines in one process")
        if config.option.dist == "load":
            config.option.dist = "loadgroup"  # each worker takes whole shares of the matrix (see `workers`)
        workers.pin_worker_processes(config)  # CUDA_VISIBLE_DEVICES set as each worker process starts
    os.environ.setdefault("DIFFUSERS_GGUF_CUDA_KERNELS", "false")
    from fluxgate.measuring import kernels, memory

    memory.configure_allocator(config.getoption("cuda_alloc_conf"))
    kernels.configure_profiler_teardown()  # before the first combo's profile: see `kernels`
    config.addinivalue_line("markers", "gpu: a model x precision perf item (runs on the device in hand)")
    config.addinivalue_line("markers", "faults: GPU fault injection after the matrix (out of memory, teardown)")
    for kind, specs in (("model", MODELS), ("precision", PRECISIONS)):
        for name, spec in specs.items():
            config.addinivalue_line("markers", f"{spec.marker}: combos of {kind} {name}")
    for name, spec in RUNTIMES.items():
        config.addinivalue_line("markers", f"{spec.marker}: combos run {name}")
    config.stash[SESSION_KEY] = RunSession(config)
    config.pluginmanager.register(_ReportCounter(config.stash[SESSION_KEY]), f"fluxgate-counter-{id(config)}")


class _ReportCounter:
    """Hands each test report to the run (one per config: a pytest run started inside this one counts its own)."""

    def __init__(self, session: RunSession):
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.session.count(report)


def pytest_pycollect_makeitem(collector, name, obj):
    if not (callable(obj) and getattr(obj, MATRIX_ATTR, False)):
        return None
    items = []
    me = workers.worker(collector.config)
    shares = me[1] if me else workers.controller_workers(collector.config)
    for position, combo in enumerate(run_session(collector.config).settings.combos):
        item = pytest.Function.from_parent(collector, name=combo.id, callobj=obj)
        for mark in combo.marks:
            item.add_marker(mark)
        if shares:
            item.add_marker(workers.group_marker(position, shares))
        item.stash[COMBO_KEY] = combo
        items.append(item)
    return items


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before any combo runs: every place the run writes is probed (`RunSession.probe_outputs`)."""
    run_session(session.config).probe_outputs([item.nodeid for item in session.items])


@pytest.fixture
def combo(request: pytest.FixtureRequest) -> Combo:
    """The model x precision combo of this item."""
    return request.node.stash[COMBO_KEY]


@pytest.fixture(scope="session")
def gate(request: pytest.FixtureRequest):
    """The run's Gate: built once, on the first combo (so collection stays fast)."""
    device = request.config.getoption("device")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"--device {device}: no CUDA device (torch {torch.__version__} sees none); run on a GPU runner "
                        "or use --device cpu")
    return run_session(request.config).open_gate()


@pytest.fixture
def judge(gate):
    """Evaluate this item's combo and fail it, without a traceback, on a missed limit or a broken input."""

    def evaluate(combo: Combo):
        outcome = gate.evaluate(combo)
        if outcome.skipped:
            pytest.skip(outcome.skipped)
        if outcome.error:
            pytest.fail(f"{combo.id}: {outcome.error}", pytrace=False)
        if outcome.failures:
            pytest.fail(f"{combo.id}: " + "\n".join(outcome.failures), pytrace=False)
        return outcome

    return evaluate


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = run_session(session.config)
    session.exitstatus = run.finish(session.exitstatus)
    if run.worker is not None and run.worker_output() is not None:  # the controller merges, judges and reports
        session.config.workeroutput["fluxgate"] = run.worker_output()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    run_session(config).summary(terminalreporter)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """pytest-benchmark's saved runs carry fluxgate's fingerprint too (GPU name, UUID, driver, clocks, power limit,
    versions), so a benchmark written with the `benchmark` fixture beside the matrix is comparable the same way."""
    from fluxgate.measuring.environment import fingerprint, resolve_device

    try:
        machine_info["fluxgate"] = fingerprint(resolve_device(config.getoption("device")), config.rootpath)
    except ValueError as error:  # --device cuda without CUDA: say so instead of a fingerprint
        machine_info["fluxgate"] = {"error": str(error)}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller, before a worker starts collecting: see `workers.configure_node`."""
    workers.configure_node(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """xdist controller, before it hands out items: the places the run writes are probed (once)."""
    run_session(node.config).probe_outputs(ids)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: keep what each worker reported about its history file and verdicts."""
    output = getattr(node, "workeroutput", {}).get("fluxgate")
    if output:
        run_session(node.config).worker_outputs.append(output)
