"""Cross-precision trade-offs per GPU class: what a user relies on when picking a precision, measured and gated.

    python -m fluxgate.thresholds baselines/<class>/runs --gpu-class <class> [--write]

From recorded runs in which a model's bf16 combo and a quantized combo of the same runtime were measured in the
SAME run (one machine, one code version), per quantized combo:

1. **Memory**: the ratio of peak memory, quantized / bf16 (`metrics.peak_mem_gib`: CUDA max allocated; on the cpu
   class process RSS). Limit: `max_mem_ratio` = the largest ratio measured x (1 + `MEMORY_TOLERANCE`): 2 % on a GPU
   (allocated bytes are near deterministic: the H200 runs' ratios agree to 0.03 %), 25 % on CPU (RSS moves +-25 %
   with allocator state and pytest plugins).
2. **Speed**: the ratio of it/s at the p10 step time (`spread.run_it_s(steps, "p10")`), quantized / bf16. The
   ratio is stated as measured (eager FP8 slower than BF16 on Hopper is a fact to hold, not a bug to fix):

       center = median of the per-run ratios;  sigma = (max - min) / d2(n)
       band   = max(floor, Z * sigma / center)                 Z = spread.Z (3.09)
       min_speed_ratio = center * (1 - band)                   a run below it lost speed-up: FAILED
       max_speed_ratio = center * (1 + band)                   a run above it: "changed, check", not a failure

   floor: 3 % on a GPU (`spread.MIN_MARGIN`), 15 % for a host-synchronous combo (its speed follows the host CPU:
   `compare.Policy.host_sync_min_speed_effect`), 50 % on CPU (tiny steps of milliseconds on a shared 2-core
   machine: a neighbour's burst can land on one combo of a run and not on the other); on the cpu class a ratio
   below its band is stated ("changed, check"), not failed: CPU speed is a smoke check. Records under host contention
   (`window.contention`) or whose xdist workers shared a GPU give no speed ratio.
3. **Quality**: the combo's summary MS-SSIM (a lower bound over its cases) inside its tier's budget
   (`[similarity.<tier>].min_ms_ssim`). A combo whose recorded runs were already below the tier (synthetic
   random-weight models) is stated as below tier: not a failure, its similarity limit gates it.

Stored as [tradeoffs."<model>"."<variant>"] in thresholds.toml with a derivation per part. `check` judges one run's
records against them. A pure library, no torch.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from fluxgate.judging import noise, spread
from fluxgate.judging.baselines import similarity_tiers
from fluxgate.judging.window import workload
from fluxgate.storing.record import REMEASURE, Record

PASSED, FAILED, NOT_CHECKED, CHANGED = "passed", "failed", "not checked", "changed, check"
NOT_IN_RUN = "not in this run"
MEMORY, SPEED, QUALITY, ALL = "memory", "speed", "quality", "all"
MEMORY_TOLERANCE = {"gpu": 0.02, "cpu": 0.25}
SPEED_FLOOR = {"gpu": spread.MIN_MARGIN, "cpu": 0.50}
MAX_BAND = {"gpu": spread.MAX_MARGIN, "cpu": 0.90}  # wider than this, the runs disagree: find the outlier
NOTE = ("# [tradeoffs.<model>.<variant>]: a quantized combo's peak memory and p10 speed against bf16's of the same run,\n"
        "# and its quality against its tier, derived by `python -m fluxgate.thresholds` (fluxgate.judging.tradeoffs).\n")
_OURS = ("# [tradeoffs.<model>.<variant>]", "# and its quality against its tier, derived")


def _kind(gpu_class: str) -> str:
    return "cpu" if gpu_class == "cpu" else "gpu"


def _mem_name(mem_kind: str | None) -> str:
    return "VRAM" if str(mem_kind or "").startswith("cuda") else "RSS"


def _ceil_to(value: float, decimals: int = 4) -> float:
    return math.ceil(value * 10 ** decimals - 1e-9) / 10 ** decimals


def _floor_to(value: float, decimals: int = 4) -> float:
    return noise._floor_to(value, decimals)


def _bf16_id(combo_id: str) -> str:
    from fluxgate.matrix import Combo

    combo = Combo.parse(combo_id)
    return Combo(combo.model, "bf16", combo.runtime).id


def _speed_reason(record: Record) -> str | None:
    """Why a record's steps give no speed ratio, or None."""
    from fluxgate.judging.window import contention

    if not record.metrics.step_times_s:
        return "no step times"
    if record.env.get("shared_gpu"):
        return "its xdist workers shared a GPU"
    return contention(record)


def _mem_ratio(quantized: Record, bf16: Record) -> float | None:
    q, b = quantized.metrics, bf16.metrics
    if q.peak_mem_gib is None or not b.peak_mem_gib or q.mem_kind != b.mem_kind:
        return None
    return float(q.peak_mem_gib) / float(b.peak_mem_gib)


