"""Publishing one run from the history: a PR-comment summary, trend plots and image grids.

    <out>/summary.md                        markdown for a PR comment: one row per combo, then failures and notes
    <out>/trends/<model>.<precision>.png    it/s, peak memory and MS-SSIM over the runs of that combo (same GPU
                                            class and profile), candidate run highlighted, limits drawn
    <out>/grids/<model>.<precision>.png     BF16 reference | candidate | |difference| heatmap, for combos whose
                                            similarity moved (MS-SSIM below 1 - SIMILARITY_EPS, or a failed
                                            similarity limit)
    <out>/decision.md                       which precision to ship, per GPU class and model (`decision`); also
                                            the last section of summary.md
    <out>/decision/<gpu-class>.<model>.png  it/s vs MS-SSIM scatter, marker area = peak VRAM

"Base" for the Δ columns is the median of the earlier runs of the same combo, GPU class and profile in the history,
unless the caller passes `verdicts` from a comparison module (see `write_report`).

    python -m fluxgate.showing.publish --history-dir .fluxgate/history --out .fluxgate/report
"""

from __future__ import annotations

import statistics
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from fluxgate.errors import FluxgateError
from fluxgate.judging import compare
from fluxgate.judging.compare import REMEASURE
from fluxgate.matrix import Combo
from fluxgate.showing import decision
from fluxgate.showing.report import VERDICTS, spike_line, sync_line
from fluxgate.storing import history
from fluxgate.storing.record import ERROR, FAILED, MEASURED

SIMILARITY_EPS = 1e-4  # MS-SSIM further below 1.0 than this counts as "moved" and gets an image grid
NONE = "—"
CALM_VERDICTS = ("PASS", "OK", "NO CHANGE", "IMPROVEMENT")  # shown plain; every other verdict in bold


class PublishError(FluxgateError):
    """No history to publish, or no such run in it."""


def _read_history(history_dir: Path) -> tuple[list[dict], list[str]]:
    """All records plus one note per skipped history file; the warnings are re-raised for the caller to see."""
    if not history_dir.is_dir():
        raise PublishError(f"--history-dir {history_dir}: no such directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = history.read(history_dir)
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=3)
    if not records:
        raise PublishError(f"--history-dir {history_dir}: no readable history records (expected <run_id>.json files)")
    return records, [str(warning.message) for warning in caught]


def _run_order(records: list[dict]) -> list[str]:
    """Run ids oldest first (history files sort by name, and run ids start with the UTC start time)."""
    return list(dict.fromkeys(record["run_id"] for record in records))


def _series(candidate: dict, records: list[dict], runs: list[str]) -> list[dict]:
    """The measured records of the candidate's combo on its GPU class and profile, up to and including its run."""
    last = runs.index(candidate["run_id"])
    same = lambda r: all(r.get(key) == candidate.get(key) for key in ("combo", "gpu_class", "profile"))  # noqa: E731
    return [r for r in records if same(r) and r.get("outcome") in MEASURED and runs.index(r["run_id"]) <= last]


def _median(records: list[dict], metric: str) -> float | None:
    values = [r["metrics"][metric] for r in records if isinstance((r.get("metrics") or {}).get(metric), (int, float))]
    return statistics.median(values) if values else None


def _num(value, spec: str) -> str:
    return NONE if value is None else format(value, spec)


def _delta(value, base) -> str:
    """Relative change in percent, signed; `—` without a base."""
    if value is None or not base:
        return NONE
    return f"{100 * (value - base) / base:+.1f}%"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _gemm_path(metrics: dict) -> str:
    path = metrics.get("kernel_path") or {}
    label = path.get("label", NONE)
    if path.get("fallback"):
        return f"⚠️ {label}" if "fallback" in label else f"⚠️ {label} (fallback)"
    return label


