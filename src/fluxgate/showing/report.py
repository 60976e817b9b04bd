"""Showing results: the terminal table at the end of a run."""

from __future__ import annotations

import math
import time
from collections import Counter

from fluxgate.judging.compare import (
    FIRST_RUN,
    NO_CHANGE,
    NOT_COMPARABLE,
    REMEASURE,
    host_syncs_per_step,
    is_host_synchronous,
)
from fluxgate.measuring.stats import Spikes, mostly_idle
from fluxgate.storing.record import ERROR, FAILED, PASSED, SKIPPED

VERDICTS = {PASSED: "PASS", FAILED: "FAIL", ERROR: "ERROR", SKIPPED: "SKIP"}


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def rows(entries) -> list[list[str]]:
    """One row per (combo id, outcome, metrics): verdict, it/s, step CV, peak memory, MS-SSIM, PSNR, MFU, energy,
    seconds per image, GEMM path."""
    table = []
    for combo_id, verdict, m in entries:
        energy = (m.get("telemetry") or {}).get("energy_j")
        path = (m.get("kernel_path") or {}).get("label", "-")
        table.append([combo_id, VERDICTS.get(verdict, verdict.upper()), _fmt(m.get("it_s"), ".3f"),
                      _percent((m.get("step_stats") or {}).get("cv")), _fmt(m.get("peak_mem_gib"), ".3f"),
                      _fmt(m.get("ms_ssim"), ".4f"), _fmt(m.get("psnr_db"), ".2f", "inf" if "ms_ssim" in m else "-"),
                      _percent(m.get("mfu_bf16")), _fmt(energy, ".0f"), _fmt(m.get("e2e_s"), ".2f"), path])
    return table


def _header(cuda: bool) -> list[str]:
    return ["combo", "verdict", "it/s", "step CV", "peak GiB (VRAM)" if cuda else "peak GiB (RSS)", "MS-SSIM",
            "PSNR dB", "MFU", "J/image", "s/image", "GEMM path"]


def format_table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * width for width in widths]), *map(line, body)]


def _spikes(metrics: dict) -> Spikes | None:
    """The record's spike summary, or None when it has none or one written by another version."""
    try:
        found = Spikes(**metrics["spikes"]) if metrics.get("spikes") else None
    except TypeError:
        return None
    counts_ok = found is not None and isinstance(found.n, int) and isinstance(found.idle_total, (int, type(None)))
    return found if counts_ok else None


def spike_line(metrics: dict) -> str | None:
    """The spike line of a combo measured on CUDA (one step 10 % over the median already puts a 28-step CV near 2 %),
    or None. On CPU, where every step is host work, the CV column says enough. Never raises on an odd record."""
    found = _spikes(metrics)
    if found is None or found.idle_total is None:
        return None
    try:
        return found.describe()
    except (TypeError, ValueError, AttributeError):
        return None


def waiting_line(entries) -> str | None:
    """The combos (id, metrics) whose GPU was idle at most step ends, or None."""
    waiting = [f"{combo_id} {found.idle_total}/{found.n}" for combo_id, metrics in entries
               if (found := _spikes(metrics)) is not None and mostly_idle(found)]
    return None if not waiting else (
        "GPU idle at most step ends (it waits for the host: a sync inside each step, or launches slower than the "
        f"kernels; compile or CUDA graphs cut host work): {', '.join(waiting)}")


def sync_line(entries) -> str | None:
    """The host-synchronous combos (id, metrics) with their host syncs per step, or None."""
    records = [(combo_id, {"metrics": metrics}) for combo_id, metrics in entries]
    syncing = [f"{combo_id} {host_syncs_per_step(record)}" for combo_id, record in records
               if is_host_synchronous(record)]
    return None if not syncing else (
        "host-synchronous (host syncs per step: the GPU drains and waits while the host launches, so speed follows "
        f"the host CPU, and the history gate needs a larger change): {', '.join(syncing)}")


def spike_lines(entries) -> list[str]:
    lines = [sync_line(entries), waiting_line(entries)]
    lines += [f"step spikes {combo_id}: {line}" for combo_id, metrics in entries if (line := spike_line(metrics))]
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
        lines.append(f"  {len(first)} combos have no earlier comparable run yet (the first on this GPU class, "
                     "profile and settings): nothing to judge against")
    if unmeasured:  # skipped or errored: their reasons are in the table and the item lines already
        lines.append(f"  {len(unmeasured)} combos were not measured (skipped or error, reasons above): nothing to "
                     "judge")
    return lines + [f"  {message}" for outcome, message in verdicts
                    if outcome != NO_CHANGE and message not in first and message not in unmeasured]


