"""The noise floor: how far a model's BF16 image moves on its own, and the quality limits derived from it.

    python -m fluxgate.thresholds baselines/<class>/runs --gpu-class <class> [--write]

**Noise floor.** Every BF16 record of a class (any runtime: eager and compile; several runs, GPUs, machines; on the
cpu class several runs and thread counts) was compared with the stored reference image when it ran: its per-case
MS-SSIM and PSNR *are* the BF16 image's own variation. Per model:

    d_noise   = max over every case of every bf16 record of (1 - MS-SSIM)
    mse_noise = max over the same of mse / 255^2 = 10^(-PSNR / 10)         (identical images, PSNR inf: 0)

A record with several cases adds its summary (`metrics.ms_ssim` / `psnr_db`, the bound over its cases the gate
compares, which with few cases can lie below the worst case) to its cases here (`judged`).

**Quality limits.** A quantized image differs from the reference by its quantization error plus the BF16 image's
own variation on that machine/runtime; independent errors add (their energies do: both 1 - MS-SSIM and the MSE of
a small error grow with its squared amplitude), so a combo of tier T (`[similarity.T]` in thresholds.toml) gets

    dissimilarity limit = (1 - T.min_ms_ssim)       + K * d_noise      ->  min_ms_ssim = 1 - limit
    MSE limit           = 10^(-T.min_psnr_db / 10)  + K * mse_noise    ->  min_psnr_db = -10 log10(limit)

K = 3 (`K`): the limit admits a machine or runtime whose BF16 deviation carries three times the error energy of the
worst one seen (about 1.7x its amplitude), so the limit holds on another machine of the class, not only on the
ones measured. Where a combo's measured similarity (its recorded runs' worst case, or `measured_ms_ssim` /
`measured_psnr_db` already in the file) is below that tier limit (`below_tier`: synthetic random-weight models
amplify quantization error beyond what the tier promises for real weights), the limit is a regression gate, as
before, widened by the noise floor:

    min_ms_ssim = worst - max(margins.ms_ssim, K * d_noise)
    min_psnr_db = min(worst_db - margins.psnr_db, -10 log10(10^(-worst_db / 10) + K * mse_noise))

Limits are rounded down, never up, so the BF16 records the floor came from meet the BF16 combo's own limit. A floor
resting on one run (one machine) says so in its derivation: it cannot speak for another machine of the class.
A broken bf16 image (`broken_image` names a problem) is a fault, not noise: the model is refused.

A pure library (records in, dataclasses out), no torch.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from fluxgate.storing.record import Record

K = 3.0  # multiple of the noise floor's error energy a limit admits (see the module docs)
NOTE = ("# Similarity limits with a similarity_derivation were derived by `python -m fluxgate.thresholds` from the\n"
        "# BF16 noise floor of [noise_floor.<model>] and the precision's tier (fluxgate.judging.noise).\n")
_OURS = ("# Similarity limits with a similarity_derivation", "# BF16 noise floor of [noise_floor.")
DEFAULT_CASE = "image"  # the one case of a record measured before per-image cases


@dataclass(frozen=True)
class Case:
    """One image of a record, compared with the reference: `psnr_db` None = identical (infinite PSNR)."""

    case: str
    seed: int | None
    ms_ssim: float
    psnr_db: float | None
    broken_image: tuple[str, ...] = ()

    @property
    def dissimilarity(self) -> float:
        return max(0.0, 1.0 - self.ms_ssim)

    @property
    def mse(self) -> float:
        """mse / 255^2 from the PSNR; 0 for identical images."""
        return 0.0 if self.psnr_db is None or math.isinf(self.psnr_db) else 10.0 ** (-self.psnr_db / 10.0)


def _field(item: Any, key: str) -> Any:
    return item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)


def cases(record: Record) -> list[Case]:
    """The record's per-image cases: `metrics.cases` (an attribute, or the `cases` key read into `metrics.extra`);
    a record without cases has its single image as one case (`metrics.ms_ssim` / `psnr_db`). Cases without an
    MS-SSIM are left out; [] when the record has no similarity at all."""
    metrics = record.metrics
    raw = getattr(metrics, "cases", None)
    if raw is None:
        raw = (metrics.extra or {}).get("cases")
    if raw:
        out = []
        for index, item in enumerate(raw):
            ms_ssim = _field(item, "ms_ssim")
            if ms_ssim is None:
                continue
            psnr = _field(item, "psnr_db")
            out.append(Case(str(_field(item, "case") or f"case {index}"), _field(item, "seed"), float(ms_ssim),
                            None if psnr is None else float(psnr), tuple(_field(item, "broken_image") or ())))
        return out
    if metrics.ms_ssim is None:
        return []
    seed = (record.settings or {}).get("seed")
    return [Case(DEFAULT_CASE, seed, float(metrics.ms_ssim), None if metrics.psnr_db is None else float(metrics.psnr_db),
                 tuple(metrics.broken_image or ()))]


SUMMARY_CASE = "summary"


def judged(record: Record) -> list[Case]:
    """What the gate compares with a combo's limits: its cases and, for a record with several cases, its summary
    (`metrics.ms_ssim` / `psnr_db`: the bound over the cases, which with few cases can lie below the worst case).
    A limit derived over these is met by every record it was derived from, whatever the gate compares."""
    found = cases(record)
    metrics = record.metrics
    has_cases = bool(getattr(metrics, "cases", None) or (metrics.extra or {}).get("cases"))
    if found and has_cases and metrics.ms_ssim is not None:
        found.append(Case(SUMMARY_CASE, None, float(metrics.ms_ssim),
                          None if metrics.psnr_db is None else float(metrics.psnr_db)))
    return found


def summary_ms_ssim(record: Record) -> float | None:
    """The combo's summary MS-SSIM: `metrics.ms_ssim` (a lower bound over its cases), else the worst case's."""
    if record.metrics.ms_ssim is not None:
        return float(record.metrics.ms_ssim)
    found = cases(record)
    return min(c.ms_ssim for c in found) if found else None


def psnr_of(mse: float) -> float:
    """PSNR in dB of an mse / 255^2 share; inf for 0."""
    return math.inf if mse <= 0 else -10.0 * math.log10(mse)


def _floor_to(value: float, decimals: int) -> float:
    """`value` rounded down (a limit is never rounded above what it was derived to be)."""
    if math.isinf(value):
        return value
    scale = 10 ** decimals
    return math.floor(value * scale + 1e-9) / scale


def machines(records: Iterable[Record], runs: Iterable[str] | None = None) -> int | None:
    """How many machines `runs` (default: every run of `records`) ran on, as far as `records` tell: runs that share a
    GPU (by UUID) ran on one machine, so this counts the groups of runs linked by shared GPUs (an upper bound: two
    runs on disjoint GPUs of one host count twice). None when no record names a GPU (the cpu class records no
    machine identity)."""
    gpus_of: dict[str, set[str]] = {}
    for record in records:
        gpus_of.setdefault(str(record.run_id), set()).update({record.gpu_uuid} - {""})
    if not any(gpus_of.values()):
        return None
    parent = {run: run for run in gpus_of}

    def root(run: str) -> str:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    owner: dict[str, str] = {}
    for run, gpus in gpus_of.items():
        for gpu in gpus:
            if gpu in owner:
                parent[root(run)] = root(owner[gpu])
            else:
                owner[gpu] = run
    return len({root(run) for run in (gpus_of if runs is None else runs) if run in parent})


def _measurement(record: Record) -> str:
    """The record's profile and image settings but its case list (`same_images` compares that)."""
    settings = {k: v for k, v in (record.settings or {}).items() if k != "cases"}
    return json.dumps([record.profile, settings], sort_keys=True, default=str)


