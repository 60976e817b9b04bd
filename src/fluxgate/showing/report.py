"""Showing results: the terminal table at the end of a run."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fluxgate.judging.compare import (
    FIRST_RUN,
    NO_CHANGE,
    NOT_COMPARABLE,
    REMEASURE,
    is_host_synchronous,
)
from fluxgate.stats import Spikes, mostly_idle
from fluxgate.showing.text import counted, number
from fluxgate.storing.record import ERROR, FAILED, PASSED, SKIPPED, Metrics, Record

VERDICTS = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", SKIPPED: "SKIP"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    """`text.number`, with "-" for a missing value (the terminal table's) and "inf" for an infinite one."""
    return "inf" if isinstance(value, float) and math.isinf(value) else number(value, spec, missing)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rows(records: list[Record]) -> list[list[str]]:
    """One row per record: verdict, it/s, step CV, peak memory, MS-SSIM, PSNR, MFU, energy, seconds per image,
    GEMM path."""
    table = []
    for r in records:
        m, outcome = r.metrics, r.outcome or "?"
        table.append([r.combo, VERDICTS.get(outcome, outcome.upper()), _fmt(m.it_s, ".3f"),
                      _percent((m.step_stats or {}).get("cv")), _fmt(m.peak_mem_gib, ".3f"), _fmt(m.ms_ssim, ".4f"),
                      _fmt(m.psnr_db, ".2f", "inf" if m.ms_ssim is not None else "-"), _percent(m.mfu_bf16),
                      _fmt(m.energy_j, ".0f"), _fmt(m.e2e_s, ".2f"), m.gemm_label or "-"])
    return table


def _header(cuda: bool) -> list[str]:
    return ["combo", "verdict", "it/s", "step CV", "peak GiB (VRAM)" if cuda else "peak GiB (RSS)", "MS-SSIM",
            "PSNR dB", "MFU", "J/image", "s/image", "GEMM path"]


def format_table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * width for width in widths]), *map(line, body)]


def _spikes(metrics: Metrics) -> Spikes | None:
    """The record's spike summary, or None when it has none or one written by another version."""
    try:
        found = Spikes(**metrics.spikes) if metrics.spikes else None
    except TypeError:
        return None
    counts_ok = found is not None and isinstance(found.n, int) and isinstance(found.idle_total, (int, type(None)))
    return found if counts_ok else None


def spike_line(metrics: Metrics) -> str | None:
    """The spike line of a combo measured on CUDA (one step 10 % over the median already puts a 28-step CV near 2 %),
    or None. On CPU, where every step is host work, the CV column says enough. Never raises on an odd record."""
    found = _spikes(metrics)
    if found is None or found.idle_total is None:
        return None
    try:
        return found.describe()
    except (TypeError, ValueError, AttributeError):
        return None


def waiting_line(records: list[Record]) -> str | None:
    """The combos whose GPU was idle at most step ends, or None."""
    waiting = [f"{r.combo} {found.idle_total}/{found.n}" for r in records
               if (found := _spikes(r.metrics)) is not None and mostly_idle(found)]
    return None if not waiting else (
        "GPU idle at most step ends (it waits for the host: a sync inside each step, or launches slower than the "
        f"kernels; compile or CUDA graphs cut host work): {', '.join(waiting)}")


def sync_line(records: list[Record]) -> str | None:
    """The host-synchronous combos with their host syncs per step, or None."""
    syncing = [f"{r.combo} {r.metrics.host_syncs_per_step}" for r in records if is_host_synchronous(r)]
    return None if not syncing else (
        "host-synchronous (host syncs per step: the GPU drains and waits while the host launches, so speed follows "
        f"the host CPU, and the history gate needs a larger change): {', '.join(syncing)}")


def throttle_line(records: list[Record]) -> str | None:
    """The combos with timed steps during which NVML reported a clock-limiting reason, with the reasons, or None.
    SwPowerCap is the board at its power limit: the steady state of a GEMM-bound step on an H100/H200, where the clock
    then follows each chip's own power efficiency (one source of machine-to-machine spread in a GPU class)."""
    marked = []
    for r in records:
        flags = r.metrics.throttled_steps
        if flags and any(flags):
            reasons = sorted((r.metrics.telemetry or {}).get("throttle_reasons") or [])
            marked.append(f"{r.combo} {sum(flags)}/{len(flags)}" + (f" ({', '.join(reasons)})" if reasons else ""))
    return None if not marked else (
        "clock-limited timed steps (marked per step in the record; SwPowerCap = at the board's power limit, where "
        f"speed follows the chip's clock): {', '.join(marked)}")


