"""Speed limits from measured spread: a GPU class's minimum it/s per combo, derived from several recorded runs on
several GPUs of that class instead of one run less a fixed margin.

    python -m fluxgate.thresholds baselines/nvidia-h200/runs --baselines-dir baselines --gpu-class nvidia-h200 [--write]

For each combo, every usable record (outcome passed or failed, no host contention) gives one value: the it/s at the
10th-percentile step time of its timed steps (`STATISTIC`). A low quantile, not the median: on eager host-bound
combos the median wanders with host jitter (FLUX.1-dev fp8 eager: medians 245-291 ms/step on two H200 machines of
unchanged code, minima 244.4-245.1 ms), while a slower GPU or more host work per step moves the fast steps too.

    center  = median of the per-run values
    sigma   = (max - min) / d2(n)        the range estimate of sigma (d2: expected range of n normal draws)
    margin  = max(MIN_MARGIN, Z * sigma / center)
    min_it_s = center * (1 - margin)

Z = 3.09 puts a new run of the same code on another GPU of the class below the limit about once in 1000 (if per-run
values are normal). The range covers run-to-run and GPU-to-GPU spread together, so a class needs runs on at least
`MIN_GPUS` GPUs (by UUID). MIN_MARGIN keeps a lucky agreement of few runs from making a limit tighter than the
history gate's own minimum effect. A host-synchronous combo (its step waits for the GPU in every layer, so its speed
follows the host CPU: `compare.is_host_synchronous`) has the history gate's larger minimum effect as its floor
(`compare.Policy.host_sync_min_speed_effect`: FLUX.1-dev nvfp4 eager ran 12.9 % apart on two fresh H100 machines).
The derivation is written beside each limit in thresholds.toml.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from fluxgate.judging.window import contention, workload
from fluxgate import stats
from fluxgate.storing.record import Record

STATISTIC = "p10"  # it/s at the 10th-percentile step time (thresholds.toml: speed_statistic)
Z = 3.09  # one-sided normal quantile of 0.1 %
MIN_MARGIN = 0.03
MAX_MARGIN = 0.25  # wider than this, the runs disagree: a limit would gate nothing
MIN_RUNS = 3
MIN_GPUS = 2


def run_it_s(step_times_s: list[float], statistic: str = STATISTIC) -> float:
    """Steps per second of one record's timed steps (seconds each) at `statistic`: 'median' or 'p10' (the
    10th-percentile step time, i.e. the fast steps). Raises ValueError for an unknown statistic or no steps."""
    summary = stats.step_stats(step_times_s)
    if statistic == "median":
        return 1.0 / summary.median_s
    if statistic == "p10":
        return 1.0 / summary.p10_s
    raise ValueError(f"unknown speed statistic {statistic!r}: 'median' or 'p10'")


@dataclass(frozen=True)
class SpeedLimit:
    """One combo's derived limit: `min_it_s` and what it rests on (it/s values per run, the GPUs they ran on)."""

    combo: str
    min_it_s: float
    center_it_s: float
    margin: float
    values_it_s: tuple[float, ...]
    run_ids: tuple[str, ...]
    gpus: tuple[str, ...]  # distinct GPU UUIDs
    floor: float = MIN_MARGIN  # the smallest margin allowed (larger for a host-synchronous combo)

    @property
    def derivation(self) -> str:
        spread = (max(self.values_it_s) - min(self.values_it_s)) / self.center_it_s
        at_floor = " (the floor)" if self.margin == self.floor else ""
        kind = ", host-synchronous" if self.floor != MIN_MARGIN else ""
        return (f"{STATISTIC} it/s of {len(self.values_it_s)} runs on {len(self.gpus)} GPUs: median "
                f"{self.center_it_s:.4f}, range {spread:.2%}; margin max({self.floor:.0%}{kind}, {Z} sigma) = "
                f"{self.margin:.2%}{at_floor}")

    def to_toml(self) -> dict:
        return {"min_it_s": round(self.min_it_s, 4), "speed_statistic": STATISTIC,
                "speed_center_it_s": round(self.center_it_s, 4), "speed_margin": round(self.margin, 4),
                "speed_runs": list(self.run_ids), "speed_gpus": list(self.gpus), "speed_derivation": self.derivation}


def _d2(n: int) -> float:
    from fluxgate.judging.compare import expected_range

    return expected_range(n)


def band(values, floor: float) -> tuple[float, float]:
    """(center, margin) of per-run values: center = their median, margin = max(`floor`, Z * sigma / center) with
    sigma = their range / d2(n) (0 for one value). The rule of the speed limits, and of the trade-offs' speed band."""
    values = np.asarray(values, dtype=float)
    center = float(np.median(values))
    sigma = float(values.max() - values.min()) / _d2(len(values)) if len(values) > 1 else 0.0
    return center, max(floor, Z * sigma / center)


def usable(records: Iterable[Record], gpu_class: str) -> list[Record]:
    """The records of `gpu_class` a speed limit (or the detection card) rests on: measured (passed or failed), with
    step times, not under host contention, of a one-sided run (an A/B run's sides have their own steps per image and
    their own rule: `fluxgate.showing.ab_card`)."""
    return [r for r in records if r.gpu_class == gpu_class and r.measured and r.metrics.step_times_s
            and contention(r) is None and not r.env.get("ab_run")]