def terminal_summary(terminalreporter, outcomes, gate, started: float) -> None:
    write = terminalreporter.write_line
    mem_kind = next((o.metrics["mem_kind"] for o in outcomes if "mem_kind" in o.metrics), "")
    environment = gate.history.environment
    terminalreporter.section("fluxgate")
    write(f"profile {gate.runner.profile} on {environment.get('device_name')} "
          f"(baselines: {gate.baselines_root / gate.gpu_class}{', WRITING' if gate.write else ''})")
    roof = environment.get("roof") or {}
    if roof:
        write(f"roof: bf16 {_fmt(roof.get('bf16_tflops'), '.0f')} TFLOP/s, fp8 {_fmt(roof.get('fp8_tflops'), '.0f')}"
              " TFLOP/s (measured now; MFU = model FLOPs per step x it/s / bf16 roof)")
    entries = [(o.combo.id, o.verdict, o.metrics) for o in outcomes]
    for line in format_table(_header(mem_kind.startswith("cuda")), rows(entries)):
        write(line)
    wall_s = time.time() - started
    timed_s = sum(o.metrics.get("timed_steps_s", 0.0) for o in outcomes)
    write(f"wall {wall_s:.0f} s, of which {timed_s:.0f} s ({100 * timed_s / max(wall_s, 1e-9):.0f}%) inside timed "
          "denoising steps")
    reused = [record.get("weights", {}).get("reused") for record in gate.history.records]
    if any(flag is not None for flag in reused):
        write(f"fixtures: {reused.count(True)} checkpoints reused from the fixture cache, {reused.count(False)} built")
    fallbacks = [o.combo.id for o in outcomes if (o.metrics.get("kernel_path") or {}).get("fallback")]
    if fallbacks:
        write(f"dequantize fallback (no quantized GEMM ran): {', '.join(fallbacks)}")
    for line in spike_lines([(o.combo.id, o.metrics) for o in outcomes]):
        write(line)
    compiled = [f"{o.combo.id} {o.metrics['compile_s']:.1f} s" for o in outcomes if o.metrics.get("compile_s")]
    if compiled:
        write(f"compile time (before the timed images, not in them): {', '.join(compiled)}")
    from fluxgate.measuring import memory

    leaks = [f"{r['combo']} {memory.describe(r['teardown'])}" for r in gate.history.records
             if r.get("teardown") and not r["teardown"]["clean"]]
    if leaks:
        write(f"teardown left more than 1 % of the device memory in use behind: {'; '.join(leaks)}")
    write(f"history: {gate.history.path}")


def distributed_summary(terminalreporter, merged_path, records: list[dict], started: float) -> None:
    """The summary of an xdist run: the merged run's table, then which worker ran where."""
    write = terminalreporter.write_line
    terminalreporter.section("fluxgate")
    measured = [r for r in records if r.get("outcome") != REMEASURE]
    cuda = any(str((r.get("metrics") or {}).get("mem_kind", "")).startswith("cuda") for r in measured)
    entries = [(r["combo"], r.get("outcome", "?"), r.get("metrics") or {}) for r in measured]
    for line in format_table(_header(cuda), rows(entries)):
        write(line)
    wall_s = time.time() - started
    timed_s = sum((r.get("metrics") or {}).get("timed_steps_s", 0.0) for r in measured)
    write(f"wall {wall_s:.0f} s; {timed_s:.0f} s of timed denoising steps over all workers")
    for line in spike_lines([(combo_id, metrics) for combo_id, _, metrics in entries]):
        write(line)
    placements: dict[str, list[str]] = {}
    for record in measured:
        environment = record.get("environment") or {}
        gpu = environment.get("gpu") or {}
        where = (f"worker {environment.get('xdist_worker', '?')} on CUDA_VISIBLE_DEVICES="
                 f"{environment.get('cuda_visible_devices')} {environment.get('device_name', '')} "
                 f"{gpu.get('uuid', '')}").rstrip()
        placements.setdefault(where, []).append(record["combo"])
    for where, combos in sorted(placements.items()):
        write(f"{where}: {', '.join(combos)}")
    write(f"history: {merged_path} (one run merged from {len(placements)} worker file(s))")