def same_images(record: Record, newest: Record) -> bool:
    """`record` was compared with the reference images `newest` was: the same settings, and its cases the first of
    the newest's or the other way round (a run may make fewer cases than the baseline holds: `--cases`)."""
    if _measurement(record) != _measurement(newest):
        return False
    mine, theirs = (record.settings or {}).get("cases") or [], (newest.settings or {}).get("cases") or []
    shorter = min(len(mine), len(theirs))
    return mine[:shorter] == theirs[:shorter]


@dataclass(frozen=True)
class NoiseFloor:
    """A model's BF16 image variation on one class: worst dissimilarity and MSE share, and what they rest on."""

    model: str
    d_noise: float
    mse_noise: float
    records: int
    cases: int
    run_ids: tuple[str, ...]
    gpus: tuple[str, ...]
    runtimes: tuple[str, ...]
    cpu_threads: tuple[int, ...]
    machines: int | None
    worst: str  # where the worst dissimilarity was seen ("" when every case was identical)

    @property
    def psnr_noise_db(self) -> float:
        return psnr_of(self.mse_noise)

    @property
    def single_run(self) -> bool:
        return len(self.run_ids) == 1

    @property
    def derivation(self) -> str:
        where = [f"{len(self.run_ids)} runs"]
        if self.gpus:
            where.append(f"{len(self.gpus)} GPUs")
        if self.machines is not None:
            where.append(f"{self.machines} machines")
        if self.cpu_threads:
            where.append(f"cpu threads {', '.join(map(str, self.cpu_threads))}")
        where.append(f"runtimes {', '.join(self.runtimes)}")
        if self.d_noise == 0 and self.mse_noise == 0:
            worst = "every case identical to the reference (d_noise 0, PSNR inf)"
        else:
            worst = (f"worst 1 - MS-SSIM {self.d_noise:.6f}{f' ({self.worst})' if self.worst else ''}, worst PSNR "
                     f"{self.psnr_noise_db:.2f} dB")
        text = f"bf16 vs its reference over {self.records} records, {self.cases} cases ({'; '.join(where)}): {worst}"
        if self.single_run:
            text += "; ONE run on one machine: this floor cannot hold another machine of the class"
        elif self.machines == 1:
            text += "; one machine: this floor cannot hold another machine of the class"
        return text

    def to_toml(self) -> dict:
        return {"d_noise": round(self.d_noise, 8), "mse_noise": float(f"{self.mse_noise:.6g}"),
                "psnr_noise_db": self.psnr_noise_db if math.isinf(self.psnr_noise_db) else round(self.psnr_noise_db, 3),
                "k": K, "records": self.records, "cases": self.cases, "runs": list(self.run_ids),
                "gpus": list(self.gpus), "runtimes": list(self.runtimes), "derivation": self.derivation}