def derive(records: list[Record], gpu_class: str, skipped: list[str] | None = None) -> dict[str, SpeedLimit]:
    """The speed limit of every combo with enough usable records of `gpu_class` (see the module docs), by combo id.
    A combo with fewer than MIN_RUNS runs or MIN_GPUS distinct GPUs (e.g. one compile run) is left out, with a line
    in `skipped` when a list is given.

    Raises ValueError when no combo has enough runs (naming those that lack them), or naming the combos whose runs
    mix profiles or settings, or whose runs lie too far apart."""
    from fluxgate.judging.compare import DEFAULT_POLICY, is_host_synchronous

    values: dict[str, list[tuple[float, str, str]]] = {}
    settings_of: dict[str, set[str]] = {}  # each combo's (profile, workload): one measurement, not several
    host_synchronous: set[str] = set()
    for record in usable(records, gpu_class):
        if is_host_synchronous(record):
            host_synchronous.add(record.combo)
        uuid = record.gpu_uuid
        measurement = json.dumps([record.profile, workload(record.settings)], sort_keys=True, default=str)
        settings_of.setdefault(record.combo, set()).add(measurement)
        values.setdefault(record.combo, []).append((run_it_s(record.metrics.step_times_s), str(record.run_id), uuid))
    short = [f"{combo} ({len(v)} runs, {len({u for _, _, u in v if u})} GPUs)" for combo, v in sorted(values.items())
             if len(v) < MIN_RUNS or len({u for _, _, u in v if u}) < MIN_GPUS]
    if len(short) == len(values):  # nothing to derive (a combo measured too rarely alone is left out, and said)
        raise ValueError(f"{gpu_class}: too few runs to derive speed limits (need {MIN_RUNS} runs on {MIN_GPUS} GPUs "
                         f"per combo): {', '.join(short) or 'no usable records'}")
    if skipped is not None:
        skipped += [f"{entry}: too few runs for a speed limit (need {MIN_RUNS} on {MIN_GPUS} GPUs); its limit is left "
                    "as it is" for entry in short]
    values = {combo: v for combo, v in values.items()
              if len(v) >= MIN_RUNS and len({u for _, _, u in v if u}) >= MIN_GPUS}
    mixed = [combo for combo, kinds in sorted(settings_of.items()) if len(kinds) > 1]
    if mixed:
        raise ValueError(f"{gpu_class}: runs of other profiles or image settings mixed in for {', '.join(mixed)}; "
                         "give the runs of one profile and one set of settings")
    limits = {}
    for combo, entries in sorted(values.items()):
        it_s = np.array([value for value, _, _ in entries])
        floor = DEFAULT_POLICY.host_sync_min_speed_effect if combo in host_synchronous else MIN_MARGIN
        center, margin = band(it_s, floor)
        if margin > MAX_MARGIN:  # a limit this loose gates nothing: an outlier run, not a spread
            raise ValueError(f"{combo}: runs too far apart for a speed limit ({', '.join(f'{v:.3f}' for v in it_s)} "
                             f"it/s: margin {margin:.0%} > {MAX_MARGIN:.0%}); find the outlier run before deriving")
        limits[combo] = SpeedLimit(combo, center * (1 - margin), center, margin, tuple(float(v) for v in it_s),
                                   tuple(run for _, run, _ in entries), tuple(sorted({u for _, _, u in entries if u})),
                                   floor)
    return limits


def rewrite(text: str, table: dict, note: str, ours: tuple[str, ...]) -> str:
    """A thresholds file's new text: `text`'s header comments except the lines starting with `ours` (the previous
    version of `note`), then `note`, then `table` as TOML."""
    import tomli_w

    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#") and not line.startswith(ours))
    return header + note + tomli_w.dumps(table)


NOTE = ("# Speed limits with speed_statistic = \"p10\" were derived by `python -m fluxgate.thresholds` from the runs\n"
        "# named in speed_runs (see speed_derivation); the speed failure compares that statistic.\n")
_OURS = ("# Speed limits with speed_statistic", "# named in speed_runs")  # the note, as any version wrote it


def apply_text(text: str, limits: dict[str, SpeedLimit], source: str = "thresholds.toml") -> str:
    """The thresholds file's `text` with each combo's speed limit replaced by its derived one (memory and similarity
    limits untouched). Raises ValueError naming a combo missing from the file (`source`)."""
    table = tomllib.loads(text)
    update_entries(table, limits, source)
    return rewrite(text, table, NOTE, _OURS)


def update_entries(table: dict, limits: dict, source: str = "thresholds.toml") -> None:
    """Merge each derived limit's `to_toml()` into its combo's entry of the parsed thresholds `table`. Raises
    ValueError naming a combo missing from the file (`source`)."""
    from fluxgate.matrix import Combo

    for combo_id, limit in limits.items():
        combo = Combo.parse(combo_id)
        entry = table.get(combo.model, {}).get(combo.variant)
        if entry is None:
            raise ValueError(f"{source}: no entry for {combo_id}; write baselines for it first")
        entry.update(limit.to_toml())


def apply(thresholds_path: Path, limits: dict[str, SpeedLimit]) -> str:
    """`apply_text` on the file at `thresholds_path`."""
    return apply_text(thresholds_path.read_text(), limits, str(thresholds_path))
