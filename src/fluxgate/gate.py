"""Judging one combo: measure it, compare with its baseline, record it in history, list what failed.

Two modes: `check` (the gate: every limit is asserted) and `write` (`nox -s baselines`: measurements are collected
and become the new baseline; nothing is asserted).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Callable

from PIL import Image

from fluxgate.errors import FluxgateError, SkipCombo
from fluxgate.judging import baselines, compile_time, similarity, spread, tripwire
from fluxgate.matrix import Combo
from fluxgate import stats
from fluxgate.measuring import flops
from fluxgate.measuring.measure import Measurement
from fluxgate.measuring.memory import OutOfMemory
from fluxgate.measuring.runner import Runner
from fluxgate.storing.record import ERROR, FAILED, PASSED, REMEASURE, RESULT_NULLS, SKIPPED, Metrics, Record
from fluxgate.storing.store import RunWriter


@dataclass
class Outcome:
    """What happened to one combo: the failed limits and the problems that stopped it."""

    combo: Combo
    failures: list[str] = field(default_factory=list)  # limits missed
    error: str | None = None  # could not be measured or judged
    skipped: str | None = None  # cannot run here (not a failure)
    metrics: dict = field(default_factory=dict)
    not_judged: list[str] = field(default_factory=list)  # limits not judged, each with why (host contention)

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None and self.skipped is None

    @property
    def verdict(self) -> str:
        if self.skipped:
            return SKIPPED
        return ERROR if self.error else (FAILED if self.failures else PASSED)


def speed_failure(result: Measurement, baseline: baselines.Baseline, entry: str) -> tuple[str | None, str | None]:
    """(the line of a missed fixed speed limit, else None; the host contention note of its steps
    (`stats.contention_note`), else None). Contention only slows a run: a limit met under it is met."""
    t = baseline.thresholds
    it_s = spread.run_it_s(result.step_times_s, t.speed_statistic)
    if it_s >= t.min_it_s:
        return None, None
    which = "" if t.speed_statistic == "median" else f" ({t.speed_statistic} step)"
    return (f"speed: {it_s:.3f} it/s{which} < min {t.min_it_s:.3f} it/s ({baseline.limits_file} "
            f"{entry})",
            stats.contention_note(result.step_times_s, result.run_wait_s))


def limit_failures(result: Measurement, sim: similarity.Summary, baseline: baselines.Baseline, entry: str,
                   not_judged: list[str] | None = None) -> list[str]:
    """One line per missed limit: value, limit and where the limit comes from. Similarity is judged on the summary
    of the combo's cases (`similarity.summarise`), the line naming its worst case. A speed limit missed while the
    steps waited for a CPU (host contention) goes to `not_judged` instead when it is given (a CPU run reports it so:
    a busy laptop's speed says nothing of the code; the GPU gate measures it again), else it fails naming the
    contention; a compile time over its bound likewise."""
    t = baseline.thresholds
    where = f"{baseline.limits_file} {entry}"
    if baseline.cases and sim.cases < baseline.cases:  # limits derived over more cases: judge each case instead
        sim = sim.worst()
    failures = []

    def host_timed(missed: str | None, contention: str | None) -> None:
        """A missed limit on host-bound time: not judged under contention when `not_judged` is given, else failed."""
        if missed and contention and not_judged is not None:
            not_judged.append(f"{missed}: not judged, {contention}")
        elif missed:
            failures.append(missed + (f"; {contention}, not necessarily the code" if contention else ""))

    host_timed(*speed_failure(result, baseline, entry))
    slow_compile = compile_time.failure(result.compile_s, t.max_compile_s, where)  # compiling is host work too
    host_timed(slow_compile, slow_compile and stats.contention_note(result.step_times_s, result.run_wait_s))
    if result.peak_mem_gib > t.max_peak_mem_gib:
        failures.append(f"memory: peak {result.peak_mem_gib:.3f} GiB ({result.mem_kind}) > max "
                        f"{t.max_peak_mem_gib:.3f} GiB ({where})")
    if sim.ms_ssim < t.min_ms_ssim:
        failures.append(f"similarity: MS-SSIM {sim.ms_ssim:.4f} ({sim.how}) < min {t.min_ms_ssim:.4f} vs "
                        f"{baseline.reference_dir}/")
    if sim.psnr_db < t.min_psnr_db:
        failures.append(f"similarity: PSNR {sim.psnr_db:.2f} dB ({sim.how_psnr}) < min {t.min_psnr_db:.2f} dB vs "
                        f"{baseline.reference_dir}/")
    return failures


def judge_cases(combo: Combo, result: Measurement, references: dict[str, Image.Image], metrics: dict, device,
                save_image: Callable[[str, Image.Image], str], itself: bool = False,
                baseline_ms_ssim: float | None = None) -> tuple[similarity.Summary, list[str]]:
    """Each case image of `result` against its BF16 image in `references` (case name -> image): similarity (computed
    on `device`) and the broken-image tripwire (`itself`: the image is the reference being made, checked without
    one), each saved through `save_image(name, image)` (-> where it went: `combo.id` for the first case,
    `combo.id@case` after); the cases go into `metrics` with their summary. Returns the summary and the tripwire's
    lines, each naming its case. Raises KeyError for a case without a reference."""
    pairs, cases, broken = {}, [], []
    for index, (name, image, nonfinite) in enumerate(zip(result.case_names, result.case_images,
                                                         result.case_nonfinite)):
        reference = references[name]
        pairs[name] = sim = similarity.compare(image, reference, device)
        problems = tripwire.check(image, None if itself else reference, nonfinite,
                                  ms_ssim=sim.ms_ssim, baseline_ms_ssim=baseline_ms_ssim)
        saved = save_image(combo.id if index == 0 else f"{combo.id}@{name}", image)
        cases.append({"case": name, **sim.to_json(), "broken_image": problems, "image": saved})
        broken += [f"case {name}: {problem}" for problem in problems]
    summary = similarity.summarise(pairs)
    metrics.update(summary.to_json(), cases=cases, broken_image=broken)
    return summary, broken


class Gate:
    """Evaluates combos for one run and keeps what `nox -s baselines` needs."""

    def __init__(self, runner: Runner, baselines_root: Path, gpu_class: str, history: RunWriter, write: bool):
        self.runner, self.baselines_root, self.gpu_class, self.history = runner, baselines_root, gpu_class, history
        self.write = write
        self.references: dict[str, Image.Image] = {}  # bf16 images made in this run (write mode)
        self.measured: dict[Combo, baselines.Measured] = {}
        self.history_warnings: list[str] = []  # problems met reading the history (a corrupt file skipped), one line each

    def _references(self, combo: Combo, result: Measurement
                    ) -> tuple[dict[str, Image.Image], baselines.Baseline | None]:
        """The BF16 image of each of the combo's cases, and the baseline (None in write mode)."""
        settings, cases = self.runner.settings(combo.model_spec), list(result.case_names)
        if not self.write:
            baseline = baselines.load(self.baselines_root, self.gpu_class, combo, settings,
                                      self.history.environment)
            return baseline.references(cases), baseline
        if combo.is_reference:
            self.references[combo.model] = dict(zip(cases, result.case_images))
        if combo.model in self.references:
            return self.references[combo.model], None
        try:  # e.g. `--runtimes compile` alone: judged against the stored images, which stay as they are
            return baselines.stored_references(self.baselines_root, self.gpu_class, combo.model, settings, cases,
                                               self.history.environment), None
        except FluxgateError as error:
            raise FluxgateError(f"--write-baselines: select {combo.model}[bf16] (eager) to make the reference images, "
                                f"or keep fresh stored ones ({error})") from None

    def _judge_cases(self, combo: Combo, result: Measurement, references: dict[str, Image.Image], metrics: dict,
                     baseline_ms_ssim: float | None = None) -> tuple[similarity.Summary, list[str]]:
        """`judge_cases` with this run's device and history; a bf16 image becoming the reference (--write-baselines)
        is not checked against itself."""
        return judge_cases(combo, result, references, metrics, self.runner.device, self.history.save_image,
                           itself=self.write and combo.is_reference, baseline_ms_ssim=baseline_ms_ssim)

    def _metrics(self, result: Measurement) -> dict:
        """Everything measured about one combo, as history stores it."""
        metrics = {"it_s": result.it_s, "it_s_mean": result.it_s_mean, "step_times_s": result.step_times_s,
                   "step_stats": result.stats.to_json(), "spikes": result.spikes.to_json(),
                   "off_cpu_s": result.off_cpu_s, "run_wait_s": result.run_wait_s,
                   "host_step_times_s": result.host_step_times_s,
                   "gpu_idle_at_end": result.gpu_idle_at_end, "idle_probe_s": result.idle_probe_s,
                   "first_steps_s": result.first_steps_s,
                   "e2e_s": result.e2e_s, "peak_mem_gib": result.peak_mem_gib,
                   "mem_kind": result.mem_kind, "peak_reserved_gib": result.peak_reserved_gib,
                   "denoise_peak_gib": result.denoise_peak_gib,
                   "timed_steps_s": sum(result.step_times_s) + sum(result.first_steps_s or ()),
                   "kernel_path": result.kernel_path,
                   "step_flops": result.step_flops, "images": result.images, "compile_s": result.compile_s,
                   "phases_s": dict(result.phases_s or {}),
                   "telemetry": result.telemetry.to_json() if result.telemetry is not None else None}
        if result.throttled_steps is not None:  # CUDA with NVML samples: per-step clocks, throttled steps marked
            metrics.update(step_sm_clock_mhz=result.step_sm_clock_mhz, throttled_steps=result.throttled_steps)
        roof = self.history.environment.get("roof") or {}
        if result.step_flops and roof.get("bf16_tflops"):
            metrics["mfu_bf16"] = flops.mfu(result.step_flops, result.it_s, roof["bf16_tflops"])
            if roof.get("fp8_tflops") and (result.kernel_path or {}).get("label", "").startswith("fp8 GEMM"):
                metrics["mfu_fp8"] = flops.mfu(result.step_flops, result.it_s, roof["fp8_tflops"])
        return metrics

    def _identity(self, combo: Combo) -> dict:
        """The record fields naming what was measured where."""
        return {"combo": combo.id, "model": combo.model, "precision": combo.precision, "runtime": combo.runtime,
                "profile": self.runner.profile, "gpu_class": self.gpu_class}

    def evaluate(self, combo: Combo) -> Outcome:
        """Measure and judge one combo, and append its record to the run's history (also when it fails, errors,
        is skipped or is interrupted). Raises what is not a FluxgateError (a bug, KeyboardInterrupt) after
        recording it."""
        outcome = Outcome(combo)
        settings = self.runner.settings(combo.model_spec)
        found: dict = {}  # weights, image, thresholds: what the combo got as far as
        try:
            result, found["weights"] = self.runner.measure(combo)
            outcome.metrics = self._metrics(result)
            judging = time.perf_counter()
            references, baseline = self._references(combo, result)
            sim, broken = self._judge_cases(combo, result, references, outcome.metrics,
                                            baseline.thresholds.measured_ms_ssim if baseline else None)
            found["image"] = outcome.metrics["cases"][0]["image"]
            if self.write and broken:  # never a baseline: neither its images nor its numbers
                if combo.is_reference:
                    self.references.pop(combo.model, None)
                raise FluxgateError(f"broken image, not stored as a baseline: {'; '.join(broken)}")
            if baseline is not None:
                found["thresholds"] = asdict(baseline.thresholds)
                entry = f'["{combo.model}"."{combo.variant}"]'
                not_judged = []
                outcome.failures = [f"broken image: {problem}" for problem in broken] + limit_failures(
                    result, sim, baseline, entry, not_judged)
                if not_judged and self.runner.device.type == "cuda":
                    self._contended_speed(combo, baseline, entry, outcome)
                else:
                    outcome.not_judged = not_judged
            else:
                self.measured[combo] = baselines.Measured(combo, result.it_s, result.peak_mem_gib, sim.ms_ssim,
                                                          sim.to_json()["psnr_db"], result.compile_s)
            outcome.metrics["phases_s"]["judge_s"] = time.perf_counter() - judging
        except SkipCombo as skip:
            outcome.skipped = str(skip)
        except OutOfMemory as error:
            outcome.error = self._out_of_memory(combo, error)
        except FluxgateError as error:
            outcome.error = str(error)
        except BaseException as error:  # a bug or an interrupt: recorded, then raised with its traceback
            outcome.error = f"{type(error).__name__}: {error}"
            raise
        finally:
            self.history.append(Record(
                **self._identity(combo), settings=settings, **found, metrics=Metrics.from_json(outcome.metrics),
                failures=outcome.failures, error=outcome.error or outcome.skipped, outcome=outcome.verdict,
                not_judged=outcome.not_judged or None,
                teardown=self.runner.last_teardown, nulls=RESULT_NULLS))
        return outcome

    def _contended_speed(self, combo: Combo, baseline: baselines.Baseline, entry: str, outcome: Outcome) -> None:
        """On a GPU, a speed limit missed under host contention (`limit_failures` left it not judged) is measured
        again (a new pipeline): the re-measurement's steps are judged when they ran uncontended; contended again,
        the combo fails as invalid, never on speed."""
        again, _ = self.runner.measure(combo)
        missed_again, contention_again = speed_failure(again, baseline, entry)
        outcome.metrics["remeasured_steps_s"] = again.step_times_s
        if contention_again:
            outcome.failures.append(f"invalid: host contention in the measurement and its re-measurement "
                                    f"({contention_again}): speed not judged")
        elif missed_again:
            outcome.failures.append(f"{missed_again} (re-measured: the first measurement was under host contention)")

    def _out_of_memory(self, combo: Combo, error: OutOfMemory) -> str:
        """The OOM message, with the peak the combo's baseline measured when there is one (the better estimate)."""
        measured = baselines.measured_peak_gib(self.baselines_root, self.gpu_class, combo)
        if measured is None or measured[0] <= error.needed_gib:
            return str(error)
        return str(error).replace(f"needs more than {error.needed_gib:.1f} GiB",
                                  f"needs ≈{measured[0]:.1f} GiB (its measured peak in {measured[1]})")

    def write_baselines(self) -> tuple[Path, list[str]]:
        """Store this run's measurements and bf16 images as the baselines of its GPU class. A model's image settings and
        run id are recorded only when this run made its reference image; one judged against the stored image (e.g.
        `--runtimes compile` alone) keeps the entry of the run that made that image."""
        models = {combo.model: combo.model_spec for combo in self.measured if combo.model in self.references}
        run = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "pytest " + " ".join(sys.argv[1:]), "environment": self.history.environment,
               "history_file": PurePath(self.history.location).name,
               "combos": sorted(combo.id for combo in self.measured)}
        provenance = {"runs": {self.history.run_id: run},
                      "models": {name: {**self.runner.settings(spec), "run_id": self.history.run_id}
                                 for name, spec in models.items()}}
        return baselines.write(self.baselines_root, self.gpu_class, list(self.measured.values()), self.references,
                               provenance)

    def verdicts(self, last_n: int = 5, base_commit: str | None = None, confirm: bool = True,
                 min_speed_effect: float | None = None, rule: str | None = None) -> list:
        """This run's combos judged against the history (`compare`). A suspected speed or image-time regression is
        re-measured (a new pipeline, the same process) and kept only if the re-measurement shows it too (on a CPU,
        when both waited for a CPU, the times are not judged at all); the re-measurement is recorded in history with
        outcome REMEASURE (never part of a later window).
        `min_speed_effect`: the rule's minimum speed shift (a fraction); None takes the device type's (2 % on CUDA,
        50 % elsewhere). `rule`: the registered history rule to judge by (`judging.rules`; None: the default).
        Problems met reading the history (a skipped file) are kept in `history_warnings`."""
        from fluxgate.judging import compare
        from fluxgate.judging import confirm as second_look

        with warnings.catch_warnings(record=True) as caught:  # kept for the summary, where a user looks
            warnings.simplefilter("always")
            try:
                earlier = [r for r in self.history.store.load() if r.run_id != self.history.run_id]
            except OSError as error:  # a store that cannot be listed (network, permissions): no window, said once
                earlier = []
                warnings.warn(f"{self.history.store}: history not readable ({type(error).__name__}: {error}); every "
                              "combo is judged without it (not comparable)", stacklevel=1)
        self.history_warnings = [str(warning.message) for warning in caught]
        # This run's own records, also when its file is not among the store's runs (an xdist worker's).
        records = earlier + [r.with_environment(self.history.environment) for r in self.history.records]
        if min_speed_effect is None:
            min_speed_effect = compare.min_speed_effect_for(self.runner.device.type)
        from fluxgate.judging.rules import DEFAULT_RULE, RULES

        policy = RULES[rule or DEFAULT_RULE].policy(min_speed_effect)
        verdicts = compare.compare_run(records, self.history.run_id, last_n=last_n, base_commit=base_commit,
                                       policy=policy)
        judged = []
        for verdict in verdicts:
            suspected = [m for m in (verdict.metric("step_time_s"), verdict.metric("image_s"))
                         if m is not None and m.outcome == compare.REGRESSION]
            if confirm and suspected:
                combo = Combo.parse(verdict.combo)
                result, _ = self.runner.measure(combo)
                first = next((r for r in self.history.records if r.combo == verdict.combo), None)
                verdict = second_look.confirm(verdict, result.step_times_s, remeasured_e2e_s=result.e2e_s)
                again = stats.contention_note(result.step_times_s, result.run_wait_s)
                slower = any(m.outcome == compare.REGRESSION for m in verdict.metrics if m.metric in second_look.TIMES)
                if self.runner.device.type != "cuda" and first is not None and compare.contention(first) and again \
                        and slower:
                    verdict = second_look.speed_not_judged(verdict, f"{again} in the measurement and its re-measurement")
                self.history.append(Record(**self._identity(combo), outcome=REMEASURE, verdict=verdict.outcome,
                                           metrics=Metrics(it_s=result.it_s, step_times_s=result.step_times_s,
                                                           e2e_s=result.e2e_s)))
            judged.append(verdict)
        # Written once, on the records: every reader shows these and never judges again.
        self.history.record_verdicts({verdict.combo: verdict.stored(gating=confirm) for verdict in judged})
        return judged
