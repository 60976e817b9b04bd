"""The terminal table of an A/B run (`python -m fluxgate.ab`): one row per combo. Imports neither torch nor diffusers.

    combo            verdict  ratio   interval       image        blocks  seconds  mem ratio  MS-SSIM  limits
    flux1-dev[bf16]  SAME     1.0031  0.9871-1.0194  SAME 1.0012  4       12.3     1.001      1.0000   pass

verdict, ratio: the steps' (the geometric mean of the per-block candidate/base mean step times, every step of each
image); interval: its paired interval at the policy's confidence; image: the whole image's verdict and ratio at the
model's steps (`judging.interleave.image_s`: text encoding, VAE decode and the rest outside the loop included); mem
ratio: median candidate/base peak GiB over the pairs; MS-SSIM: the lowest of the candidate's images against the base's
of the same seed (1.0 = identical); limits: the candidate judged as a one-sided run judges it (`fluxgate ab
--limits`: fixed speed and memory limits, each case against the stored BF16 reference): pass, FAIL (how many missed)
or — (not judged).
"""

from __future__ import annotations

import math

from fluxgate.showing.text import md_text, number

HEADER = ["combo", "verdict", "ratio", "interval", "image", "blocks", "seconds", "mem ratio", "MS-SSIM", "limits"]


def _finite(value: float | None, spec: str) -> str:
    return number(None if value is None or math.isnan(value) else value, spec)


def row(result) -> list[str]:
    """One combo's cells (`fluxgate.judging.interleave.ComboResult`): a memory or similarity failure is added to the
    verdict (`SAME+MEM`, `SAME+SIM`)."""
    verdict = result.verdict
    outcome = verdict.outcome + "".join(f"+{failure.split(':')[0][:3].upper()}" for failure in result.failures)
    interval = "—" if math.isnan(verdict.low) else f"{verdict.low:.4f}-{verdict.high:.4f}"
    image = result.image_verdict
    whole = "—" if image is None else f"{image.outcome} {_finite(image.ratio, '.4f')}"
    return [result.combo, outcome, _finite(verdict.ratio, ".4f"), interval, whole, str(verdict.blocks),
            f"{result.seconds:.1f}", _finite(result.mem_ratio, ".3f"), _finite(result.min_ms_ssim, ".4f"),
            _limits(result)]


def _limits(result) -> str:
    failures = getattr(result, "limit_failures", None)
    if failures is None:
        return "—"
    return f"FAIL ({len(failures)})" if failures else "pass"


def table(results) -> list[str]:
    """The table's lines: header, rule, one row per result, then each result's verdict message and failures."""
    body = [row(result) for result in results]
    widths = [max(len(cells[i]) for cells in [HEADER, *body]) for i in range(len(HEADER))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [line(HEADER), line(["-" * w for w in widths]), *map(line, body)]
    for result in results:
        notes = [result.verdict.message, *([result.image_verdict.message] if result.image_verdict else []),
                 *result.failures, *(result.limit_failures or []),
                 *(f"not judged: {line}" for line in result.judged.get("not_judged") or [])]
        if result.contention:
            notes.append(f"{result.contention}: the verdict rests on a busy machine")
        if result.alternating_loads:
            notes.append("both sides did not fit in device memory at once: loads alternated (each image loads its "
                         "side's pipeline again)")
        lines += [f"{result.combo}: {note}" for note in notes]
    return lines


def markdown(results, errors: list[tuple[str, str]] = (), left_out: list[str] = (), *, wall_s: float | None = None,
             timed_s: float | None = None, title: str = "A/B run", base: str = "", candidate: str = "",
             tradeoffs: list[str] = (), traded_off: int = 0) -> str:
    """An A/B run as markdown (the PR comment's A/B section): a headline (`A/B gate: passed` or `A/B gate: FAILED
    (...)`), the sides, the table, each combo's verdict message and failures, errors, combos left out, the
    trade-offs' lines (`tradeoff_checks.summary_lines`; `traded_off` of them failed), wall time. Messages carry
    text from files and workers (a PR's thresholds.toml, its fixtures' errors): each is escaped (`text.md_text`),
    as the one-sided report's are."""
    failed = [result.combo for result in results if result.failed]
    problems = ([f"{len(failed)} combo(s) SLOW or regressed: {', '.join(failed)}"] if failed else []) + \
        ([f"{len(errors)} combo(s) not measured: {', '.join(combo for combo, _ in errors)}"] if errors else []) + \
        ([f"{traded_off} trade-off(s) against bf16 missed"] if traded_off else [])
    unclear = [r.combo for r in results if "UNKNOWN" in (r.verdict.outcome, getattr(r.image_verdict, "outcome", None))]
    gaps = ([f"{len(unclear)} UNKNOWN"] if unclear else []) + ([f"{len(left_out)} not measured"] if left_out else [])
    # a pass says what it did not judge: an UNKNOWN or a combo the time budget left out is no evidence either way
    headline = (("A/B gate: passed" + (f" (not judged: {', '.join(gaps)})" if gaps else "")) if not problems
                else f"A/B gate: FAILED ({'; '.join(problems)})")
    counts = {}
    for result in results:
        counts[result.verdict.outcome] = counts.get(result.verdict.outcome, 0) + 1
    lines = [f"**{headline}**", "", f"{title}: base {base or '?'}, candidate {candidate or '?'}, interleaved image by "
             "image on one device; verdicts on the paired per-block ratios (candidate/base) of the mean step time and of the "
             "whole image at the model's steps.", ""]
    if counts:
        lines += [", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())), ""]
    body = [row(result) for result in results]
    if body:
        lines += ["| " + " | ".join(HEADER) + " |", "|---|---|" + "--:|" * (len(HEADER) - 2)]
        lines += ["| " + " | ".join([f"`{cells[0]}`", *cells[1:]]) + " |" for cells in body]
        lines.append("")
    notes = []
    for result in results:
        image = result.image_verdict
        for note in [result.verdict.message, *([image.message] if image and image.outcome != "SAME" else []),
                     *result.failures, *(result.limit_failures or []),
                     *([result.contention] if result.contention else [])]:
            if result.verdict.outcome != "SAME" or note is not result.verdict.message:
                notes.append(f"- `{result.combo}`: {md_text(note)}")
        if result.alternating_loads:
            notes.append(f"- `{result.combo}`: both sides did not fit in device memory at once: loads alternated")
    notes += [f"- `{combo}`: ERROR: {md_text(error)}" for combo, error in errors]
    if left_out:
        notes.append(f"- not measured (total time budget spent): {', '.join(f'`{c}`' for c in left_out)}")
    if notes:
        lines += [*notes, ""]
    if tradeoffs:
        lines += [f"- {md_text(line)}" for line in tradeoffs] + [""]
    if wall_s is not None:
        timed = f", of which {timed_s:.0f} s inside timed steps of both sides" if timed_s is not None else ""
        lines.append(f"A/B wall time {wall_s:.0f} s{timed}.")
    return "\n".join(lines).rstrip() + "\n"
