"""One fluxgate run inside a pytest session: the options read once, the gate, the history, the summary and the report.

`plugin.py` declares options and hooks and hands every event to the `RunSession` of its config (its options read
once: `settings.Settings`) (the way
pytest-benchmark's `BenchmarkSession` serves its plugin). The same class serves a single process, an xdist worker
(measures its share, writes its own run file, reports to the controller) and the xdist controller (measures nothing,
merges the workers' files into one run, judges and reports).
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from fluxgate import environ, hooks, options, workers
from fluxgate.judging.compare import REGRESSION
from fluxgate.settings import Settings
from fluxgate.showing import report
from fluxgate.storing import open_store


class RunSession:
    """Owns one run: builds the gate on the first combo, counts what was measured, finishes (baselines, verdicts
    against history, the xdist merge, the report, image pruning) and writes the terminal summary."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.settings = Settings.from_config(config)
        self.store = open_store(self.settings.history_dir)
        self.rootpath = config.rootpath
        self.worker = workers.worker(config)  # (index, count) in an xdist worker
        self.controller = workers.controller_workers(config) > 0
        self.started = time.time()
        self.gate = None  # fluxgate.gate.Gate, built by `open_gate`
        self.measured_items = 0
        self.skipped_items: Counter[str] = Counter()
        self.verdicts: list[tuple[str, str]] = []  # (outcome, message) against history, every combo of the run
        self.regression = False
        self.history_warnings: list[str] = []
        self.worker_outputs: list[dict] = []  # controller: what each worker reported
        self.run_id: str | None = None  # the run the summary shows (merged, on the controller)
        self.report_path: Path | None = None
        self.written: tuple[Path, list[str]] | None = None  # baselines folder, combos floored below their tier
        self.problems: list[str] = []  # why the run fails although no item may show a failure
        self.tradeoff_lines: list[str] = []  # the run's cross-precision trade-offs, for the summary
        self.collect_only = config.getoption("collectonly")
        self.probed = False
        self.refused = False  # an output location could not be written: the run stopped before any combo
        if self.worker is None and config.getoption("verbose") >= 0:  # a line per combo's start and end, unless -q
            from fluxgate.progress import ComboProgress

            progress = ComboProgress(config, (combo.id for combo in self.settings.combos))
            config.pluginmanager.register(progress, f"fluxgate-progress-{id(config)}")

    def probe_outputs(self, item_ids: list[str]) -> None:
        """Before the first combo of a run that has combos to measure (one process, or the xdist controller for its
        workers): raise pytest.UsageError, one line, when a place it writes cannot be written (`probing`)."""
        combo_ids = {combo.id for combo in self.settings.combos}
        if self.probed or self.worker is not None or self.collect_only or not any(
                item_id.rsplit("::", 1)[-1] in combo_ids for item_id in item_ids):
            return
        from fluxgate import probing

        self.probed = True
        try:
            probing.check_writable(probing.run_outputs(self.settings))
        except probing.UnwritableError as error:
            self.refused = True
            raise pytest.UsageError(str(error)) from None

    # --- measuring -----------------------------------------------------------------------------------------------
    def open_gate(self):
        """The run's Gate, built once (device, source, runner, environment fingerprint, history file). Raises
        pytest.UsageError for a bad input (prompts file, models file, device)."""
        if self.gate is None:
            from fluxgate.errors import FluxgateError

            try:
                self.gate = self._make_gate()
            except (FluxgateError, ValueError) as error:
                raise pytest.UsageError(str(error)) from None
        return self.gate

    def _make_gate(self):
        # The first combo is about to run: now, not when pytest started, set what the run needs in the environment
        # (each only where the user has not), before anything imports diffusers or starts CUDA.
        environ.apply_defaults()
        from fluxgate.measuring import kernels, memory

        memory.configure_allocator(self.config.getoption("cuda_alloc_conf"))
        kernels.configure_profiler_teardown()  # before the first combo's profile: see `kernels`
        from fluxgate.gate import Gate
        from fluxgate.measuring.environment import fingerprint, gpu_class, resolve_device
        from fluxgate.measuring.runner import Inputs, Runner
        from fluxgate.storing.store import new_run_id
        from fluxgate.weights.sources import for_profile

        s = self.settings
        device = resolve_device(s.device)
        self._require_baselines(s.gpu_class or gpu_class(device))
        if device.type == "cpu" and self.worker is None:  # workers took their share already
            import torch

            torch.set_num_threads(options.cpu_threads(s.cpu_threads))
        inputs = Inputs.from_file(s.prompts)
        profile = s.profile if s.profile != "auto" else ("synthetic" if device.type == "cuda" else "tiny")
        source = for_profile(profile, s.fixture_cache, inputs.seed, s.models_file)
        hook = self.config.hook
        runner = Runner(profile, device, source, inputs, warmup_steps=s.warmup_steps, steps=s.steps,
                        model_steps=s.model_steps, cases=s.cases,
                        compile_mode=s.compile_mode, telemetry_interval_s=s.telemetry_interval_s,
                        prepare_pipeline=lambda pipe, combo: hook.pytest_fluxgate_prepare_pipeline(pipe=pipe, combo=combo,
                                                                                             device=device))
        environment = hooks.extended_environment(hook, fingerprint(device, self.rootpath), device)
        # A run whose speed nobody gated is kept out of later windows (compare.unfit_for_window).
        environment["history_gate"] = "on" if s.history_gate else "off"
        if device.type == "cuda":  # the roof MFU is judged against, measured once per run on this GPU
            from fluxgate.measuring.flops import measure_roof

            environment["roof"] = measure_roof(device)
        if self.worker is not None:
            environment["xdist_worker"] = f"{self.worker[0] + 1}/{self.worker[1]}"
            environment["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
            if device.type == "cuda":
                import torch

                workers.check_pinned(str(torch.cuda.get_device_properties(device).uuid))
        history = self.store.open_run(new_run_id(), environment, shard=self.worker is not None)
        return Gate(runner, s.baselines_dir, s.gpu_class or gpu_class(device), history, write=s.write_baselines)

    def _require_baselines(self, gpu_class: str) -> None:
        """A run that asserts against baselines needs its GPU class's thresholds file: without one, a usage error
        naming the folder and the command that writes it (not one failure per combo)."""
        from fluxgate.judging.baselines import THRESHOLDS_FILE, WRITE_HINT

        path = self.settings.baselines_dir / gpu_class / THRESHOLDS_FILE
        if not self.settings.write_baselines and not path.is_file():
            raise pytest.UsageError(f"{path}: no baselines for GPU class {gpu_class!r} (--baselines-dir "
                                    f"{self.settings.baselines_dir}); {WRITE_HINT}")

    def count(self, report_: pytest.TestReport) -> None:
        """Count a matrix item's report (one process, or the controller, which sees every worker's reports)."""
        if "gpu" not in report_.keywords or self.worker is not None:
            return
        if report_.skipped:
            reason = report_.longrepr[2] if isinstance(report_.longrepr, tuple) else str(report_.longrepr)
            self.skipped_items[reason.removeprefix("Skipped: ")] += 1
        elif report_.when == "call":
            self.measured_items += 1

    # --- finishing -----------------------------------------------------------------------------------------------
    def finish(self, exitstatus: int) -> int:
        """Everything after the last combo; returns the session's exit status (a confirmed regression, a shared GPU
        or an empty run turn an OK run into a failed one)."""
        if self.refused:
            return exitstatus
        if self.controller:
            self._finish_controller()
        else:
            self._finish_measuring(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
        if self.worker is None:
            empty = self._empty_run()
            if empty:
                self.problems.append(empty)
            self._check_tradeoffs()
            self._prune_images()
        if self.problems or (self.settings.history_gate and self.regression):
            return pytest.ExitCode.TESTS_FAILED if exitstatus == pytest.ExitCode.OK else exitstatus
        return exitstatus

    def _finish_measuring(self, interrupted: bool) -> None:
        gate = self.gate
        if gate is not None and gate.write and gate.measured:
            if interrupted:  # half a matrix is no baseline: keep the old one
                warnings.warn("--write-baselines: run interrupted, baselines left as they were", stacklevel=1)
            else:
                self.written = gate.write_baselines()
        if gate is None or not gate.history.records:
            return
        gating = self.settings.history_gate and not gate.write
        judged = gate.verdicts(last_n=self.settings.history_window, base_commit=self.settings.base_commit,
                               confirm=gating, min_speed_effect=self.settings.min_speed_effect,
                               rule=self.settings.history_rule)
        self.verdicts = [(verdict.outcome, verdict.message) for verdict in judged]
        self.regression = gating and any(verdict.outcome == REGRESSION for verdict in judged)
        self.history_warnings = gate.history_warnings
        self.run_id = gate.history.run_id
        if self.worker is None and self.settings.report_dir:
            self._write_report(gate.history.run_id)

    def worker_output(self) -> dict | None:
        """What an xdist worker hands the controller (pytest's `workeroutput`)."""
        if self.run_id is None:
            return None
        return {"run_id": self.run_id, "regression": self.regression, "verdicts": self.verdicts,
                "warnings": self.history_warnings}

    def _finish_controller(self) -> None:
        """Merge the workers' run files into one run (then remove them), fail on a confirmed regression, report."""
        from fluxgate.errors import FluxgateError

        if not self.worker_outputs:
            return
        run_ids = [output["run_id"] for output in self.worker_outputs]
        try:
            shared = workers.shared_gpus([record for run_id in run_ids for record in self.store.load_run(run_id)])
            # the workers' runs are set aside only once the merged run is whole in the store: nothing is lost
            self.run_id = self.store.merge(run_ids, mark={"shared_gpu": True} if shared else None)
        except FluxgateError as error:
            warnings.warn(f"fluxgate: worker histories not merged ({error})", stacklevel=1)
            return
        self.verdicts = [tuple(verdict) for output in self.worker_outputs for verdict in output["verdicts"]]
        self.history_warnings = sorted({w for output in self.worker_outputs for w in output.get("warnings", [])})
        self.regression = any(output["regression"] for output in self.worker_outputs)
        if shared:  # timings from a shared GPU measure nothing: the run cannot pass
            self.problems.append(shared)
        if self.settings.report_dir:
            self._write_report(self.run_id)

    def _write_report(self, run_id: str) -> None:
        from fluxgate.errors import FluxgateError
        from fluxgate.showing import decision
        from fluxgate.showing.publish import write_report

        s = self.settings
        try:  # a reporting problem must never change the gate's result
            decision_settings = decision.load(s.decision_file, s.vram_budget_gib, missing_ok=not s.decision_file_given)
            written = write_report(self.store, s.report_dir, s.baselines_dir, run_id=run_id,
                                   decision_settings=decision_settings)
            self.report_path = written[0]
        except (FluxgateError, OSError) as error:
            warnings.warn(f"--report-dir: report not written ({error})", stacklevel=1)

    def _check_tradeoffs(self) -> None:
        """The run's cross-precision trade-offs (`judging.tradeoffs`: each quantized combo's peak VRAM and speed against
        bf16 of the same run, its quality against its tier) checked against its class's thresholds file; a failed
        one fails the run. Not when writing baselines, nor without a run or a thresholds file with trade-offs."""
        if self.run_id is None or self.settings.write_baselines:
            return
        from fluxgate.judging import tradeoff_checks

        lines, failed, problem = tradeoff_checks.check_stored(self.store, self.run_id, self.settings.baselines_dir)
        if problem:
            warnings.warn(problem, stacklevel=1)  # never an internal error at the end
            return
        self.tradeoff_lines = lines[:1] + [f"  {line}" for line in lines[1:]]
        if failed:
            self.problems.append(f"{failed} cross-precision trade-off(s) missed (listed under trade-offs above)")

    def _empty_run(self) -> str | None:
        """The one-line reason this run fails for having measured nothing, or None (something was measured, nothing
        was selected, or --allow-empty)."""
        if self.measured_items or not self.skipped_items or self.settings.allow_empty:
            return None
        total = sum(self.skipped_items.values())
        common = self.skipped_items.most_common()
        reasons = "; ".join(f"{count}x {' '.join(reason.split())[:160]}" for reason, count in common[:2])
        if len(common) > 2:
            reasons += f"; {len(common) - 2} other reasons, in the skip lines above (-rs)"
        return (f"no combo was measured: {total} of {total} selected skipped ({reasons}). A gate that measured "
                "nothing passes nothing; --allow-empty accepts such a run")

    def _prune_images(self) -> None:
        """Old runs' image folders (`--history-images`) and crashed writers' temporary files (`clean_leftovers`)."""
        try:
            self.store.prune_images(self.settings.history_images)
        except OSError as error:
            warnings.warn(f"--history-images: old image folders not removed ({error})", stacklevel=1)
        try:
            self.store.clean_leftovers()
        except OSError as error:
            warnings.warn(f"history: crashed writers' temporary files not removed ({error})", stacklevel=1)

    # --- showing -------------------------------------------------------------------------------------------------
    def history_rule(self) -> str:
        """What a confirmed regression against history does to this run, as the summary says it."""
        if self.settings.write_baselines:
            return "advisory: --write-baselines"
        if not self.settings.history_gate:
            return "advisory: --history-gate off"
        return "a confirmed regression fails the run"

    def summary(self, terminalreporter) -> None:
        """The fluxgate section of the terminal summary: one table from this run's records (one process or merged
        from the workers), the verdicts against history, where things were written, then why the run failed."""
        write = terminalreporter.write_line
        if self.refused:
            return
        if self.run_id is not None and self.worker is None:
            gate, s = self.gate, self.settings
            context = report.RunContext(
                started=self.started, run_location=self.store.location(self.run_id), distributed=self.controller,
                baselines=(s.baselines_dir / gate.gpu_class) if gate else None,
                writing=s.write_baselines)
            report.terminal_summary(terminalreporter, self.store.load_run(self.run_id), context)
            scope = "; each worker judged its own combos" if self.controller else ""
            for line in report.history_lines(self.verdicts, self.history_rule(), scope=scope):
                write(line)
            for line in self.tradeoff_lines:
                write(line, red=" FAIL " in line)
            if self.report_path:
                write(f"fluxgate: report written to {self.report_path}")
            if self.written:
                folder, below_tier = self.written
                write(f"fluxgate: baselines written to {folder}")
                if below_tier:
                    write("similarity below the tier floor, so floored at measured - margin (a regression gate, not "
                          f"a quality pass): {', '.join(below_tier)}")
        for warning in self.history_warnings:
            write(f"WARNING: {warning}", yellow=True)
        for problem in self.problems:  # last, where the eye lands: why a run that may show no failed item failed
            write(f"FAIL: {problem}", red=True, bold=True)