def _speed_ratio(quantized: Record, bf16: Record, statistic: str = spread.STATISTIC) -> float | None:
    """Quantized / bf16 it/s at `statistic`, None where it is no trade-off: contention, a shared GPU, or the two on
    different GPUs (xdist workers)."""
    if _speed_reason(quantized) or _speed_reason(bf16) or quantized.gpu_uuid != bf16.gpu_uuid:
        return None
    return spread.run_it_s(quantized.metrics.step_times_s, statistic) / spread.run_it_s(bf16.metrics.step_times_s,
                                                                                         statistic)


@dataclass(frozen=True)
class Tradeoff:
    """One quantized combo's trade-offs against bf16 on a class, and what they rest on."""

    combo: str
    gpu_class: str
    runs: tuple[str, ...]
    mem_kind: str
    mem_ratios: tuple[float, ...]
    speed_ratios: tuple[float, ...]  # () when no run gave one
    host_synchronous: bool
    tier: str
    tier_min_ms_ssim: float
    worst_ms_ssim: float | None  # over every measured record of the combo (not only the paired ones)

    @property
    def memory_tolerance(self) -> float:
        return MEMORY_TOLERANCE[_kind(self.gpu_class)]

    @property
    def max_mem_ratio(self) -> float:
        return _ceil_to(max(self.mem_ratios) * (1 + self.memory_tolerance))

    @property
    def speed_floor(self) -> float:
        floor = SPEED_FLOOR[_kind(self.gpu_class)]
        if self.host_synchronous:
            from fluxgate.judging.compare import DEFAULT_POLICY

            floor = max(floor, DEFAULT_POLICY.host_sync_min_speed_effect)
        return floor

    @property
    def speed_center(self) -> float | None:
        return float(np.median(self.speed_ratios)) if self.speed_ratios else None

    @property
    def speed_band(self) -> float | None:
        return spread.band(self.speed_ratios, self.speed_floor)[1] if self.speed_ratios else None

    @property
    def below_tier(self) -> bool:
        return self.worst_ms_ssim is not None and self.worst_ms_ssim < self.tier_min_ms_ssim

    @property
    def statement(self) -> str:
        from fluxgate.matrix import Combo

        combo = Combo.parse(self.combo)
        speed = f"{self.speed_center:.2f}x bf16's speed ({spread.STATISTIC} step) and " if self.speed_ratios else ""
        return (f"{combo.runtime} {combo.precision} {combo.model} runs at {speed}{max(self.mem_ratios):.2f}x its peak "
                f"{_mem_name(self.mem_kind)} on {self.gpu_class}")

    @property
    def mem_derivation(self) -> str:
        values = ", ".join(f"{v:.4f}" for v in self.mem_ratios)
        return (f"peak {_mem_name(self.mem_kind)} quantized / bf16 of the same run, {len(self.mem_ratios)} runs: "
                f"{values}; max {max(self.mem_ratios):.4f} x (1 + {self.memory_tolerance:.0%}) = {self.max_mem_ratio}")

    @property
    def speed_derivation(self) -> str:
        if not self.speed_ratios:
            return "no run gave a speed ratio (contended, shared GPU or no step times): not gated"
        n = len(self.speed_ratios)
        spread_pct = (max(self.speed_ratios) - min(self.speed_ratios)) / self.speed_center
        kind = ", cpu" if _kind(self.gpu_class) == "cpu" else ", host-synchronous" if self.host_synchronous else ""
        at_floor = " (the floor)" if self.speed_band == self.speed_floor else ""
        one = "; ONE run: the band is the floor alone" if n == 1 else ""
        return (f"{spread.STATISTIC} it/s quantized / bf16 of the same run, {n} runs: median {self.speed_center:.4f}, "
                f"range {spread_pct:.2%}; band max({self.speed_floor:.0%}{kind}, {spread.Z} sigma) = "
                f"{self.speed_band:.2%}{at_floor}: below {_floor_to(self.speed_center * (1 - self.speed_band))} fails "
                f"(lost speed-up), above {_ceil_to(self.speed_center * (1 + self.speed_band))} is a change to check"
                f"{one}")

    @property
    def quality_derivation(self) -> str:
        if self.worst_ms_ssim is None:
            return f"no similarity recorded; the {self.tier} tier needs MS-SSIM >= {self.tier_min_ms_ssim}"
        if self.below_tier:
            return (f"measured worst MS-SSIM {self.worst_ms_ssim:.6f} is below the {self.tier} tier's "
                    f"{self.tier_min_ms_ssim} (synthetic weights): stated as below tier, gated by its similarity limit")
        return f"measured worst MS-SSIM {self.worst_ms_ssim:.6f} inside the {self.tier} tier (>= {self.tier_min_ms_ssim})"

    def to_toml(self) -> dict:
        out = {"statement": self.statement, "runs": list(self.runs), "mem_kind": self.mem_kind,
               "mem_ratio": round(max(self.mem_ratios), 4), "max_mem_ratio": self.max_mem_ratio,
               "mem_ratios": [round(v, 5) for v in self.mem_ratios], "mem_derivation": self.mem_derivation}
        if self.speed_ratios:
            center, band = self.speed_center, self.speed_band
            out.update({"speed_statistic": spread.STATISTIC, "speed_ratio": round(center, 4),
                        "speed_band": round(band, 4), "min_speed_ratio": _floor_to(center * (1 - band)),
                        "max_speed_ratio": _ceil_to(center * (1 + band)),
                        "speed_ratios": [round(v, 5) for v in self.speed_ratios]})
        out["speed_derivation"] = self.speed_derivation
        out.update({"quality_tier": self.tier, "tier_min_ms_ssim": self.tier_min_ms_ssim,
                    "quality_below_tier": self.below_tier, "quality_derivation": self.quality_derivation})
        if self.worst_ms_ssim is not None:
            out["measured_min_ms_ssim"] = round(self.worst_ms_ssim, 6)
        return out


