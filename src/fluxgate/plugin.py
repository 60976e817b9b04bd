"""The fluxgate pytest plugin: options, markers, one item per combo, and hooks that hand each event to the run's
`session.RunSession`. Installed packages expose it through the `pytest11` entry point; nothing here decides anything.

It costs nothing until used: loading it imports no torch, diffusers, gguf, numpy or matplotlib and changes no
environment variable. The run (`RunSession`: settings, history store, gate) is made when the first matrix test is
collected (or an xdist worker reports one), and the environment is prepared when its first combo runs.
"""

from __future__ import annotations

import pytest

from fluxgate import hooks, options, workers
from fluxgate.errors import RegistryError
from fluxgate.matrix import Combo

SESSION_KEY = pytest.StashKey["RunSession"]()
PENDING_ERROR_KEY = pytest.StashKey[pytest.UsageError]()
COMBO_KEY = pytest.StashKey[Combo]()
MATRIX_ATTR = "_fluxgate_matrix_test"
ITEM_MARKER = "fluxgate"  # on every matrix item: its reports (also an xdist worker's, on the controller) are counted


def matrix_test(function):
    """Decorator: collect `function` once per selected combo, as items named like `flux2-dev[nvfp4]` with the
    combo's marks. The function may ask for the fixtures `combo` (this item's `Combo`) and `judge` (call
    `judge(combo)` to measure and judge it). A test module of a team's repository is just:

        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo, judge):
            judge(combo)
    """
    setattr(function, MATRIX_ATTR, True)
    return function


def run_session(config: pytest.Config):
    """This pytest session's fluxgate run (`session.RunSession`), made on first use. Raises pytest.UsageError for a bad
    option value, input file or registry entry."""
    if SESSION_KEY not in config.stash:
        from fluxgate.session import RunSession

        config.stash[SESSION_KEY] = RunSession(config)
    return config.stash[SESSION_KEY]


def _started(config: pytest.Config):
    """The run, if this session made one (None: no fluxgate item was collected)."""
    return config.stash.get(SESSION_KEY, None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    try:
        hooks.register(pluginmanager)
    except RegistryError as error:  # a broken `fluxgate.hooks` entry point: one line and exit 4, not a traceback
        raise pytest.UsageError(str(error)) from None


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add(parser)


def pytest_configure(config: pytest.Config) -> None:
    workers.pin_this_worker(config)  # first: before anything initializes CUDA in this process
    if workers.controller_workers(config):
        if config.getoption("write_baselines"):
            raise pytest.UsageError("--write-baselines with xdist (-n): workers would rewrite the same thresholds "
                                    "file at once; write baselines in one process")
        if config.option.dist == "load":
            config.option.dist = "loadgroup"  # each worker takes whole shares of the matrix (see `workers`)
        workers.pin_worker_processes(config)  # CUDA_VISIBLE_DEVICES set as each worker process starts
    config.addinivalue_line("markers", f"{ITEM_MARKER}: every fluxgate matrix item")
    config.addinivalue_line("markers", "gpu: a model x precision perf item (runs on the device in hand)")
    config.addinivalue_line("markers", "faults: GPU fault injection after the matrix (out of memory, teardown)")
    try:  # light: the registries' specs, not their implementations; a team's own tests may use these marks too
        _register_markers(config)
    except RegistryError:
        pass  # a broken entry point: said in one line when the run needs the registries (`run_session`)
    config.pluginmanager.register(_ReportCounter(config), f"fluxgate-counter-{id(config)}")


def _register_markers(config: pytest.Config) -> None:
    """One marker per registered model, precision, backend and runtime (`-m "flux2_dev and nvfp4"`, `-m comfy`), from
    the registries' light specs."""
    from fluxgate.matrix import RUNTIMES
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS, backend_names
    from fluxgate.registry import marker_name

    for kind, specs in (("model", MODELS), ("precision", PRECISIONS), ("runtime", RUNTIMES)):
        for name, spec in specs.items():
            config.addinivalue_line("markers", f"{spec.marker}: combos of {kind} {name}")
    for name, what in backend_names().items():
        config.addinivalue_line("markers", f"{marker_name(name)}: combos run by backend {name}: {what}")


class _ReportCounter:
    """Hands each matrix item's test report to the run (one per config: a pytest run started inside this one counts
    its own); other tests' reports are left alone and start no run."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if ITEM_MARKER in report.keywords:
            run_session(self.config).count(report)


def pytest_pycollect_makeitem(collector, name, obj):
    if not (callable(obj) and getattr(obj, MATRIX_ATTR, False)):
        return None
    config = collector.config
    try:
        run = run_session(config)
    except pytest.UsageError as error:  # raised again after collection: a usage error (exit 4), not a module error
        config.stash[PENDING_ERROR_KEY] = error
        return []
    items = []
    me = workers.worker(config)
    shares = me[1] if me else workers.controller_workers(config)
    for position, combo in enumerate(run.settings.combos):
        item = pytest.Function.from_parent(collector, name=combo.id, callobj=obj)
        for mark in (ITEM_MARKER, *combo.marks):
            item.add_marker(mark)
        if shares:
            item.add_marker(workers.group_marker(position, shares))
        item.stash[COMBO_KEY] = combo
        items.append(item)
    return items


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before any combo runs: every place the run writes is probed (`RunSession.probe_outputs`)."""
    run = _started(session.config)
    if run is not None:  # matrix items were collected
        run.probe_outputs([item.nodeid for item in session.items])


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
    try:
        return run_session(request.config).open_gate()
    except pytest.UsageError as error:  # before any combo ran: stop the session, one line, exit 4
        pytest.exit(f"fluxgate: {error}", returncode=pytest.ExitCode.USAGE_ERROR)


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


def pytest_collection_modifyitems(config: pytest.Config) -> None:
    error = config.stash.get(PENDING_ERROR_KEY, None)
    if error is not None:
        raise error


def pytest_sessionfinish(session: pytest.Session) -> None:
    run = _started(session.config)
    if run is None:
        return
    session.exitstatus = run.finish(session.exitstatus)
    if run.worker is not None and run.worker_output() is not None:  # the controller merges, judges and reports
        session.config.workeroutput["fluxgate"] = run.worker_output()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    run = _started(config)
    if run is not None:
        run.summary(terminalreporter)


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
    """xdist controller, before it hands out items: the places the run writes are probed (once), if the workers
    collected matrix items (ids named like a registered model's combos)."""
    from fluxgate.models import MODELS

    if any(Combo.parse(item_id.rsplit("::", 1)[-1]).model in MODELS for item_id in ids):
        run_session(node.config).probe_outputs(ids)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: keep what each worker reported about its history file and verdicts."""
    output = getattr(node, "workeroutput", {}).get("fluxgate")
    if output:  # a worker ran fluxgate items: the controller's run merges and reports them
        run_session(node.config).worker_outputs.append(output)
