"""The detection card of a GPU class: how often the gate cries wolf on unchanged code, and how often it sees a
slowdown of 1, 2 or 3 %, per combo, from recorded runs.

    python -m fluxgate.card baselines/nvidia-h200/runs --gpu-class nvidia-h200 --out docs/detection-card-nvidia-h200.md

Every usable record (passed or failed, no host contention) of the class is a candidate once, judged against all the
other runs of its combo (leave one out: runs on other machines included), the way a PR run is judged:

- A/A: the candidate as recorded. A false alarm is a history verdict "regression" (fluxgate's rule, `compare`) or a
  missed fixed speed limit of `baselines/<class>/thresholds.toml` (its `speed_statistic`).
- Injected +E %: the candidate's step times stretched by E % (a slower GPU kernel or more host work per step scales
  every step). Detected when the history rule says "regression" or the fixed limit is missed.

Records of A/B runs (`python -m fluxgate.ab`: environment `ab_run`) are no one-sided runs and stay out of these
rows; the A/B rule gets its own section from its recorded A/A runs (`fluxgate.showing.ab_card`).

The counts are small while a class has few runs: each figure says how many comparisons it rests on. A detection
from this card is the first stage of the gate (a real run confirms it by re-measuring); a stretched step is what a
real injected slowdown does to the steps, which GPU runs with tests/injectors check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fluxgate.judging import compare, spread
from fluxgate.storing.record import Record

EFFECTS = (0.01, 0.02, 0.03)


@dataclass
class ComboCard:
    """One combo's counts: comparisons, A/A false alarms, detections per injected effect."""

    combo: str
    comparisons: int = 0
    false_alarms: int = 0
    detected: dict[float, int] = field(default_factory=dict)
    host_synchronous: bool = False
    measured_runs: int = 0  # runs that measured it (usable or not: host contention leaves a run out)


def _fixed_limit_missed(steps: list[float], entry: dict | None) -> bool:
    if not entry or "min_it_s" not in entry:
        return False
    return spread.run_it_s(steps, entry.get("speed_statistic", "median")) < float(entry["min_it_s"])


def _stretched(record: Record, factor: float, order: int) -> Record:
    metrics = replace(record.metrics, step_times_s=[t * factor for t in record.metrics.step_times_s])
    return replace(record, metrics=metrics, run_id=f"card-candidate-{order}",
                   recorded="9999-12-31T23:59:59+00:00")  # after every window run: leave one out, not "the past"


def build(records: list[Record], gpu_class: str, thresholds: dict | None = None,
          effects: tuple[float, ...] = EFFECTS, last_n: int = 5) -> list[ComboCard]:
    """The card's rows (module docs) from the records of `gpu_class`, sorted by combo; `thresholds` is the class's
    parsed thresholds.toml (None: judge the history rule alone). `effects` are fractions (0.01 = +1 %)."""
    usable = spread.usable(records, gpu_class)
    measured = [r for r in records if r.gpu_class == gpu_class and r.measured and not r.env.get("ab_run")]
    cards = []
    for combo in sorted({r.combo for r in measured}):
        runs = [r for r in usable if r.combo == combo]
        model, _, variant = combo.rstrip("]").partition("[")
        entry = (thresholds or {}).get(model, {}).get(variant)
        card = ComboCard(combo, detected={effect: 0 for effect in effects},
                         host_synchronous=any(compare.is_host_synchronous(r) for r in runs),
                         measured_runs=len({r.run_id for r in measured if r.combo == combo}))
        for index, candidate in enumerate(runs):
            window = [r for i, r in enumerate(runs) if i != index]
            if not window:
                continue
            card.comparisons += 1
            for effect in (0.0, *effects):
                stretched = _stretched(candidate, 1 + effect, index)
                verdict = compare.compare_record(window + [stretched], stretched, last_n=last_n)
                alarm = verdict.outcome == compare.REGRESSION or _fixed_limit_missed(
                    stretched.metrics.step_times_s, entry)
                if effect == 0.0:
                    card.false_alarms += alarm
                else:
                    card.detected[effect] += alarm
        cards.append(card)
    return cards


def markdown(cards: list[ComboCard], gpu_class: str, runs: int, ab_cards: list | None = None,
             injected: list | None = None) -> str:
    """The card as markdown: how it was made, the A/A total, one table row per combo (`runs`: runs it rests on);
    then, when there are rows of recorded A/A A/B runs (`ab_card.build`), the A/B rule's section with the real
    injected A/B runs (`ab_card.injected_runs`)."""
    text = _one_sided(cards, gpu_class, runs) if cards else f"# Detection card: {gpu_class}\n"
    if ab_cards:
        from fluxgate.showing import ab_card

        text += "\n" + ab_card.markdown(ab_cards, gpu_class, injected=injected)
    return text


def _one_sided(cards: list[ComboCard], gpu_class: str, runs: int) -> str:
    effects = sorted({effect for card in cards for effect in card.detected})
    total = sum(card.comparisons for card in cards)
    alarms = sum(card.false_alarms for card in cards)
    lines = [f"# Detection card: {gpu_class}", "",
             f"Made by `nox -s card -- {gpu_class}` from {runs} recorded runs (`baselines/{gpu_class}/runs/`). Each "
             "run of a combo is judged against the others (leave one out, other machines included), as recorded "
             "(A/A) and with its step times stretched by each effect; an alarm is a history-rule regression or a "
             "missed fixed speed limit. The fixed limits were derived from these same runs (`nox -s thresholds`), so "
             "their share of the figures is in-sample. See `python -m fluxgate.card --help`.", "",
             f"A/A false alarms over all combos: **{alarms} of {total}** comparisons.", "",
             "| combo | comparisons | A/A false alarms | " + " | ".join(f"detected at +{e:.0%}" for e in effects)
             + " | note |",
             "|---|--:|--:|" + "--:|" * len(effects) + "---|"]
    left_out = [f"`{card.combo}` ({card.measured_runs} measured run(s))" for card in cards if not card.comparisons]
    for card in cards:
        if not card.comparisons:  # listed below the table
            continue
        note = "host-synchronous: the history rule needs 15 %" if card.host_synchronous else ""
        cells = [f"`{card.combo}`", str(card.comparisons), f"{card.false_alarms}/{card.comparisons}",
                 *(f"{card.detected[e]}/{card.comparisons}" for e in effects), note]
        lines.append("| " + " | ".join(cells) + " |")
    if left_out:
        lines += ["", "Left out, fewer than two usable runs to compare (usable: measured, one-sided, not under host "
                  f"contention): {', '.join(left_out)}."]
    return "\n".join(lines) + "\n"