def bf16_records(records: Iterable[Record], gpu_class: str) -> list[Record]:
    """The bf16 records of `gpu_class` the floor rests on: measured (passed or failed), any runtime, of one-sided runs
    (an A/B run's sides make their images with their own steps)."""
    return [r for r in records if r.gpu_class == gpu_class and r.precision == "bf16" and r.measured
            and not r.env.get("ab_run")]


def derive_floors(records: list[Record], gpu_class: str) -> dict[str, NoiseFloor]:
    """The noise floor of every model that has records of `gpu_class`, by model.

    Each model's floor rests on its bf16 records made with the newest image settings (the current reference images);
    earlier ones are left out. Raises ValueError (one line naming the model) for a model with no bf16 record with
    similarity, bf16 records of several profiles, or a broken bf16 image."""
    records = [r for r in records if r.gpu_class == gpu_class]
    models = sorted({str(r.model) for r in records if r.model and r.measured})
    if not models:
        raise ValueError(f"{gpu_class}: no measured records to derive a noise floor from")
    floors = {}
    for model in models:
        own = [r for r in bf16_records(records, gpu_class) if r.model == model and cases(r)]
        if not own:
            raise ValueError(f"{model}: no bf16 record with similarity on {gpu_class}: no noise floor (run its bf16 "
                             "combo in these runs)")
        if len({r.profile for r in own}) > 1:
            raise ValueError(f"{model}: bf16 records of other profiles mixed in; give the runs of one profile")
        # The floor is of the newest images: records of earlier image settings (other cases, another seed) were
        # compared with other reference images and are left out.
        newest = max(own, key=lambda r: str(r.recorded or r.run_id or ""))
        own = [r for r in own if same_images(r, newest)]
        d_noise, mse_noise, worst, count = 0.0, 0.0, "", 0
        for record in own:
            for case in judged(record):
                if case.broken_image:
                    raise ValueError(f"{model}: bf16 record of run {record.run_id} ({record.combo}, case {case.case}) "
                                     f"is a broken image ({'; '.join(case.broken_image)}): a fault, not noise; leave "
                                     "that run out or fix it")
                count += case.case != SUMMARY_CASE
                if case.dissimilarity > d_noise:
                    d_noise = case.dissimilarity
                    worst = f"{record.combo} run {record.run_id} case {case.case}"
                mse_noise = max(mse_noise, case.mse)
        threads = sorted({int(r.env["cpu_threads"]) for r in own
                          if r.env.get("device_type") == "cpu" and isinstance(r.env.get("cpu_threads"), int)})
        floors[model] = NoiseFloor(model, d_noise, mse_noise, len(own), count,
                                   tuple(sorted({str(r.run_id) for r in own})),
                                   tuple(sorted({r.gpu_uuid for r in own} - {""})),
                                   tuple(sorted({r.runtime or "eager" for r in own})), tuple(threads),
                                   machines(records, {str(r.run_id) for r in own}), worst)
    return floors