def _latest(records: Iterable[Record]) -> dict[tuple[str, str], Record]:
    """(run id, combo) -> its record (the last one read), re-measurements left out."""
    out = {}
    for record in records:
        if record.outcome != REMEASURE:
            out[(str(record.run_id), record.combo)] = record
    return out


def derive(records: list[Record], gpu_class: str, table: Mapping | None = None) -> dict[str, Tradeoff]:
    """The trade-offs of every quantized combo of `gpu_class` measured in a run together with its model's bf16 combo
    of the same runtime, by combo id; `table` (the parsed thresholds.toml) gives the tier floors (defaults without).

    Raises ValueError when no run pairs a quantized combo with bf16, a combo's pairs mix profiles or image settings,
    or a combo's speed ratios lie too far apart (an outlier run)."""
    from fluxgate.judging.compare import is_host_synchronous
    from fluxgate.matrix import Combo

    tiers = similarity_tiers(table or {})
    latest = _latest(r for r in records if r.gpu_class == gpu_class and not r.env.get("ab_run"))  # one-sided runs
    pairs: dict[str, list[tuple[Record, Record]]] = {}
    worst: dict[str, float] = {}
    for (run, combo_id), record in sorted(latest.items()):
        if not record.measured or record.precision == "bf16" or record.precision is None:
            continue
        for value in noise.judged(record):  # its cases and its summary
            worst[combo_id] = min(worst.get(combo_id, math.inf), value.ms_ssim)
        bf16 = latest.get((run, _bf16_id(combo_id)))
        if bf16 is not None and bf16.measured and _mem_ratio(record, bf16) is not None:
            pairs.setdefault(combo_id, []).append((bf16, record))
    if not pairs:
        raise ValueError(f"{gpu_class}: no run measured a quantized combo together with its model's bf16 combo (same "
                         "runtime): no trade-off to derive")
    out = {}
    for combo_id, found in sorted(pairs.items()):
        # Memory and speed depend on the workload, not on what the images show (prompts, seeds, cases).
        kinds = {json.dumps([q.profile, workload(q.settings)], sort_keys=True, default=str) for _, q in found}
        if len(kinds) > 1:
            raise ValueError(f"{combo_id}: runs of other profiles or workloads (steps, size) mixed in; give the runs "
                             "of one profile and one workload")
        speed = tuple(r for r in (_speed_ratio(q, b) for b, q in found) if r is not None)
        tier = Combo.parse(combo_id).precision_spec.tier
        tradeoff = Tradeoff(combo_id, gpu_class, tuple(str(q.run_id) for _, q in found), str(found[0][1].metrics.mem_kind),
                            tuple(_mem_ratio(q, b) for b, q in found), speed,
                            any(is_host_synchronous(q) for _, q in found), tier,
                            float(tiers[tier]["min_ms_ssim"]), worst.get(combo_id))
        if speed and tradeoff.speed_band > MAX_BAND[_kind(gpu_class)]:
            raise ValueError(f"{combo_id}: speed ratios too far apart for a trade-off ({', '.join(f'{v:.3f}' for v in speed)}"
                             f": band {tradeoff.speed_band:.0%} > {MAX_BAND[_kind(gpu_class)]:.0%}); find the outlier "
                             "run before deriving")
        out[combo_id] = tradeoff
    return out


def apply_text(text: str, tradeoffs: dict[str, Tradeoff]) -> str:
    """The thresholds file's `text` with [tradeoffs.<model>.<variant>] written for every derived combo (the others
    kept), the header's comments kept."""
    from fluxgate.matrix import Combo

    table = tomllib.loads(text)
    section = table.setdefault("tradeoffs", {})
    for combo_id, tradeoff in tradeoffs.items():
        combo = Combo.parse(combo_id)
        section.setdefault(combo.model, {})[combo.variant] = tradeoff.to_toml()
    return spread.rewrite(text, table, NOTE, _OURS)


def apply(thresholds_path: Path, tradeoffs: dict[str, Tradeoff]) -> str:
    """`apply_text` on the file at `thresholds_path`."""
    return apply_text(thresholds_path.read_text(), tradeoffs)
