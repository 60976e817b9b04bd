"""Showing results: the terminal table at the end of a run."""

from __future__ import annotations

import math


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def rows(outcomes) -> list[list[str]]:
    """One row per combo: id, verdict, it/s, peak memory, MS-SSIM, PSNR, seconds per image."""
    table = []
    for outcome in outcomes:
        m = outcome.metrics
        verdict = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}[outcome.verdict]
        table.append([outcome.combo.id, verdict, _fmt(m.get("it_s"), ".3f"), _fmt(m.get("peak_mem_gib"), ".3f"),
                      _fmt(m.get("ms_ssim"), ".4f"),
                      _fmt(m.get("psnr_db"), ".2f", "inf" if "ms_ssim" in m else "-"), _fmt(m.get("e2e_s"), ".2f")])
    return table


def format_table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths))  # noqa: E731
    return [line(header), line(["-" * width for width in widths]), *map(line, body)]


def terminal_summary(terminalreporter, outcomes, gate) -> None:
    mem_kind = next((o.metrics["mem_kind"] for o in outcomes if "mem_kind" in o.metrics), "")
    mem_header = "peak GiB (VRAM)" if mem_kind.startswith("cuda") else "peak GiB (RSS)"
    terminalreporter.section("fluxgate")
    terminalreporter.write_line(f"profile {gate.runner.profile} on {gate.history.environment.get('device_name')} "
                                f"(baselines: {gate.baselines_root / gate.gpu_class}"
                                f"{', WRITING' if gate.write else ''})")
    header = ["combo", "verdict", "it/s", mem_header, "MS-SSIM", "PSNR dB", "s/image"]
    for line in format_table(header, rows(outcomes)):
        terminalreporter.write_line(line)
    reused = [record.get("weights", {}).get("reused") for record in gate.history.records]
    if any(flag is not None for flag in reused):
        terminalreporter.write_line(f"fixtures: {reused.count(True)} checkpoints reused from the fixture cache, "
                                    f"{reused.count(False)} built")
    terminalreporter.write_line(f"history: {gate.history.path}")