def spike_lines(records: list[Record]) -> list[str]:
    lines = [sync_line(records), waiting_line(records), throttle_line(records)]
    lines += [f"step spikes {r.combo}: {line}" for r in records if (line := spike_line(r.metrics))]
    return [line for line in lines if line]


def history_lines(verdicts: list[tuple[str, str]], rule: str, scope: str = "") -> list[str]:
    """The run's (outcome, message) verdicts against history under `rule` (what a regression does to the run): a tally
    of every combo's outcome (so an all-clear run says so), then the message of each that is not "no change"."""
    if not verdicts:
        return []
    tally = ", ".join(f"{count} {outcome}" for outcome, count in Counter(o for o, _ in verdicts).most_common())
    first = [message for outcome, message in verdicts if outcome == NOT_COMPARABLE and f"({FIRST_RUN} " in message
             and " at commit " not in message]  # a --base-commit with no runs is no first run: said on its own
    unmeasured = [message for outcome, message in verdicts if outcome == NOT_COMPARABLE and "has outcome " in message
                  and message not in first]
    lines = [f"against history ({rule}{scope}): {tally}"]
    if first:  # a first run on a GPU class: one line, not one per combo
        lines.append(f"  {counted(len(first), 'combo has', 'combos have')} no earlier comparable run yet (the first "
                     "on this GPU class, profile and settings): nothing to judge against")
    if unmeasured:  # skipped or errored: their reasons are in the table and the item lines already
        lines.append(f"  {counted(len(unmeasured), 'combo was', 'combos were')} not measured (skipped or error, "
                     "reasons above): nothing to judge")
    return lines + [f"  {message}" for outcome, message in verdicts
                    if outcome != NO_CHANGE and message not in first and message not in unmeasured]


@dataclass(frozen=True)
class RunContext:
    """What the summary says about the run beside its records."""

    started: float  # time.time() at the session's start
    run_location: str  # where the store keeps the run (a file path or URL)
    distributed: bool = False  # xdist: the records were merged from the workers' files
    baselines: Path | None = None  # the baselines folder the run judged against (or wrote)
    writing: bool = False  # --write-baselines


def terminal_summary(terminalreporter, records: list[Record], context: RunContext) -> None:
    """The fluxgate section: the run's table (every combo's record, confirmation re-measurements left out), the time
    spent in timed steps, notes on fixtures, GEMM paths, spikes, compile time and teardown, and where each xdist
    worker ran. One process and an xdist run (records merged from the workers) are shown the same way."""
    write = terminalreporter.write_line
    measured = [r for r in records if r.outcome != REMEASURE]
    environment = measured[0].env if measured else {}
    terminalreporter.section("fluxgate")
    if measured and not context.distributed:
        write(f"profile {measured[0].profile} on {environment.get('device_name')} "
              f"(baselines: {context.baselines}{', WRITING' if context.writing else ''})")
        roof = environment.get("roof") or {}
        if roof:
            write(f"roof: bf16 {_fmt(roof.get('bf16_tflops'), '.0f')} TFLOP/s, fp8 "
                  f"{_fmt(roof.get('fp8_tflops'), '.0f')} TFLOP/s (measured now; MFU = model FLOPs per step x it/s / "
                  "bf16 roof)")
    for line in format_table(_header(any(r.metrics.on_cuda for r in measured)), rows(measured)):
        write(line)
    wall_s = time.time() - context.started
    timed_s = sum(r.metrics.timed_steps_s or 0.0 for r in measured)
    if context.distributed:
        write(f"wall {wall_s:.0f} s; {timed_s:.0f} s of timed denoising steps over all workers")
    else:
        write(f"wall {wall_s:.0f} s, of which {timed_s:.0f} s ({100 * timed_s / max(wall_s, 1e-9):.0f}%) inside timed "
              "denoising steps")
    phases = phase_line(measured)
    if phases:
        write(phases)
    for line in notes(measured):
        write(line)
    unjudged = [(r.combo, line) for r in measured for line in r.not_judged or ()]
    if unjudged:
        write(f"NOT JUDGED ({len(unjudged)} limit(s), not failures; the rest of each combo was judged):", yellow=True)
        for combo, line in unjudged:
            write(f"  {combo}: {line}", yellow=True)
    if context.distributed:
        placements = _placements(measured)
        for where, combos in sorted(placements.items()):
            write(f"{where}: {', '.join(combos)}")
        write(f"history: {context.run_location} (one run merged from {len(placements)} worker file(s))")
    else:
        write(f"history: {context.run_location}")


