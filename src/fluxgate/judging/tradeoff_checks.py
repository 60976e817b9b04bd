"""One run's cross-precision trade-offs checked against its GPU class's limits (`[tradeoffs.<model>.<variant>]`, derived
by `fluxgate.judging.tradeoffs`): memory ratio, speed ratio and quality tier of each quantized combo against bf16 of
the same run, each a `TradeoffVerdict`. A pure library, no torch.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping


from fluxgate.judging import noise, spread
from fluxgate.judging.baselines import finite_number, similarity_tiers
from fluxgate.judging.tradeoffs import (
    ALL,
    CHANGED,
    FAILED,
    MEMORY,
    NOT_CHECKED,
    NOT_IN_RUN,
    PASSED,
    QUALITY,
    SPEED,
    _bf16_id,
    _mem_name,
    _mem_ratio,
    _speed_reason,
)
from fluxgate.storing.record import REMEASURE, Record


@dataclass(frozen=True)
class TradeoffVerdict:
    """One trade-off of one combo in one run: `kind` memory / speed / quality (or all, when none could be checked),
    `status` PASSED / FAILED / NOT_CHECKED / CHANGED (not a failure), and one line naming the numbers, the limit and
    its key in the thresholds file."""

    combo: str
    kind: str
    status: str
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAILED


def check(run_records: Iterable[Record], thresholds_table: Mapping, source: str = "thresholds.toml",
          quality_judged_by: Mapping[str, str] | None = None) -> list[TradeoffVerdict]:
    """The trade-off verdicts of one run's records against `thresholds_table` (a parsed thresholds.toml; `source`
    names it in messages), sorted by combo and kind: every quantized combo of the run, and every combo with a
    trade-off entry whose model's bf16 combo (same runtime) is in the run. A failed record is still a measurement
    and is checked; an error or skipped record is not.
    `quality_judged_by`: combo id -> what judged its images instead (the PR pass's images at fewer steps than the
    table's tiers and noise floor were measured at: their own references' similarity limits); that combo's quality
    trade-off is not checked, saying so, while its memory and speed ratios (per step, whatever the steps) are."""
    from fluxgate.matrix import Combo

    by_combo = {record.combo: record for record in run_records if record.outcome != REMEASURE}
    entries = thresholds_table.get("tradeoffs") or {}
    combos = {c for c, r in by_combo.items() if r.precision not in ("bf16", None)}
    combos |= {f"{model}[{variant}]" for model, variants in entries.items() if isinstance(variants, Mapping)
               for variant in variants if _bf16_id(f"{model}[{variant}]") in by_combo}
    verdicts = []
    for combo_id in sorted(combos):
        combo = Combo.parse(combo_id)
        key = f'[tradeoffs."{combo.model}"."{combo.variant}"]'
        entry = (entries.get(combo.model) or {}).get(combo.variant)
        quantized, bf16 = by_combo.get(combo_id), by_combo.get(_bf16_id(combo_id))

        def verdict(kind: str, status: str, text: str, combo_id: str = combo_id) -> None:
            verdicts.append(TradeoffVerdict(combo_id, kind, status, f"{combo_id} {kind}: {text}"))

        if entry is None:
            verdict(ALL, NOT_CHECKED, f"not checked: no {key} in {source} (derive it with `python -m "
                                      "fluxgate.thresholds`)")
            continue
        malformed = _malformed(entry)
        if malformed:  # this combo fails, naming the key; the others are checked as ever
            verdict(ALL, FAILED, f"{source}: {key} {malformed}")
            continue
        if quantized is None:
            verdict(ALL, NOT_CHECKED, f"not checked: {NOT_IN_RUN}")
            continue
        if not quantized.measured:
            verdict(ALL, NOT_CHECKED, f"not checked: not measured in this run ({quantized.outcome}"
                                      f"{': ' + quantized.error if quantized.error else ''})")
            continue
        if bf16 is None or not bf16.measured:
            why = ("not in this run" if bf16 is None else f"not measured in this run ({bf16.outcome})")
            for kind in (MEMORY, SPEED):
                verdict(kind, NOT_CHECKED, f"not checked: {_bf16_id(combo_id)} {why}, no ratio")
        else:
            verdicts.append(_check_memory(combo_id, quantized, bf16, entry, f"{key}.max_mem_ratio in {source}"))
            verdicts.append(_check_speed(combo_id, quantized, bf16, entry, key, source))
        if combo_id in (quality_judged_by or {}):
            verdict(QUALITY, NOT_CHECKED, f"not checked here: {quality_judged_by[combo_id]}")
        else:
            verdicts.append(_check_quality(combo_id, combo, quantized, entry, thresholds_table, key, source))
    return verdicts


# The entry's numbers a check reads: each, when present, must be a finite number (NaN or an infinity would switch
# its comparison off; a string would raise halfway through the run's checks).
NUMBERS = ("max_mem_ratio", "min_speed_ratio", "max_speed_ratio", "speed_ratio", "tier_min_ms_ssim",
           "measured_min_ms_ssim")


def _malformed(entry) -> str | None:
    """Why a trade-off entry cannot be checked (`key = value: not a finite number`, or not a table), else None."""
    if not isinstance(entry, Mapping):
        return f"is {type(entry).__name__}, not a table"
    for name in NUMBERS:
        if entry.get(name) is not None:
            try:
                finite_number(entry[name], name)
            except (TypeError, ValueError) as error:
                return str(error)
    return None


def _check_memory(combo_id: str, quantized: Record, bf16: Record, entry: Mapping, where: str) -> TradeoffVerdict:
    name = _mem_name(quantized.metrics.mem_kind)
    limit = entry.get("max_mem_ratio")
    ratio = _mem_ratio(quantized, bf16)
    prefix = f"{combo_id} {MEMORY}: "
    if limit is None:
        return TradeoffVerdict(combo_id, MEMORY, NOT_CHECKED, prefix + f"not checked: no max_mem_ratio ({where})")
    if ratio is None:
        return TradeoffVerdict(combo_id, MEMORY, NOT_CHECKED, prefix + "not checked: peak memory missing or of "
                               f"another kind ({quantized.metrics.mem_kind} vs bf16's {bf16.metrics.mem_kind})")
    numbers = (f"peak {name} {ratio:.4f}x bf16's ({quantized.metrics.peak_mem_gib:.3f} / "
               f"{bf16.metrics.peak_mem_gib:.3f} GiB)")
    if ratio > float(limit):
        return TradeoffVerdict(combo_id, MEMORY, FAILED, prefix + f"{numbers} > max {float(limit):.4f}x ({where})")
    return TradeoffVerdict(combo_id, MEMORY, PASSED, prefix + f"{numbers} <= max {float(limit):.4f}x ({where})")


def _check_speed(combo_id: str, quantized: Record, bf16: Record, entry: Mapping, key: str,
                 source: str) -> TradeoffVerdict:
    prefix = f"{combo_id} {SPEED}: "
    low, high = entry.get("min_speed_ratio"), entry.get("max_speed_ratio")
    if low is None:
        return TradeoffVerdict(combo_id, SPEED, NOT_CHECKED, prefix + f"not checked: no min_speed_ratio in {key} "
                               f"({source}): {entry.get('speed_derivation', 'no speed ratio derived')}")
    reason = _speed_reason(quantized) or _speed_reason(bf16)
    gpus = [quantized.gpu_uuid, bf16.gpu_uuid]
    if not reason and gpus[0] != gpus[1]:  # xdist workers: bf16 and the combo ran on two GPUs of the class
        reason = f"measured on two GPUs ({gpus[1] or '?'} for bf16, {gpus[0] or '?'}): their spread is no trade-off"
    if reason:
        return TradeoffVerdict(combo_id, SPEED, NOT_CHECKED, prefix + f"not checked: {reason}")
    statistic = str(entry.get("speed_statistic", spread.STATISTIC))
    q_it_s = spread.run_it_s(quantized.metrics.step_times_s, statistic)
    b_it_s = spread.run_it_s(bf16.metrics.step_times_s, statistic)
    ratio = q_it_s / b_it_s
    center = entry.get("speed_ratio")
    numbers = (f"{ratio:.4f}x bf16's {statistic} it/s ({q_it_s:.3f} / {b_it_s:.3f}; measured "
               f"{float(center):.4f}x)" if center is not None else f"{ratio:.4f}x bf16's {statistic} it/s")
    if ratio < float(low):
        # On a shared CPU (the tiny profile) speed is a smoke check, like its fixed limit: stated, not gated.
        status, note = (CHANGED, ", stated: speed is not gated on a CPU") if quantized.gpu_class == "cpu" else (FAILED, "")
        return TradeoffVerdict(combo_id, SPEED, status, prefix + f"{numbers} < min {float(low):.4f}x: lost speed "
                               f"against bf16 ({key}.min_speed_ratio in {source}{note})")
    if high is not None and ratio > float(high):
        return TradeoffVerdict(combo_id, SPEED, CHANGED, prefix + f"{numbers} > {float(high):.4f}x: faster against "
                               f"bf16 than measured, check and rederive ({key}.max_speed_ratio in {source})")
    return TradeoffVerdict(combo_id, SPEED, PASSED, prefix + f"{numbers} within {float(low):.4f}x-"
                           f"{float(high) if high is not None else math.inf:.4f}x ({key} in {source})")


def _check_quality(combo_id: str, combo, quantized: Record, entry: Mapping, table: Mapping, key: str,
                   source: str) -> TradeoffVerdict:
    """Summary MS-SSIM against the tier's floor, widened by the model's noise floor where thresholds.toml has one
    (independent errors add: the tier's dissimilarity budget + K x d_noise, as `noise` derives the limits)."""
    prefix = f"{combo_id} {QUALITY}: "
    tier = combo.precision_spec.tier
    tier_floor = float(similarity_tiers(table)[tier]["min_ms_ssim"])
    measured_noise = (table.get("noise_floor") or {}).get(combo.model) or {}
    d_noise, k = float(measured_noise.get("d_noise", 0.0)), float(measured_noise.get("k", noise.K))
    floor = tier_floor - k * d_noise
    limit = (f"{tier_floor} - {k:g} x d_noise {d_noise:.6f} = {floor:.6f}" if d_noise else f"{tier_floor}")
    summary = noise.summary_ms_ssim(quantized)
    if summary is None:
        return TradeoffVerdict(combo_id, QUALITY, NOT_CHECKED, prefix + "not checked: no similarity recorded")
    if summary >= floor:
        return TradeoffVerdict(combo_id, QUALITY, PASSED, prefix + f"MS-SSIM {summary:.6f} inside the {tier} tier "
                               f"(>= {limit}: [similarity.{tier}].min_ms_ssim in {source})")
    if entry.get("quality_below_tier"):
        return TradeoffVerdict(combo_id, QUALITY, NOT_CHECKED, prefix + f"MS-SSIM {summary:.6f} below the {tier} "
                               f"tier's {limit}, as measured (measured_min_ms_ssim "
                               f"{entry.get('measured_min_ms_ssim')} in {key}, {source}): stated, not gated here; its "
                               "similarity limit gates it")
    return TradeoffVerdict(combo_id, QUALITY, FAILED, prefix + f"MS-SSIM {summary:.6f} < {limit}: outside the {tier} "
                           f"tier's budget ([similarity.{tier}].min_ms_ssim in {source}; {key} measured it inside)")


def check_run(run_records: list[Record], baselines_dir: Path,
              quality_judged_by: Mapping[str, str] | None = None) -> tuple[Path, list[TradeoffVerdict]] | None:
    """`check` of one run's records against its class's `baselines_dir/<class>/thresholds.toml`: the file and the
    verdicts; None when the run spans no single class, or the file is missing, unreadable or holds no trade-offs
    (the combos already failed naming a missing or broken file)."""
    classes = {r.gpu_class for r in run_records if r.gpu_class}
    if len(classes) != 1:
        return None
    path = Path(baselines_dir) / classes.pop() / "thresholds.toml"
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not table.get("tradeoffs"):
        return None
    return path, check(run_records, table, source=str(path), quality_judged_by=quality_judged_by)


def summary_lines(path: Path, verdicts: list[TradeoffVerdict]) -> list[str]:
    """A tally line, then one `FAIL` line per failed trade-off and one `CHECK` line per changed one."""
    # A combo the run did not select is no finding (as a model left out with --models is none).
    verdicts = [v for v in verdicts if not (v.status == NOT_CHECKED and v.message.endswith(NOT_IN_RUN))]
    order = (PASSED, FAILED, CHANGED, NOT_CHECKED)
    counts = {status: sum(v.status == status for v in verdicts) for status in order}
    lines = [f"trade-offs against bf16 ({path}): "
             + (", ".join(f"{n} {status}" for status, n in counts.items() if n) or "none in this run")]
    lines += [f"CHECK {v.message}" for v in verdicts if v.status == CHANGED]
    lines += [f"FAIL {v.message}" for v in verdicts if v.failed]
    # one line per reason: a reason shared by several combos (a model judged elsewhere) names them together
    reasons: dict[tuple[str, str], list[str]] = {}
    for v in verdicts:
        if v.status == NOT_CHECKED:
            reasons.setdefault((v.kind, v.message.removeprefix(f"{v.combo} {v.kind}: ")), []).append(v.combo)
    lines += [f"NOT CHECKED {', '.join(combos)} {kind}: {reason}" for (kind, reason), combos in reasons.items()]
    return lines


def check_stored(store, run_id: str, baselines_dir: Path,
                 quality_judged_by: Mapping[str, str] | None = None) -> tuple[list[str], int, str | None]:
    """`check_run` of run `run_id` read back from `store` (a HistoryStore): (its `summary_lines`, how many failed,
    None); ([], 0, None) when the run has nothing to check; ([], 0, "trade-offs against bf16 not checked (...)"),
    never an exception, when it cannot be read or checked (the run's end must still print its summary)."""
    from fluxgate.errors import FluxgateError

    try:
        checked = check_run(store.load_run(run_id), baselines_dir, quality_judged_by)
    except (OSError, ValueError, TypeError, FluxgateError) as error:
        return [], 0, f"trade-offs against bf16 not checked ({type(error).__name__}: {error})"
    if checked is None:
        return [], 0, None
    return summary_lines(*checked), sum(verdict.failed for verdict in checked[1]), None
