"""The report's figures (`fluxgate.showing.publish` decides which and where): a combo's trend over its runs, and the
reference | candidate | difference grid of an image that moved. Matplotlib's object API, no pyplot state.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from fluxgate.showing.text import NONE
from fluxgate.storing.record import FAILED, Record

TREND_PANELS = (  # metric, axis label, key of its limit in the record's thresholds
    ("it_s", "it/s (median step)", "min_it_s"),
    ("peak_mem_gib", "peak memory GiB", "max_peak_mem_gib"),
    ("ms_ssim", "MS-SSIM vs BF16 ref", "min_ms_ssim"),
)


def _run_label(record: Record) -> str:
    try:
        return datetime.fromisoformat(record.recorded).strftime("%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(record.run_id)[:13]


def _tick_indices(count: int, most: int = 8) -> list[int]:
    """Evenly spaced run indices to label, at most about `most`, always the first and the last (this run)."""
    step = -(-count // most)
    ticks = list(range(0, count, step))
    if count - 1 - ticks[-1] <= step / 2 and len(ticks) > 1:
        ticks.pop()  # too close to this run's label
    return sorted({*ticks, count - 1})


def write_trend(path: Path, candidate: Record, series: list[Record], base: dict) -> None:
    """A PNG at `path`: three stacked axes (it/s, peak memory GiB, MS-SSIM) over `series`, the candidate's measured
    runs oldest first ending with its own; its limits dashed, `base` (metric -> value or None) dotted. Raises
    OSError when the file cannot be written."""
    figure = Figure(figsize=(9, 7.2), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    xs = np.arange(len(series))
    failed = np.array([r.outcome == FAILED for r in series])
    thresholds = candidate.thresholds or {}
    for ax, (metric, label, limit_key) in zip(axes, TREND_PANELS):
        ys = np.array([getattr(r.metrics, metric) for r in series], dtype=float)  # None -> nan
        if metric == "peak_mem_gib":
            label = "peak VRAM GiB" if candidate.metrics.on_cuda else "peak RSS GiB"
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
        if ax.get_legend_handles_labels()[0]:  # a panel with no limit, no base and legend off has nothing to name
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xticks(ticks := _tick_indices(len(series)), [_run_label(series[i]) for i in ticks])
    axes[-1].set_xlim(-0.6, len(series) - 0.4)
    axes[-1].tick_params(axis="x", labelrotation=30)
    axes[-1].set_xlabel(f"run (UTC), {len(series)} measured run(s) on {candidate.gpu_class} / {candidate.profile}")
    figure.suptitle(f"{candidate.combo} — trend (this run: {candidate.run_id})", fontsize=11)
    figure.savefig(path, dpi=100)


def rgb(data: bytes | None) -> np.ndarray | None:
    """PNG (or any PIL-readable) bytes as an `[H, W, 3]` uint8 array, None when missing or unreadable."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError):
        return None


def write_grid(path: Path, record: Record, reference: np.ndarray, candidate: np.ndarray, reference_name: str) -> None:
    """A PNG at `path`: reference | candidate | heat map of their mean absolute RGB difference (0-255). Both images
    are `[H, W, 3]` uint8 of one size. Raises OSError when the file cannot be written."""
    m = record.metrics
    difference = np.abs(candidate.astype(np.float32) - reference.astype(np.float32)).mean(axis=2)
    vmax = max(float(np.percentile(difference, 99.9)), 1.0)  # a few hot pixels must not wash out the rest
    figure = Figure(figsize=(13, 4.8), layout="constrained")
    axes = figure.subplots(1, 3)
    # The last two path parts (`<gpu-class>/<model>.png`) say which reference; a full path overflows the panel.
    reference_name = "/".join(Path(reference_name).parts[-2:])
    for ax, image, title in ((axes[0], reference, f"BF16 reference\n{reference_name}"),
                             (axes[1], candidate, f"candidate\n{record.image}")):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    heat = axes[2].imshow(difference, cmap="magma", vmin=0, vmax=vmax)
    axes[2].set_title(f"|candidate − reference|\nmean {difference.mean():.2f}, max {difference.max():.0f}",
                      fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    bar = figure.colorbar(heat, ax=axes[2], shrink=0.85, extend="max" if difference.max() > vmax else "neither")
    bar.set_label("abs difference, mean of RGB (0–255)")
    psnr_text = "inf" if m.psnr_db is None else f"{m.psnr_db:.2f} dB"
    ssim_text = NONE if m.ms_ssim is None else f"{m.ms_ssim:.4f}"
    figure.suptitle(f"{record.combo} — MS-SSIM {ssim_text}, PSNR {psnr_text}", fontsize=12)
    figure.savefig(path, dpi=100)
