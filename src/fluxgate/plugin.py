"""The fluxgate pytest plugin: options, markers, one item per combo, the session's Gate, the summary.

It wires the modules together and holds no logic of its own: measuring is `runner`/`measure`, judging `gate`,
storing `history`/`baselines`, showing `report`.
"""

from __future__ import annotations

import os

# Nothing may reach the network unless the user opts in (HF_HUB_OFFLINE=0). Set before anything imports
# huggingface_hub, which reads it once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fluxgate import options, workers  # noqa: E402
from fluxgate.matrix import Combo, combos, parse_names, parse_shard, shard  # noqa: E402
from fluxgate.measuring import kernels, memory
from fluxgate.measuring.runtimes import RUNTIMES  # noqa: E402
from fluxgate.models import MODELS  # noqa: E402
from fluxgate.showing import report
from fluxgate.weights.precisions import PRECISIONS  # noqa: E402

COMBO_KEY = pytest.StashKey[Combo]()
OUTCOMES_KEY = pytest.StashKey[list]()
GATE_KEY = pytest.StashKey[object]()
WORKER_OUTPUTS_KEY = pytest.StashKey[list]()
ITEMS_KEY = pytest.StashKey[dict]()  # matrix items of this session: {"measured": int, "skipped": Counter of reasons}
STARTED_KEY = pytest.StashKey[float]()
MATRIX_ATTR = "_fluxgate_matrix_test"


def matrix_test(function):
    """Decorator: collect `function` once per selected combo, as items named like `flux2-dev[nvfp4]`."""
    setattr(function, MATRIX_ATTR, True)
    return function


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add(parser)