def _row(record: dict, base: dict, verdict: str) -> list[str]:
    m = record.get("metrics") or {}
    if record.get("outcome") not in MEASURED:
        return [f"`{record['combo']}`", *[NONE] * 9, verdict]
    psnr = m.get("psnr_db")
    psnr_text = "inf" if psnr is None and m.get("ms_ssim") is not None else _num(psnr, ".2f")
    energy = (m.get("telemetry") or {}).get("energy_j")
    mfu = m.get("mfu_bf16")
    return [f"`{record['combo']}`", _num(m.get("it_s"), ".3f"), _delta(m.get("it_s"), base.get("it_s")),
            _num(m.get("peak_mem_gib"), ".3f"), _delta(m.get("peak_mem_gib"), base.get("peak_mem_gib")),
            _num(m.get("ms_ssim"), ".4f"), psnr_text, NONE if mfu is None else f"{100 * mfu:.1f}%",
            _num(energy, ".0f"), _gemm_path(m), verdict]


def _verdict(record: dict, given: dict | None) -> str:
    text = given["verdict"].upper() if given and given.get("verdict") else VERDICTS.get(record.get("outcome"), "?")
    return text if text in CALM_VERDICTS else f"**{text}**"


def regressions(records: list[dict], run_id: str) -> set[str]:
    """The combos of run `run_id` with a confirmed regression against history, the kind that fails a run: a gating
    run re-measures a suspected one and records the re-measurement with verdict "regression"."""
    return {r["combo"] for r in records if r.get("run_id") == run_id and r.get("outcome") == REMEASURE
            and r.get("verdict") == "regression"}


def gate_headline(run: list[dict], regressed: set[str]) -> str:
    """One line: did this run pass the gate (every combo inside its limits, no error, no confirmed regression)."""
    missed = sum(r.get("outcome") == FAILED for r in run)
    errors = sum(r.get("outcome") == ERROR for r in run)
    measured = sum(r.get("outcome") in MEASURED for r in run)
    reasons = [text for count, text in ((missed, f"{missed} missed a limit"), (errors, f"{errors} errors"),
                                        (len(regressed), f"{len(regressed)} regressed against history")) if count]
    if not measured:
        reasons.append("nothing was measured")
    return f"**Gate: FAILED** ({', '.join(reasons)})" if reasons else "**Gate: passed**"


