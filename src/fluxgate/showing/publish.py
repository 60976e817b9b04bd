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

The verdict column shows the verdict the gate stored on each record (`storing.verdicts.shown`: against history, or
an A/B run's), never a new judgement; a record without one shows its outcome. "Base" for the Δ columns is the window
the stored verdict was judged against, else the median of the window the history rule would take (records made
before verdicts were stored). Every value from a record is escaped (`text.md_text`): a PR comment renders HTML.
The figures are drawn by `fluxgate.showing.figures`; the history is read through a
`fluxgate.storing.store.HistoryStore`.

    python -m fluxgate.publish --history-dir .fluxgate/history --out .fluxgate/report
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Callable

from fluxgate.errors import FluxgateError
from fluxgate.judging import compare, tradeoff_checks
from fluxgate.matrix import Combo
from fluxgate.showing import decision
from fluxgate.showing.figures import rgb, write_grid, write_trend
from fluxgate.showing.report import VERDICTS, spike_line, sync_line
from fluxgate.showing.text import NONE, md_text, number
from fluxgate.storing import open_store
from fluxgate.storing.record import ERROR, FAILED, REMEASURE, SKIPPED, Record
from fluxgate.storing.names import contained
from fluxgate.storing.store import HistoryStore, file_name
from fluxgate.storing.verdicts import NO_CHANGE, shown

SIMILARITY_EPS = 1e-4  # MS-SSIM further below 1.0 than this counts as "moved" and gets an image grid
CALM_VERDICTS = ("PASS", "OK", "NO CHANGE", "IMPROVEMENT")  # shown plain; every other verdict in bold


class PublishError(FluxgateError):
    """No history to publish, or no such run in it."""


def _read_history(store: HistoryStore) -> tuple[list[Record], list[str]]:
    """All records plus one note per skipped history file; the warnings are re-raised for the caller to see."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = store.load()
    for warning in caught:
        warnings.warn(warning.message, warning.category, stacklevel=3)
    if not records:
        raise PublishError(f"--history-dir {store}: no readable history records (expected <run_id>.json files)")
    return records, [str(warning.message) for warning in caught]


def _run_order(records: list[Record]) -> list[str]:
    """Run ids oldest first (the store loads runs oldest first, and run ids start with the UTC start time)."""
    return list(dict.fromkeys(record.run_id for record in records))


def _series(candidate: Record, records: list[Record], runs: list[str]) -> list[Record]:
    """The measured records of the candidate's combo on its GPU class and profile, up to and including its run."""
    last = runs.index(candidate.run_id)
    key = (candidate.combo, candidate.gpu_class, candidate.profile)
    return [r for r in records if (r.combo, r.gpu_class, r.profile) == key and r.measured
            and runs.index(r.run_id) <= last]


def _median(records: list[Record], metric: str) -> float | None:
    values = [value for r in records if isinstance(value := getattr(r.metrics, metric), (int, float))]
    return statistics.median(values) if values else None


def _delta(value, base) -> str:
    """Relative change in percent, signed; `—` without a base."""
    if value is None or not base:
        return NONE
    return f"{100 * (value - base) / base:+.1f}%"


def _cell(text: str) -> str:
    return md_text(text).replace("|", "\\|")


def _gemm_path(record: Record) -> str:
    label = record.metrics.gemm_label or NONE
    if record.metrics.fallback:
        return f"⚠️ {label}" if "fallback" in label else f"⚠️ {label} (fallback)"
    return label


def _row(record: Record, base: dict, verdict: str) -> list[str]:
    if not record.measured:
        return [f"`{record.combo}`", *[NONE] * 9, verdict]
    m = record.metrics
    psnr_text = "inf" if m.psnr_db is None and m.ms_ssim is not None else number(m.psnr_db, ".2f")
    return [f"`{record.combo}`", number(m.it_s, ".3f"), _delta(m.it_s, base.get("it_s")),
            number(m.peak_mem_gib, ".3f"), _delta(m.peak_mem_gib, base.get("peak_mem_gib")),
            number(m.ms_ssim, ".4f"), psnr_text, NONE if m.mfu_bf16 is None else f"{100 * m.mfu_bf16:.1f}%",
            number(m.energy_j, ".0f"), _gemm_path(record), verdict]


def _verdict(record: Record) -> str:
    text = (shown(record) or VERDICTS.get(record.outcome, "?")).upper()
    return text if text in CALM_VERDICTS else f"**{text}**"


def regressions(records: list[Record], run_id: str) -> set[str]:
    """The combos of run `run_id` whose stored verdict is a regression against history that failed the run (a
    gating run's, confirmed by re-measurement)."""
    return {r.combo for r in records if r.run_id == run_id and r.history_verdict is not None
            and r.history_verdict.fails_run}


def _ab_slow(record: Record) -> int:
    """How many of a record's A/B verdicts (the steps', the whole image's) are SLOW: 0 for a one-sided record."""
    ab = record.ab
    return 0 if ab is None else (ab.outcome == "SLOW") + (ab.image_outcome == "SLOW")


def gate_headline(run: list[Record], regressed: set[str], tradeoffs_missed: int = 0) -> str:
    """One line: did this run pass the gate (every combo inside its limits, no error, no confirmed regression, no
    trade-off against bf16 missed)."""
    slow = [_ab_slow(r) for r in run]
    # a failure besides the A/B SLOW lines (a fixed limit, memory or similarity against the base): a limit missed
    missed = sum(r.outcome == FAILED and len(r.failures or [None]) > n for r, n in zip(run, slow))
    errors = sum(r.outcome == ERROR for r in run)
    slowed = sum(r.outcome == FAILED and n > 0 for r, n in zip(run, slow))
    reasons = [text for count, text in ((slowed, f"{slowed} SLOW against the base (A/B)"),
                                        (missed, f"{missed} missed a limit"), (errors, f"{errors} errors"),
                                        (len(regressed), f"{len(regressed)} regressed against history"),
                                        (tradeoffs_missed, f"{tradeoffs_missed} trade-offs against bf16 missed"))
               if count]
    if not any(r.measured for r in run):
        reasons.append("nothing was measured")
    return f"**Gate: FAILED** ({', '.join(reasons)})" if reasons else "**Gate: passed**"


def _message(record: Record) -> str:
    """The stored verdict's message where it says more than "no change" (A/B: unless SAME), else ""."""
    verdict, ab = record.history_verdict, record.ab
    if verdict is not None and verdict.outcome != NO_CHANGE:
        return verdict.message.removeprefix(f"{record.combo}: ")
    return ab.message if ab is not None and ab.outcome != "SAME" else ""


def _problems(run: list[Record]) -> list[str]:
    """The lines under the table: each failed limit, error or skip reason, and verdict message (escaped)."""
    problems = []
    for record in run:
        problems += [f"- `{record.combo}` {md_text(failure)}" for failure in record.failures or []]
        if record.error:
            kind = SKIPPED if record.outcome == SKIPPED else ERROR
            problems.append(f"- `{record.combo}` {kind}: {md_text(record.error)}")
        if message := _message(record):
            problems.append(f"- `{record.combo}` {md_text(message)}")
    return problems


def _summary(run: list[Record], bases: dict[str, dict], base_note: str, notes: list[str],
             regressed: set[str] = frozenset(), tradeoff_lines: tuple[list[str], int] = ([], 0)) -> str:
    environment = run[0].env
    commit = (environment.get("git_commit") or "")[:10] or "unknown"
    commit += " (dirty)" if environment.get("git_dirty") else ""
    profiles = ", ".join(sorted({str(r.profile) for r in run}))
    counts = {outcome: sum(r.outcome == outcome for r in run) for outcome in VERDICTS}
    cuda = any(r.metrics.on_cuda for r in run)
    lines = [f"### fluxgate · {md_text(environment.get('device_name', 'unknown device'))} · profile "
             f"{md_text(profiles)}",
             f"run `{run[0].run_id}` · commit `{md_text(commit)}` · GPU class `{run[0].gpu_class}` · "
             f"torch {md_text(environment.get('torch', '?'))} · diffusers {md_text(environment.get('diffusers', '?'))}",
             "",
             gate_headline(run, regressed, tradeoff_lines[1]) + " · "
             f"{len(run)} combos: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n), "",
             f"| combo | it/s | Δ vs base | peak {'VRAM' if cuda else 'RSS'} GiB | Δ | MS-SSIM | PSNR dB | MFU | "
             "J/image | GEMM path | verdict |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for record in run:
        row = _row(record, bases[record.combo], _verdict(record))
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    lines += ["", base_note]
    if problems := _problems(run):
        lines += ["", "**Failures, errors and verdict notes**", *problems]
    if tradeoff_lines[0]:
        tally, *moved = tradeoff_lines[0]
        lines += ["", f"**Trade-offs against bf16**: {tally.removeprefix('trade-offs against bf16 ')}",
                  *(f"- {line}" for line in moved)]
    spiked = [f"- `{r.combo}` {line}" for r in run if (line := spike_line(r.metrics))]
    if spiked:
        lines += ["", "**Step spikes** (steps ≥10 % over the median, and what each was waiting for)", *spiked]
    if synced := sync_line(run):
        lines += ["", f"**Host-synchronous combos**: {synced.removeprefix('host-synchronous ')}"]
    if notes:
        lines += ["", "<details><summary>Report notes</summary>", "", *(f"- {md_text(note)}" for note in notes), "",
                  "</details>"]
    return "\n".join(lines) + "\n"


def _moved(record: Record) -> bool:
    ms_ssim = record.metrics.ms_ssim
    failed_similarity = any(f.startswith("similarity") for f in record.failures or [])
    return failed_similarity or (ms_ssim is not None and ms_ssim < 1.0 - SIMILARITY_EPS)


def _reference(record: Record, run: list[Record], store: HistoryStore, baselines_dir: Path):
    """The BF16 reference image of the record's image (its first case; `[H, W, 3]` uint8, None when unreadable) and
    where it is: the stored baseline image of that case, else the same run's bf16 image of that model. None and the
    stored path when there is neither."""
    stored = _stored_reference(record, baselines_dir)
    if stored.is_file():
        return rgb(stored.read_bytes()), str(stored)
    bf16 = next((r for r in run if r.model == record.model and Combo.parse(r.combo).is_reference and r.image
                 and r is not record), None)
    if bf16 is None:
        return None, None
    return rgb(store.read_image(bf16.image)), store.image_location(bf16.image)


def _stored_reference(record: Record, baselines_dir: Path) -> Path:
    """Where the baseline keeps the BF16 image of the record's first case (records made before cases: the model's
    one image)."""
    from fluxgate.judging.baselines import reference_path

    folder = baselines_dir / str(record.gpu_class)
    cases = record.metrics.cases or ()
    if cases and isinstance(cases[0], dict) and cases[0].get("case"):
        return reference_path(folder, str(record.model), str(cases[0]["case"]))
    return folder / f"{record.model}.png"


def _grid(record: Record, run: list[Record], store: HistoryStore, baselines_dir: Path, out: Path) -> str | None:
    """Write the combo's grid; returns a note instead when an image is missing or sizes differ."""
    combo = record.combo
    if not record.image:
        return f"`{combo}`: no grid, the record names no image"
    candidate = rgb(store.read_image(record.image))
    if candidate is None:
        return f"`{combo}`: no grid, candidate image {store.image_location(record.image)} missing or unreadable"
    reference, where = _reference(record, run, store, baselines_dir)
    if reference is None:
        where = where or str(_stored_reference(record, baselines_dir))
        return f"`{combo}`: no grid, BF16 reference {where} missing or unreadable (and no bf16 image in this run)"
    if reference.shape != candidate.shape:
        return (f"`{combo}`: no grid, image sizes differ (reference {reference.shape[1::-1]}, "
                f"candidate {candidate.shape[1::-1]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_grid(out, record, reference, candidate, where)
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


def write_report(store: HistoryStore | Path, out_dir: Path, baselines_dir: Path, run_id: str | None = None,
                 progress: Callable[[Path], None] | None = None,
                 decision_settings: decision.Settings | None = None) -> list[Path]:
    """Write summary.md, trends/*.png and grids/*.png for one run of `store` (default: the newest), and with
    `decision_settings` decision.md and decision/*.png (also appended to summary.md); returns the paths written,
    summary.md first. Raises PublishError when the store holds no readable record or no run `run_id`, OSError when
    a file cannot be written. The verdicts shown are those stored on the records (module docs).
    """
    if isinstance(store, (str, Path)):  # a folder or URL, as the command line gives it
        store = open_store(store)
    out_dir, baselines_dir = Path(out_dir), Path(baselines_dir)
    records, skipped_files = _read_history(store)
    runs = _run_order(records)
    run_id = run_id or runs[-1]
    if run_id not in runs:
        sides = [f"{run_id}-{side}" for side in ("candidate", "base") if f"{run_id}-{side}" in runs]
        hint = f"an A/B run's sides are {' and '.join(sides)}" if sides else f"newest is {runs[-1]}"
        raise PublishError(f"--run-id {run_id}: no such run in {store} ({hint})")
    _clear_previous_report(out_dir)
    # A combo's last record wins; confirmation re-measurements are verdict evidence, not the combo's result.
    run = list({r.combo: r for r in records if r.run_id == run_id and r.outcome != REMEASURE}.values())
    regressed = regressions(records, run_id)
    notes = [f"skipped: {message}" for message in skipped_files]
    written: list[Path] = []

    def wrote(path: Path) -> None:
        written.append(path)
        if progress:
            progress(path)

    bases, earlier_counts = {}, []
    for record in run:
        series = _series(record, records, runs) if record.measured else []
        given = record.history_verdict
        # Without a stored verdict, the base is the window the history gate judges against (the last comparable
        # runs, none made under host contention or with the gate off), so the Δ measures what it would judge.
        window = compare.select_window(records, record) if series and not given else []
        bases[record.combo] = {metric: getattr(given, f"window_{metric}") if given else _median(window, metric)
                               for metric in ("it_s", "peak_mem_gib")}
        if not series:
            continue  # error / skipped: listed in the summary, nothing to plot
        earlier_counts.append(len(series) - 1)
        name = contained(out_dir, out_dir / "trends" / f"{file_name(record.combo)}.png").name
        (out_dir / "trends").mkdir(parents=True, exist_ok=True)
        write_trend(out_dir / "trends" / name, record, series, bases[record.combo])
        wrote(out_dir / "trends" / name)
        if _moved(record):
            note = _grid(record, run, store, baselines_dir, out_dir / "grids" / name)
            if note:
                notes.append(note)
            else:
                wrote(out_dir / "grids" / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    section = "" if decision_settings is None else "\n" + decision.write(run, records, decision_settings, out_dir, wrote,
                                                                        regressed=regressed)
    summary = out_dir / "summary.md"
    card = baselines_dir.parent / "docs" / f"detection-card-{run[0].gpu_class}.md"
    if card.is_file():  # what the gate can and cannot see on this GPU class, measured
        notes.insert(0, f"detection card of this GPU class: `docs/{card.name}`")
    checked = tradeoff_checks.check_run(run, baselines_dir)  # what the run's session checked at its end, said again
    traded = (tradeoff_checks.summary_lines(*checked), sum(v.failed for v in checked[1])) if checked else ([], 0)
    from_verdicts = any(record.history_verdict is not None for record in run)
    summary.write_text(_summary(run, bases, _footnote(earlier_counts, written, from_verdicts), notes,
                                regressed, traded)
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