def _path(config: pytest.Config, option: str) -> Path:
    path = Path(config.getoption(option))
    return path if path.is_absolute() else config.rootpath / path


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
    memory.configure_allocator(config.getoption("cuda_alloc_conf"))
    kernels.configure_profiler_teardown()  # before the first combo's profile: see `kernels`
    config.addinivalue_line("markers", "gpu: a model x precision perf item (runs on the device in hand)")
    config.addinivalue_line("markers", "faults: GPU fault injection after the matrix (out of memory, teardown)")
    for name, spec in MODELS.items():
        config.addinivalue_line("markers", f"{spec.marker}: combos of model {name}")
    for name, spec in PRECISIONS.items():
        config.addinivalue_line("markers", f"{spec.marker}: combos at precision {name}")
    for name, spec in RUNTIMES.items():
        config.addinivalue_line("markers", f"{spec.marker}: combos run {name}")
    files = [("--prompts", "prompts")] + ([("--models-file", "models_file")]
                                          if config.getoption("profile") == "real" else [])
    for flag, option in files:  # a file named on the command line: missing is a usage error, not 16 failed items
        named = config.getoption(option) != options.INPUT_FILE_DEFAULTS[option]
        if named and not _path(config, option).is_file():
            raise pytest.UsageError(f"{flag} {_path(config, option)}: not found")
    try:
        models = parse_names("--models", config.getoption("models"), MODELS)
        precisions = parse_names("--precisions", config.getoption("precisions"), PRECISIONS)
        runtimes = parse_names("--runtimes", config.getoption("runtimes"), RUNTIMES)
        shard_of = parse_shard(config.getoption("shard"))
        config._fluxgate_min_speed_effect = options.fraction("--min-speed-effect", config.getoption("min_speed_effect"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    selected = combos(models, precisions, runtimes)
    config._fluxgate_combos = shard(selected, *shard_of) if shard_of else selected
    config.stash[OUTCOMES_KEY] = []
    config.stash[ITEMS_KEY] = {"measured": 0, "skipped": Counter()}
    config.pluginmanager.register(_ItemCounter(config), f"fluxgate-item-counter-{id(config)}")
    config.stash[STARTED_KEY] = time.time()


class _ItemCounter:
    """Counts this session's matrix items that measured and those skipped (in one process, and in the xdist
    controller, which receives every worker's reports), for the rule that a run which measured nothing cannot pass.
    One per config: a pytest run started inside this one (pytester) counts its own."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if "gpu" not in report.keywords or workers.worker(self.config) is not None:
            return
        items = self.config.stash[ITEMS_KEY]
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            items["skipped"][reason.removeprefix("Skipped: ")] += 1
        elif report.when == "call":
            items["measured"] += 1


def _empty_run(config: pytest.Config) -> str | None:
    """The one-line reason this run fails for having measured nothing, or None (something was measured, nothing was
    selected, or --allow-empty)."""
    items = config.stash.get(ITEMS_KEY, None)
    if not items or items["measured"] or not items["skipped"] or config.getoption("allow_empty"):
        return None
    total = sum(items["skipped"].values())
    common = items["skipped"].most_common()
    reasons = "; ".join(f"{count}x {' '.join(reason.split())[:160]}" for reason, count in common[:2])
    if len(common) > 2:
        reasons += f"; {len(common) - 2} other reasons, in the skip lines above (-rs)"
    return (f"no combo was measured: {total} of {total} selected skipped ({reasons}). A gate that measured nothing "
            "passes nothing; --allow-empty accepts such a run")


def pytest_pycollect_makeitem(collector, name, obj):
    if not (callable(obj) and getattr(obj, MATRIX_ATTR, False)):
        return None
    items = []
    me = workers.worker(collector.config)
    shares = me[1] if me else workers.controller_workers(collector.config)
    for position, combo in enumerate(collector.config._fluxgate_combos):
        item = pytest.Function.from_parent(collector, name=combo.id, callobj=obj)
        for mark in combo.marks:
            item.add_marker(mark)
        if shares:
            item.add_marker(workers.group_marker(position, shares))
        item.stash[COMBO_KEY] = combo
        items.append(item)
    return items


@pytest.fixture
def combo(request: pytest.FixtureRequest) -> Combo:
    """The model x precision combo of this item."""
    return request.node.stash[COMBO_KEY]


def _make_gate(config: pytest.Config):
    from fluxgate.judging.gate import Gate
    from fluxgate.measuring.environment import fingerprint, gpu_class, resolve_device
    from fluxgate.measuring.runner import Inputs, Runner
    from fluxgate.storing.history import RunHistory, new_run_id
    from fluxgate.weights.sources import for_profile

    device = resolve_device(config.getoption("device"))
    if device.type == "cpu" and workers.worker(config) is None:  # workers took their share already
        import torch

        torch.set_num_threads(options.cpu_threads(config.getoption("cpu_threads")))
    inputs = Inputs.from_file(_path(config, "prompts"))
    profile = config.getoption("profile")
    if profile == "auto":
        profile = "synthetic" if device.type == "cuda" else "tiny"
    source = for_profile(profile, _path(config, "fixture_cache"), inputs.seed, _path(config, "models_file"))
    runner = Runner(profile, device, source, inputs, warmup_steps=config.getoption("warmup_steps"),
                    steps=config.getoption("steps"), compile_mode=config.getoption("compile_mode"),
                    telemetry_interval_s=config.getoption("telemetry_interval_ms") / 1000)
    environment = fingerprint(device, config.rootpath)
    # A run whose speed nobody gated is kept out of later baseline windows (compare.unfit_for_window).
    environment["history_gate"] = config.getoption("history_gate")
    if device.type == "cuda":  # the roof MFU is judged against, measured once per run on this GPU
        from fluxgate.measuring.flops import measure_roof

        environment["roof"] = measure_roof(device)
    history_dir, me = _path(config, "history_dir"), workers.worker(config)
    if me is not None:
        environment["xdist_worker"] = f"{me[0] + 1}/{me[1]}"
        environment["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        if device.type == "cuda":
            import torch

            workers.check_pinned(str(torch.cuda.get_device_properties(device).uuid))
    history = RunHistory(history_dir, new_run_id(), environment,
                         file_dir=workers.worker_history_dir(history_dir) if me else None)
    return Gate(runner, _path(config, "baselines_dir"), config.getoption("gpu_class") or gpu_class(device), history,
                write=config.getoption("write_baselines"))


@pytest.fixture(scope="session")
def gate(request: pytest.FixtureRequest):
    """The run's Gate: built once, on the first combo (so collection stays fast)."""
    config = request.config
    if config.getoption("device").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"--device {config.getoption('device')}: no CUDA device (torch {torch.__version__} sees "
                        "none); run on a GPU runner or use --device cpu")
    from fluxgate.errors import FluxgateError

    try:
        config.stash[GATE_KEY] = _make_gate(config)
    except (FluxgateError, ValueError) as error:
        raise pytest.UsageError(str(error)) from None
    return config.stash[GATE_KEY]


@pytest.fixture
def judge(gate, request: pytest.FixtureRequest):
    """Evaluate this item's combo and fail it, without a traceback, on a missed limit or a broken input."""

    def evaluate(combo: Combo):
        outcome = gate.evaluate(combo)
        request.config.stash[OUTCOMES_KEY].append(outcome)
        if outcome.skipped:
            pytest.skip(outcome.skipped)
        if outcome.error:
            pytest.fail(f"{combo.id}: {outcome.error}", pytrace=False)
        if outcome.failures:
            pytest.fail(f"{combo.id}: " + "\n".join(outcome.failures), pytrace=False)
        return outcome

    return evaluate


def _write_report(config: pytest.Config, history_dir: Path, run_id: str, verdicts: dict | None) -> None:
    from fluxgate.errors import FluxgateError
    from fluxgate.showing import decision
    from fluxgate.showing.publish import write_report

    try:  # a reporting problem must never change the gate's result
        settings = decision.load(_path(config, "decision_file"), config.getoption("vram_budget_gib"),
                                 missing_ok=config.getoption("decision_file") == str(decision.DEFAULT_FILE))
        written = write_report(history_dir, _path(config, "report_dir"), _path(config, "baselines_dir"),
                               run_id=run_id, verdicts=verdicts, decision_settings=settings)
        config._fluxgate_report = written[0]
    except (FluxgateError, OSError) as error:
        warnings.warn(f"--report-dir: report not written ({error})", stacklevel=1)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    _finish(session)
    if workers.worker(config) is None:
        config._fluxgate_empty = _empty_run(config)
        if config._fluxgate_empty and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        history_dir = _path(config, "history_dir")
        if history_dir.is_dir():
            from fluxgate.storing import history

            try:
                history.prune_images(history_dir, config.getoption("history_images"))
            except OSError as error:
                warnings.warn(f"--history-images: old image folders not removed ({error})", stacklevel=1)


def _finish(session: pytest.Session) -> None:
    config = session.config
    if workers.controller_workers(config):
        _finish_distributed(session)
        return
    gate = config.stash.get(GATE_KEY, None)
    if gate is not None and gate.write and gate.measured:
        if session.exitstatus == pytest.ExitCode.INTERRUPTED:  # half a matrix is no baseline: keep the old one
            warnings.warn("--write-baselines: run interrupted, baselines left as they were", stacklevel=1)
        else:
            config._fluxgate_written = gate.write_baselines()
    if gate is None or not gate.history.records:
        return
    from fluxgate.judging.gate import verdicts_for_report

    gating = config.getoption("history_gate") == "on" and not gate.write
    verdicts = config._fluxgate_verdicts = gate.verdicts(
        last_n=config.getoption("history_window"), base_commit=config.getoption("base_commit"), confirm=gating,
        min_speed_effect=config._fluxgate_min_speed_effect)
    regression = any(verdict.outcome == "regression" for verdict in verdicts)
    if gating and regression:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if workers.worker(config) is not None:  # the controller merges, judges and reports
        config.workeroutput["fluxgate"] = {"history": str(gate.history.path), "regression": regression,
                                           "verdicts": [(v.outcome, v.message) for v in verdicts],
                                           "warnings": gate.history_warnings}
        return
    if config.getoption("report_dir"):
        _write_report(config, gate.history.directory, gate.history.run_id, verdicts_for_report(verdicts))


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
def pytest_testnodedown(node, error) -> None:
    """xdist controller: keep what each worker reported about its history file and verdicts."""
    output = getattr(node, "workeroutput", {}).get("fluxgate")
    if output:
        node.config.stash.setdefault(WORKER_OUTPUTS_KEY, []).append(output)


def _finish_distributed(session: pytest.Session) -> None:
    """Merge the workers' run files into one run (then remove them), fail on a confirmed regression, report."""
    from fluxgate.errors import FluxgateError
    from fluxgate.storing import history

    config = session.config
    outputs = config.stash.get(WORKER_OUTPUTS_KEY, [])
    if not outputs:
        return
    history_dir, paths = _path(config, "history_dir"), [Path(output["history"]) for output in outputs]
    shared = workers.shared_gpus([record for path in paths for record in history.read_file(path)])
    try:
        merged = history.merge(paths, history_dir, mark={"shared_gpu": True} if shared else None)
    except FluxgateError as error:  # the worker files stay where they are, nothing is lost
        warnings.warn(f"fluxgate: worker histories not merged ({error})", stacklevel=1)
        return
    for path in paths:  # only now: the merged file is complete on disk
        path.unlink(missing_ok=True)
    config._fluxgate_merged = merged
    config._fluxgate_worker_verdicts = [tuple(verdict) for output in outputs for verdict in output["verdicts"]]
    config._fluxgate_history_warnings = sorted({w for output in outputs for w in output.get("warnings", [])})
    config._fluxgate_shared_gpus = shared
    if config._fluxgate_shared_gpus:  # timings from a shared GPU measure nothing: the run cannot pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if config.getoption("history_gate") == "on" and any(output["regression"] for output in outputs):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if config.getoption("report_dir"):
        _write_report(config, history_dir, merged.stem, None)


def _history_rule(config: pytest.Config, write: bool) -> str:
    """What a confirmed regression against history does to this run, as the summary says it."""
    if write:
        return "advisory: --write-baselines"
    if config.getoption("history_gate") != "on":
        return "advisory: --history-gate off"
    return "a confirmed regression fails the run"


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    _summary(terminalreporter, config)
    gate = config.stash.get(GATE_KEY, None)
    for warning in getattr(config, "_fluxgate_history_warnings", None) or (gate.history_warnings if gate else []):
        terminalreporter.write_line(f"WARNING: {warning}", yellow=True)
    for problem in (getattr(config, "_fluxgate_empty", None), getattr(config, "_fluxgate_shared_gpus", None)):
        if problem:  # last, where the eye lands: why a run that may show no failed item failed
            terminalreporter.write_line(f"FAIL: {problem}", red=True, bold=True)


def _summary(terminalreporter, config: pytest.Config) -> None:
    merged = getattr(config, "_fluxgate_merged", None)
    if merged is not None:
        import json

        report.distributed_summary(terminalreporter, merged, json.loads(merged.read_text())["records"],
                                   config.stash[STARTED_KEY])
        for line in report.history_lines(config._fluxgate_worker_verdicts, _history_rule(config, write=False),
                                         scope="; each worker judged its own combos"):
            terminalreporter.write_line(line)
        if getattr(config, "_fluxgate_report", None):
            terminalreporter.write_line(f"fluxgate: report written to {config._fluxgate_report}")
    outcomes = config.stash.get(OUTCOMES_KEY, [])
    gate = config.stash.get(GATE_KEY, None)
    if outcomes and gate is not None:
        report.terminal_summary(terminalreporter, outcomes, gate, config.stash[STARTED_KEY])
        verdicts = getattr(config, "_fluxgate_verdicts", [])
        for line in report.history_lines([(v.outcome, v.message) for v in verdicts],
                                         _history_rule(config, write=gate.write)):
            terminalreporter.write_line(line)
        report_path = getattr(config, "_fluxgate_report", None)
        if report_path:
            terminalreporter.write_line(f"fluxgate: report written to {report_path}")
        written = getattr(config, "_fluxgate_written", None)
        if written:
            folder, below_tier = written
            terminalreporter.write_line(f"fluxgate: baselines written to {folder}")
            if below_tier:
                terminalreporter.write_line("similarity below the tier floor, so floored at measured - margin "
                                            f"(a regression gate, not a quality pass): {', '.join(below_tier)}")