@dataclass(frozen=True)
class QualityLimit:
    """One combo's derived similarity limits and how they came about."""

    combo: str
    tier: str
    min_ms_ssim: float
    min_psnr_db: float
    below_tier: bool
    derivation: str

    def to_toml(self) -> dict:
        return {"min_ms_ssim": self.min_ms_ssim, "min_psnr_db": self.min_psnr_db, "below_tier": self.below_tier,
                "similarity_k": K, "similarity_derivation": self.derivation}


def derive_limits(floors: dict[str, NoiseFloor], table: Mapping, records: list[Record],
                  gpu_class: str) -> dict[str, QualityLimit]:
    """Similarity limits (module docs) for every combo of a model with a noise floor that the records measured or
    the thresholds `table` (a parsed thresholds.toml) has an entry for, by combo id.

    Raises ValueError naming a combo whose recorded runs hold a broken image (a fault is no measurement to derive
    a limit from)."""
    from fluxgate.matrix import Combo

    from fluxgate.judging.baselines import margins_of, similarity_tiers

    tiers, margins = similarity_tiers(table), margins_of(table, gpu_class)
    worst: dict[str, list[float]] = {}  # combo -> [worst ms_ssim, worst psnr (inf: identical)]
    # Only records of each model's newest image settings were compared with the current reference images.
    newest: dict[str, tuple[str, Record]] = {}
    records = [r for r in records if not r.env.get("ab_run")]
    for record in records:
        if record.gpu_class == gpu_class and record.measured and record.model in floors:
            stamp = str(record.recorded or record.run_id or "")
            if stamp >= newest.get(str(record.model), ("", ""))[0]:
                newest[str(record.model)] = (stamp, record)
    for record in records:
        if record.gpu_class != gpu_class or not record.measured or record.model not in floors:
            continue
        if not same_images(record, newest[str(record.model)][1]):
            continue
        for case in judged(record):
            if case.broken_image:
                raise ValueError(f"{record.combo}: run {record.run_id} case {case.case} is a broken image "
                                 f"({'; '.join(case.broken_image)}): no limit is derived from a fault; leave that run "
                                 "out or fix it")
            low = worst.setdefault(record.combo, [math.inf, math.inf])
            low[0] = min(low[0], case.ms_ssim)
            low[1] = min(low[1], math.inf if case.psnr_db is None else case.psnr_db)
    combos = set(worst)
    for model in floors:
        combos |= {f"{model}[{variant}]" for variant, entry in (table.get(model) or {}).items() if isinstance(entry, dict)}
    limits = {}
    for combo_id in sorted(combos):
        combo = Combo.parse(combo_id)
        floor = floors[combo.model]
        tier = combo.precision_spec.tier
        entry = (table.get(combo.model) or {}).get(combo.variant) or {}
        seen = worst.get(combo_id, [math.inf, math.inf])
        ms_ssim_worst = min(seen[0], float(entry.get("measured_ms_ssim", math.inf)))
        psnr_worst = min(seen[1], float(entry.get("measured_psnr_db", math.inf)))  # absent: identical (inf)
        limits[combo_id] = _limit(combo_id, tier, tiers[tier], margins, floor, ms_ssim_worst, psnr_worst)
    return limits