def _summary(run: list[dict], bases: dict[str, dict], base_note: str, verdicts: dict, notes: list[str],
             regressed: set[str] = frozenset()) -> str:
    environment = run[0].get("environment") or {}
    commit = (environment.get("git_commit") or "")[:10] or "unknown"
    commit += " (dirty)" if environment.get("git_dirty") else ""
    profiles = ", ".join(sorted({str(r.get("profile")) for r in run}))
    counts = {outcome: sum(r.get("outcome") == outcome for r in run) for outcome in VERDICTS}
    cuda = any(str((r.get("metrics") or {}).get("mem_kind", "")).startswith("cuda") for r in run)
    lines = [f"### fluxgate · {environment.get('device_name', 'unknown device')} · profile {profiles}",
             f"run `{run[0]['run_id']}` · commit `{commit}` · GPU class `{run[0].get('gpu_class')}` · "
             f"torch {environment.get('torch', '?')} · diffusers {environment.get('diffusers', '?')}", "",
             gate_headline(run, regressed) + " · "
             f"{len(run)} combos: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n), "",
             f"| combo | it/s | Δ vs base | peak {'VRAM' if cuda else 'RSS'} GiB | Δ | MS-SSIM | PSNR dB | MFU | "
             "J/image | GEMM path | verdict |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for record in run:
        given = verdicts.get(record["combo"])
        lines.append("| " + " | ".join(map(_cell, _row(record, bases[record["combo"]], _verdict(record, given))))
                     + " |")
    lines += ["", base_note]
    problems = []
    for record in run:
        given = verdicts.get(record["combo"]) or {}
        for failure in record.get("failures") or []:
            problems.append(f"- `{record['combo']}` {failure}")
        if record.get("error"):
            kind = "skipped" if record.get("outcome") == "skipped" else "error"
            problems.append(f"- `{record['combo']}` {kind}: {record['error']}")
        if given.get("message"):
            problems.append(f"- `{record['combo']}` {given['message']}")
    if problems:
        lines += ["", "**Failures, errors and verdict notes**", *problems]
    spiked = [f"- `{r['combo']}` {line}" for r in run if (line := spike_line(r.get("metrics") or {}))]
    if spiked:
        lines += ["", "**Step spikes** (steps ≥10 % over the median, and what each was waiting for)", *spiked]
    if synced := sync_line([(r["combo"], r.get("metrics") or {}) for r in run]):
        lines += ["", f"**Host-synchronous combos**: {synced.removeprefix('host-synchronous ')}"]
    if notes:
        lines += ["", "<details><summary>Report notes</summary>", "", *(f"- {note}" for note in notes), "",
                  "</details>"]
    return "\n".join(lines) + "\n"


TREND_PANELS = (  # metric, axis label, key of its limit in the record's thresholds
    ("it_s", "it/s (median step)", "min_it_s"),
    ("peak_mem_gib", "peak memory GiB", "max_peak_mem_gib"),
    ("ms_ssim", "MS-SSIM vs BF16 ref", "min_ms_ssim"),
)


def _run_label(record: dict) -> str:
    try:
        return datetime.fromisoformat(record["recorded"]).strftime("%m-%d %H:%M")
    except (KeyError, TypeError, ValueError):
        return record["run_id"][:13]


def _tick_indices(count: int, most: int = 8) -> list[int]:
    """Evenly spaced run indices to label, at most about `most`, always the first and the last (this run)."""
    step = -(-count // most)
    ticks = list(range(0, count, step))
    if count - 1 - ticks[-1] <= step / 2 and len(ticks) > 1:
        ticks.pop()  # too close to this run's label
    return sorted({*ticks, count - 1})


def _write_trend(path: Path, candidate: dict, series: list[dict], base: dict) -> None:
    """One figure, three stacked axes: x = run index of this combo (labelled with the run's time)."""
    figure = Figure(figsize=(9, 7.2), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    xs = np.arange(len(series))
    failed = np.array([r.get("outcome") == FAILED for r in series])
    thresholds = candidate.get("thresholds") or {}
    mem_kind = str((candidate.get("metrics") or {}).get("mem_kind", ""))
    for ax, (metric, label, limit_key) in zip(axes, TREND_PANELS):
        ys = np.array([(r.get("metrics") or {}).get(metric) for r in series], dtype=float)  # None -> nan
        if metric == "peak_mem_gib":
            label = "peak VRAM GiB" if mem_kind.startswith("cuda") else "peak RSS GiB"
        legend = ax is axes[0]  # the markers mean the same on every axis: explain them once
        ax.plot(xs, ys, color="tab:blue", linewidth=1.2, marker="o", markersize=4, zorder=2,
                label="run" if legend else "_nolegend_")
        if failed.any():
            ax.scatter(xs[failed], ys[failed], marker="x", s=60, color="tab:red", zorder=3,
                       label="failed run" if legend else "_nolegend_")
        ax.scatter(xs[-1:], ys[-1:], s=140, facecolors="none", edgecolors="tab:orange", linewidths=2.2, zorder=4,
                   label="this run" if legend else "_nolegend_")
        if thresholds.get(limit_key) is not None:
            ax.axhline(thresholds[limit_key], color="tab:red", linestyle="--", linewidth=1,
                       label=f"limit {thresholds[limit_key]:.4g}")
        if base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle=":", linewidth=1, label=f"base {base[metric]:.4g}")
        ax.axvspan(xs[-1] - 0.4, xs[-1] + 0.4, color="tab:orange", alpha=0.08, zorder=0)
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xticks(ticks := _tick_indices(len(series)), [_run_label(series[i]) for i in ticks])
    axes[-1].set_xlim(-0.6, len(series) - 0.4)
    axes[-1].tick_params(axis="x", labelrotation=30)
    axes[-1].set_xlabel(f"run (UTC), {len(series)} measured run(s) on {candidate.get('gpu_class')} / "
                        f"{candidate.get('profile')}")
    figure.suptitle(f"{candidate['combo']} — trend (this run: {candidate['run_id']})", fontsize=11)
    figure.savefig(path, dpi=100)


def _open_rgb(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        return None


def _moved(record: dict) -> bool:
    ms_ssim = (record.get("metrics") or {}).get("ms_ssim")
    failed_similarity = any(f.startswith("similarity") for f in record.get("failures") or [])
    return failed_similarity or (ms_ssim is not None and ms_ssim < 1.0 - SIMILARITY_EPS)


def _reference_path(record: dict, run: list[dict], history_dir: Path, baselines_dir: Path) -> Path | None:
    """The stored BF16 reference of the model, else the same run's bf16 image of that model."""
    stored = baselines_dir / str(record.get("gpu_class")) / f"{record['model']}.png"
    if stored.is_file():
        return stored
    bf16 = next((r for r in run if r.get("model") == record.get("model") and Combo.parse(r["combo"]).is_reference
                 and r.get("image") and r is not record), None)
    return history_dir / bf16["image"] if bf16 else None


def _write_grid(path: Path, record: dict, reference: np.ndarray, candidate: np.ndarray, reference_name: str) -> None:
    m = record.get("metrics") or {}
    psnr = m.get("psnr_db")
    difference = np.abs(candidate.astype(np.float32) - reference.astype(np.float32)).mean(axis=2)
    vmax = max(float(np.percentile(difference, 99.9)), 1.0)  # a few hot pixels must not wash out the rest
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    axes = figure.subplots(1, 3)
    # The last two path parts (`<gpu-class>/<model>.png`) say which reference; a full path overflows the panel.
    reference_name = "/".join(Path(reference_name).parts[-2:])
    for ax, image, title in ((axes[0], reference, f"BF16 reference\n{reference_name}"),
                             (axes[1], candidate, f"candidate\n{record.get('image')}")):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    heat = axes[2].imshow(difference, cmap="magma", vmin=0, vmax=vmax)
    axes[2].set_title(f"|candidate − reference|\nmean {difference.mean():.2f}, max {difference.max():.0f}",
                      fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    bar = figure.colorbar(heat, ax=axes[2], shrink=0.85, extend="max" if difference.max() > vmax else "neither")
    bar.set_label("abs difference, mean of RGB (0–255)")
    psnr_text = "inf" if psnr is None else f"{psnr:.2f} dB"
    ssim_text = NONE if m.get("ms_ssim") is None else f"{m['ms_ssim']:.4f}"
    figure.suptitle(f"{record['combo']} — MS-SSIM {ssim_text}, PSNR {psnr_text}", fontsize=12)
    figure.savefig(path, dpi=100)


def _grid(record: dict, run: list[dict], history_dir: Path, baselines_dir: Path, out: Path) -> str | None:
    """Write the combo's grid; returns a note instead when an image is missing or sizes differ."""
    combo = record["combo"]
    if not record.get("image"):
        return f"`{combo}`: no grid, the record names no image"
    candidate = _open_rgb(history_dir / record["image"])
    if candidate is None:
        return f"`{combo}`: no grid, candidate image {history_dir / record['image']} missing or unreadable"
    reference_path = _reference_path(record, run, history_dir, baselines_dir)
    reference = None if reference_path is None else _open_rgb(reference_path)
    if reference is None:
        where = reference_path or f"{baselines_dir / str(record.get('gpu_class')) / (record['model'] + '.png')}"
        return f"`{combo}`: no grid, BF16 reference {where} missing or unreadable (and no bf16 image in this run)"
    if reference.shape != candidate.shape:
        return (f"`{combo}`: no grid, image sizes differ (reference {reference.shape[1::-1]}, "
                f"candidate {candidate.shape[1::-1]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_grid(out, record, reference, candidate, str(reference_path))
    return None


def _footnote(earlier_counts: list[int], written: list[Path], from_verdicts: bool) -> str:
    """What Δ is measured against, what ⚠️ means, and which files came with the summary."""
    if from_verdicts:
        text = ("Δ: against the comparison's baseline, or for combos it did not judge the median of the earlier "
                "runs in the history; `—`: no baseline.")
    else:
        low, high = min(earlier_counts, default=0), max(earlier_counts, default=0)
        text = (f"Δ vs base: base = median of the earlier runs of the same combo, GPU class and profile in the "
                f"history ({low if low == high else f'{low}–{high}'} per combo); `—`: no earlier run.")
    count = lambda folder: sum(path.parent.name == folder for path in written)  # noqa: E731
    return (f"{text} ⚠️ = dequantize fallback (no quantized GEMM ran). Files: `trends/` ({count('trends')} plots), "
            f"`grids/` ({count('grids')} reference / candidate / difference images where MS-SSIM < "
            f"{1 - SIMILARITY_EPS:g}).")


def write_report(history_dir: Path, out_dir: Path, baselines_dir: Path, run_id: str | None = None,
                 verdicts: dict[str, dict] | None = None, progress: Callable[[Path], None] | None = None,
                 decision_settings: decision.Settings | None = None) -> list[Path]:
    """Write summary.md, trends/*.png and grids/*.png for one run (default: the newest), and with
    `decision_settings` decision.md and decision/*.png (also appended to summary.md); returns the paths written.

    `verdicts` (optional, from a comparison module) maps a combo id to a dict; every key is optional:
        "verdict": str                  shown (upper-cased) instead of the record's outcome
        "message": str                  one line listed under the table (leave empty when there is nothing to say)
        "baseline_it_s": float | None   base of the it/s Δ (None: "—") instead of the history median
        "baseline_peak_mem_gib": float | None   base of the memory Δ
    Combos missing from `verdicts` fall back to the record's outcome and the history median.
    """
    history_dir, out_dir, baselines_dir = Path(history_dir), Path(out_dir), Path(baselines_dir)
    records, skipped_files = _read_history(history_dir)
    runs = _run_order(records)
    run_id = run_id or runs[-1]
    if run_id not in runs:
        raise PublishError(f"--run-id {run_id}: no such run in {history_dir} (newest is {runs[-1]})")
    verdicts = verdicts or {}
    _clear_previous_report(out_dir)
    # A combo's last record wins; confirmation re-measurements are verdict evidence, not the combo's result.
    run = list({r["combo"]: r for r in records if r["run_id"] == run_id and r.get("outcome") != REMEASURE}.values())
    regressed = regressions(records, run_id)
    notes = [f"skipped: {message}" for message in skipped_files]
    written: list[Path] = []

    def wrote(path: Path) -> None:
        written.append(path)
        if progress:
            progress(path)

    bases, earlier_counts = {}, []
    for record in run:
        series = _series(record, records, runs) if record.get("outcome") in MEASURED else []
        earlier = series[:-1]
        given = verdicts.get(record["combo"])
        # Without verdicts, the base is the window the history gate judges against (the last comparable runs, none
        # made under host contention or with the gate off), so the Δ beside a verdict measures what it judged.
        window = compare.select_window(records, record) if series and not given else []
        bases[record["combo"]] = {metric: given.get(f"baseline_{metric}") if given else _median(window, metric)
                                  for metric in ("it_s", "peak_mem_gib")}
        if not series:
            continue  # error / skipped: listed in the summary, nothing to plot
        earlier_counts.append(len(earlier))
        name = f"{history.file_name(record['combo'])}.png"
        (out_dir / "trends").mkdir(parents=True, exist_ok=True)
        _write_trend(out_dir / "trends" / name, record, series, bases[record["combo"]])
        wrote(out_dir / "trends" / name)
        if _moved(record):
            note = _grid(record, run, history_dir, baselines_dir, out_dir / "grids" / name)
            if note:
                notes.append(note)
            else:
                wrote(out_dir / "grids" / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    section = "" if decision_settings is None else "\n" + decision.write(run, records, decision_settings, out_dir, wrote,
                                                                        regressed=regressed)
    summary = out_dir / "summary.md"
    card = baselines_dir.parent / "docs" / f"detection-card-{run[0].get('gpu_class')}.md"
    if card.is_file():  # what the gate can and cannot see on this GPU class, measured
        notes.insert(0, f"detection card of this GPU class: `docs/{card.name}`")
    summary.write_text(_summary(run, bases, _footnote(earlier_counts, written, bool(verdicts)), verdicts, notes,
                                regressed)
                       + section)
    wrote(summary)
    return [written[-1], *written[:-1]]


REPORT_FOLDERS = ("trends", "grids", "decision")  # what write_report puts in its out folder, besides these files:
REPORT_FILES = ("summary.md", "decision.md")


def _clear_previous_report(out_dir: Path) -> None:
    """Remove what an earlier report left in `out_dir` (its PNGs and markdown, nothing else), so the folder holds only
    the run it describes: a run with fewer plots must not sit beside the previous run's."""
    for folder in REPORT_FOLDERS:
        for png in (out_dir / folder).glob("*.png"):
            png.unlink()
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