# The phases of one combo (`runner.Runner.measure`, `fluxgate.gate`), in the order they run, as the summary names them.
PHASES = {"components_s": "shared components", "transformer_s": "transformer build/load", "compile_s": "compile",
          "warmup_s": "warm-up image", "images_s": "timed images", "profile_s": "kernel-path profile",
          "judge_s": "similarity + images saved", "release_s": "release"}


def phase_line(records: list[Record]) -> str | None:
    """Where the combos' time went, summed over the records (None when no record carries phases): the timed images
    against everything around them, the largest first."""
    totals: dict[str, float] = {}
    for record in records:
        for phase, seconds in (record.metrics.phases_s or {}).items():
            totals[phase] = totals.get(phase, 0.0) + float(seconds or 0.0)
    if not totals:
        return None
    around = sorted(((s, p) for p, s in totals.items() if p != "images_s" and s >= 0.05), reverse=True)
    parts = ", ".join(f"{PHASES.get(phase, phase)} {seconds:.0f} s" for seconds, phase in around)
    steps = sum(r.metrics.timed_steps_s or 0.0 for r in records)
    return (f"where the combos' time went, all combos together: timed images {totals.get('images_s', 0.0):.0f} s "
            f"({steps:.0f} s of denoising steps, the rest text encoding, VAE decode, telemetry); around them "
            f"{parts or 'nothing'}")


def notes(records: list[Record]) -> list[str]:
    """The lines under the table: fixture reuse, dequantize fallbacks, spikes, host syncs and throttled clocks,
    compile time, teardown leaks (each only when there is something to say)."""
    lines = []
    reused = [(r.weights or {}).get("reused") for r in records]
    if any(flag is not None for flag in reused):
        lines.append(f"fixtures: {counted(reused.count(True), 'checkpoint')} reused from the fixture cache, "
                     f"{reused.count(False)} built")
    fallbacks = [r.combo for r in records if r.metrics.fallback]
    if fallbacks:
        lines.append(f"dequantize fallback (no quantized GEMM ran): {', '.join(fallbacks)}")
    lines += spike_lines(records)
    compiled = [f"{r.combo} {r.metrics.compile_s:.1f} s" for r in records if r.metrics.compile_s]
    if compiled:
        lines.append(f"compile time (before the timed images, not in them): {', '.join(compiled)}")
    leaks = [f"{r.combo} {teardown_line(r.teardown)}" for r in records if r.teardown and not r.teardown["clean"]]
    if leaks:
        lines.append(f"teardown left more than 1 % of the device memory in use behind: {'; '.join(leaks)}")
    return lines


def teardown_line(entry: Mapping[str, Any]) -> str:
    """A record's `teardown` entry in words: `1.534 GiB in use after teardown vs 1.411 GiB before (NVML)`."""
    kind, source = ("used", "NVML") if "used_after_gib" in entry else ("reserved", "torch reserved")
    return (f"{entry[f'{kind}_after_gib']:.3f} GiB in use after teardown vs {entry[f'{kind}_before_gib']:.3f} GiB "
            f"before ({source})")


def _placements(records: list[Record]) -> dict[str, list[str]]:
    """Where each xdist worker ran -> the combos it measured."""
    placements: dict[str, list[str]] = {}
    for record in records:
        environment = record.env
        gpu = environment.get("gpu") or {}
        where = (f"worker {environment.get('xdist_worker', '?')} on CUDA_VISIBLE_DEVICES="
                 f"{environment.get('cuda_visible_devices')} {environment.get('device_name', '')} "
                 f"{gpu.get('uuid', '')}").rstrip()
        placements.setdefault(where, []).append(record.combo)
    return placements