def _limit(combo_id: str, tier: str, tier_floor: Mapping, margins: Mapping, floor: NoiseFloor, ms_ssim_worst: float,
           psnr_worst: float) -> QualityLimit:
    budget_d = 1.0 - float(tier_floor["min_ms_ssim"])
    budget_mse = 10.0 ** (-float(tier_floor["min_psnr_db"]) / 10.0)
    tier_ms_ssim = _floor_to(1.0 - (budget_d + K * floor.d_noise), 6)
    tier_psnr = _floor_to(psnr_of(budget_mse + K * floor.mse_noise), 3)
    parts = []
    if ms_ssim_worst < tier_ms_ssim:  # below the tier: a regression gate from the measured worst
        widen = max(float(margins["ms_ssim"]), K * floor.d_noise)
        min_ms_ssim = _floor_to(ms_ssim_worst - widen, 6)
        parts.append(f"MS-SSIM: measured worst {ms_ssim_worst:.6f} below the {tier} tier's {tier_ms_ssim:.6f}, so "
                     f"worst - max(margin {float(margins['ms_ssim'])}, {K:g} x d_noise {floor.d_noise:.6f}) = "
                     f"{min_ms_ssim:.6f}")
    else:
        min_ms_ssim = tier_ms_ssim
        parts.append(f"MS-SSIM: 1 - ({tier} budget {budget_d:.6f} + {K:g} x d_noise {floor.d_noise:.6f}) = "
                     f"{min_ms_ssim:.6f}")
    below_psnr = psnr_worst < tier_psnr
    if below_psnr:
        min_psnr_db = _floor_to(min(psnr_worst - float(margins["psnr_db"]),
                                    psnr_of(10.0 ** (-psnr_worst / 10.0) + K * floor.mse_noise)), 3)
        parts.append(f"PSNR: measured worst {psnr_worst:.3f} dB below the tier's {tier_psnr:.3f} dB, so "
                     f"min(worst - margin {float(margins['psnr_db'])} dB, worst's MSE + {K:g} x mse_noise) = "
                     f"{min_psnr_db:.3f} dB")
    else:
        min_psnr_db = tier_psnr
        parts.append(f"PSNR: MSE of the tier's {float(tier_floor['min_psnr_db']):g} dB + {K:g} x mse_noise "
                     f"{floor.mse_noise:.3g} = {min_psnr_db:.3f} dB")
    below = ms_ssim_worst < tier_ms_ssim or below_psnr
    text = f"{'; '.join(parts)} (noise floor of {floor.model}: {floor.records} bf16 records, {len(floor.run_ids)} runs"
    text += ", ONE run: cannot hold another machine)" if floor.single_run else ")"
    return QualityLimit(combo_id, tier, min_ms_ssim, min_psnr_db, below, text)


def apply_text(text: str, floors: dict[str, NoiseFloor], limits: dict[str, QualityLimit],
               source: str = "thresholds.toml") -> str:
    """The thresholds file's `text` with [noise_floor.<model>] tables written and each combo's similarity limits
    replaced by the derived ones (speed and memory untouched), the header's comments kept. Raises ValueError naming
    a combo missing from the file."""
    from fluxgate.judging.spread import rewrite, update_entries

    table = tomllib.loads(text)
    update_entries(table, limits, source)
    noise = table.setdefault("noise_floor", {})
    for model, floor in floors.items():
        noise[model] = floor.to_toml()
    return rewrite(text, table, NOTE, _OURS)


def apply(thresholds_path: Path, floors: dict[str, NoiseFloor], limits: dict[str, QualityLimit]) -> str:
    """`apply_text` on the file at `thresholds_path`."""
    return apply_text(thresholds_path.read_text(), floors, limits, str(thresholds_path))
