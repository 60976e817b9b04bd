"""Stored baselines, one folder per GPU class: BF16 reference images, thresholds and their provenance.

    baselines/<gpu-class>/thresholds.toml      limits per combo (+ the measured values they came from)
    baselines/<gpu-class>/provenance.json      who made them: per run the machine, versions, command and history
                                               file; per model its image settings and the run that made it
    baselines/<gpu-class>/<model>/<case>.png   the BF16 reference image of each case of each model
                                               (fixtures/prompts.toml names the cases)

`cpu` is the class of the tiny profile on CPU. Thresholds are derived from measurements with stated margins;
similarity limits are set per precision tier (reference / 8bit / 4bit) in the same file.
"""

from __future__ import annotations

import json
import math
import tomllib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import tomli_w
from PIL import Image, UnidentifiedImageError

from fluxgate.errors import BaselineError
from fluxgate.files import atomic_write
from fluxgate.judging import compile_time
from fluxgate.matrix import Combo

THRESHOLDS_FILE = "thresholds.toml"
PROVENANCE_FILE = "provenance.json"
# What a missing or stale baseline's error says to do (a team's repository has no `nox -s baselines`).
WRITE_HINT = ("measure and write them on this GPU class with `pytest <your matrix tests> --write-baselines` "
              "(`nox -s baselines` in fluxgate's own repository)")

# Margins turn a measurement into a limit: min it/s = measured * (1 - speed), max memory = measured * (1 + memory).
# CPU: tiny steps take milliseconds on shared 2-core machines (it/s seen to vary +-40 % run to run, and 3x slower
# while other processes load both cores), and process RSS moves +-25 % with the pytest plugins and allocator state,
# so on CPU speed is a smoke check (fails below a quarter of the measured rate) and memory fails near doubling.
# GPU classes are judged tightly.
_COMPILE = {"compile": compile_time.MARGIN, "compile_slack_s": compile_time.SLACK_S}  # compile time's own bound
DEFAULT_MARGINS = {"cpu": {"speed": 0.75, "memory": 0.75, "ms_ssim": 0.005, "psnr_db": 1.0, **_COMPILE},
                   "gpu": {"speed": 0.1, "memory": 0.05, "ms_ssim": 0.005, "psnr_db": 1.0, **_COMPILE}}
# Similarity floors per precision tier, against the BF16 reference image. Measured on the tiny profile (CPU):
# fp8-scaled 0.998-0.999 / 40-44 dB, gguf-q8_0 0.9996+ / 45-48 dB, nvfp4 0.983-0.993 / 30-34 dB, while zeroing
# the quantized blocks gives 0.64-0.89 / 17-22 dB and 30 % weight noise 0.87-0.95.
DEFAULT_SIMILARITY = {
    "reference": {"min_ms_ssim": 0.999, "min_psnr_db": 45.0},
    "8bit": {"min_ms_ssim": 0.995, "min_psnr_db": 36.0},
    "4bit": {"min_ms_ssim": 0.97, "min_psnr_db": 26.0},
}
# Settings that change the reference image: a baseline made with other values is stale.
IMAGE_SETTINGS = ("profile", "seed", "steps", "size_px", "guidance_scale", "cases")
# The hardware a GPU baseline was measured on: a baseline of another GPU (e.g. through --gpu-class) is stale. Software
# versions (torch, diffusers, CUDA, driver) are not: judging a new version against the old one is the gate's purpose.
HARDWARE_FIELDS = ("device_name", "compute_capability")


@dataclass(frozen=True)
class Thresholds:
    """The limits one combo must meet."""

    min_it_s: float
    max_peak_mem_gib: float
    min_ms_ssim: float
    min_psnr_db: float
    speed_statistic: str = "median"  # which it/s min_it_s bounds: "median" or "p10" step time (`fluxgate.judging.spread`)
    measured_ms_ssim: float | None = None  # the combo's MS-SSIM when its baseline was made (the tripwire's collapse check)
    max_compile_s: float | None = None  # a compiled combo's compile-time bound (`fluxgate.judging.compile_time`)


LIMITS = ("min_it_s", "max_peak_mem_gib", "min_ms_ssim", "min_psnr_db")
SPEED_STATISTICS = ("median", "p10")


@dataclass(frozen=True)
class Baseline:
    """What a combo is judged against on one GPU class."""

    folder: Path
    thresholds: Thresholds | None
    reference_dir: Path  # <folder>/<model>: one PNG per case
    cases: int | None = None  # how many cases the baseline was made with (its limits were derived over them)
    limits_folder: Path | None = None  # where the speed and memory limits come from, when not `folder`

    @property
    def limits_file(self) -> Path:
        """The thresholds.toml the speed and memory limits were read from."""
        return (self.limits_folder or self.folder) / THRESHOLDS_FILE

    def reference(self, case: str) -> Image.Image:
        """The stored BF16 image of `case`; a missing or unreadable file raises BaselineError naming it."""
        path = reference_path(self.folder, self.reference_dir.name, case)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise BaselineError(f"{path}: reference image missing; {WRITE_HINT}") from None
        except (UnidentifiedImageError, OSError) as error:
            raise BaselineError(f"{path}: unreadable reference image ({error})") from None

    def references(self, cases: list[str]) -> dict[str, Image.Image]:
        """The stored BF16 image of every case named, by case."""
        return {case: self.reference(case) for case in cases}


def reference_path(folder: Path, model: str, case: str) -> Path:
    """Where the BF16 image of `model`'s `case` is kept in a class folder."""
    return folder / model / f"{case}.png"


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: no thresholds for this GPU class; {WRITE_HINT}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BaselineError(f"{path}: malformed TOML ({error})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BaselineError(f"{path}: provenance missing; {WRITE_HINT}") from None
    except ValueError as error:
        raise BaselineError(f"{path}: malformed JSON ({error})") from None


def finite_number(value, key: str) -> float:
    """A limit as a number; ValueError naming `key` for NaN or an infinity (either would switch its check off: every
    comparison with NaN is false), TypeError for a non-number (a boolean included). Thresholds files' limits and
    trade-offs (`tradeoff_checks`) alike."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} = {value!r}: not a finite number")
    if not math.isfinite(value):
        raise ValueError(f"{key} = {value}: not a finite number (it would switch the check off)")
    return float(value)


def load(root: Path, gpu_class: str, combo: Combo, settings: dict, environment: dict | None = None) -> Baseline:
    """The baseline of `combo` on `gpu_class`, checked against this run's image `settings` (see IMAGE_SETTINGS) and,
    on a GPU, the hardware in its `environment` fingerprint (see HARDWARE_FIELDS)."""
    folder = root / gpu_class
    thresholds = read_thresholds(root, gpu_class, combo)
    cases = check_fresh(folder / PROVENANCE_FILE, combo.model, settings, environment)
    return Baseline(folder, thresholds, folder / combo.model, cases)


def with_class_limits(baseline: Baseline, limits_root: Path, gpu_class: str, combo: Combo) -> Baseline:
    """`baseline` (references made at other steps, e.g. the PR pass's, with the similarity limits measured at them)
    judged by the speed and memory limits of `limits_root/gpu_class` (the class's, derived from many runs): a step's
    time and the peak memory do not depend on how many steps an image has. Raises BaselineError as `load` does."""
    limits = read_thresholds(limits_root, gpu_class, combo)
    return dataclasses.replace(baseline, limits_folder=Path(limits_root) / gpu_class, thresholds=dataclasses.replace(
        baseline.thresholds, min_it_s=limits.min_it_s, max_peak_mem_gib=limits.max_peak_mem_gib,
        speed_statistic=limits.speed_statistic))


def read_thresholds(root: Path, gpu_class: str, combo: Combo) -> Thresholds:
    """`combo`'s limits in `root/gpu_class/thresholds.toml`, checked to be finite numbers (no freshness check:
    `load` adds it). Raises BaselineError naming the file and the entry."""
    path = root / gpu_class / THRESHOLDS_FILE
    table = _read_toml(path)
    entry = table.get(combo.model, {}).get(combo.variant)
    if entry is None:
        raise BaselineError(f"{path}: no entry [\"{combo.model}\".\"{combo.variant}\"]; {WRITE_HINT}"
                            + (f" -- --runtimes {combo.runtime}" if combo.runtime != "eager" else ""))
    try:
        measured, max_compile = entry.get("measured_ms_ssim"), entry.get("max_compile_s")
        thresholds = Thresholds(**{name: finite_number(entry[name], name) for name in LIMITS},
                                speed_statistic=str(entry.get("speed_statistic", "median")),
                                measured_ms_ssim=None if measured is None else finite_number(measured, "measured_ms_ssim"),
                                max_compile_s=None if max_compile is None else finite_number(max_compile, "max_compile_s"))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BaselineError(f"{path}: [\"{combo.model}\".\"{combo.variant}\"] needs finite numeric "
                            f"{', '.join(LIMITS)} ({type(error).__name__}: {error})") from None
    if thresholds.max_compile_s is not None and thresholds.max_compile_s <= 0:
        raise BaselineError(f"{path}: [\"{combo.model}\".\"{combo.variant}\"] max_compile_s "
                            f"{thresholds.max_compile_s}: a compile-time bound is a number of seconds above 0")
    if thresholds.speed_statistic not in SPEED_STATISTICS:
        raise BaselineError(f"{path}: [\"{combo.model}\".\"{combo.variant}\"] speed_statistic "
                            f"{thresholds.speed_statistic!r}: expected one of {', '.join(SPEED_STATISTICS)}")
    return thresholds


def stored_references(root: Path, gpu_class: str, model: str, settings: dict, cases: list[str],
                      environment: dict | None = None) -> dict[str, Image.Image]:
    """The stored BF16 images of `model`'s `cases`, when they were made with this run's image `settings` on this
    hardware."""
    folder = root / gpu_class
    check_fresh(folder / PROVENANCE_FILE, model, settings, environment)
    return Baseline(folder, None, folder / model).references(cases)


def measured_peak_gib(root: Path, gpu_class: str, combo: Combo) -> tuple[float, Path] | None:
    """The peak memory `combo` was measured with when its baseline was made, if there is one (best effort)."""
    path = root / gpu_class / THRESHOLDS_FILE
    try:
        return float(_read_toml(path)[combo.model][combo.variant]["measured_peak_mem_gib"]), path
    except (BaselineError, KeyError, TypeError, ValueError):
        return None


def _same_setting(key: str, stored, current) -> bool:
    """A stored image setting serves the current one. Cases: the run's cases are the first of the stored ones (a
    baseline made with more cases serves a run that makes fewer)."""
    if key == "cases" and isinstance(stored, list) and isinstance(current, list):
        return 0 < len(current) <= len(stored) and stored[:len(current)] == current
    return stored == current


def _difference(key: str, stored, current) -> str:
    if key == "cases" and isinstance(stored, list) and isinstance(current, list):
        names = [f"{c.get('name')}" if isinstance(c, dict) else str(c) for c in stored]
        now = [f"{c.get('name')}" if isinstance(c, dict) else str(c) for c in current]
        if names[:len(now)] == now:
            return f"cases {', '.join(names)} -> {', '.join(now)} (a case's prompt, seed or input image changed)"
        return f"cases {', '.join(names)} -> {', '.join(now)}"
    return f"{key} {stored!r} -> {current!r}"


def recorded_steps(root: Path, gpu_class: str, model: str) -> int | None:
    """The denoising steps `model`'s stored references on `gpu_class` under `root` were made at; None when the class
    has no readable provenance or no such entry (`load` then names the problem)."""
    try:
        stored = _read_json(Path(root) / gpu_class / PROVENANCE_FILE).get("models", {}).get(model) or {}
    except (BaselineError, OSError, AttributeError):
        return None
    steps = stored.get("steps") if isinstance(stored, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def check_fresh(provenance_path: Path, model: str, settings: dict, environment: dict | None = None) -> int | None:
    """Raise BaselineError naming every image setting, and on a GPU every hardware field, that differs from the ones
    the baseline was made with. Returns how many cases the baseline holds (None: made before cases)."""
    provenance = _read_json(provenance_path)
    stored = provenance.get("models", {}).get(model)
    if stored is None:
        raise BaselineError(f"{provenance_path}: no settings recorded for {model}; {WRITE_HINT}")
    differ = [_difference(key, stored.get(key), settings.get(key)) for key in IMAGE_SETTINGS
              if not _same_setting(key, stored.get(key), settings.get(key))]
    made_on = provenance.get("runs", {}).get(stored.get("run_id"), {}).get("environment") or {}
    if environment and environment.get("device_type") == "cuda" and made_on:
        differ += [f"{key} {made_on.get(key)!r} -> {environment.get(key)!r}" for key in HARDWARE_FIELDS
                   if made_on.get(key) != environment.get(key)]
    if differ:
        raise BaselineError(f"{provenance_path}: stale baseline for {model} (made with other settings: "
                            f"{'; '.join(differ)}); {WRITE_HINT}")
    cases = stored.get("cases")
    return len(cases) if isinstance(cases, list) else None


def margins_of(table: Mapping, gpu_class: str) -> dict:
    """The margins of a parsed thresholds file: its [margins], the class's DEFAULT_MARGINS filling the gaps."""
    return {**DEFAULT_MARGINS["cpu" if gpu_class == "cpu" else "gpu"], **(table.get("margins") or {})}


def similarity_tiers(table: Mapping) -> dict:
    """The similarity floors per tier of a parsed thresholds file: its [similarity.<tier>], DEFAULT_SIMILARITY filling
    the gaps."""
    return {tier: {**limits, **((table.get("similarity") or {}).get(tier) or {})}
            for tier, limits in DEFAULT_SIMILARITY.items()}


@dataclass(frozen=True)
class Measured:
    """One combo's measurements, as `nox -s baselines` records them."""

    combo: Combo
    it_s: float
    peak_mem_gib: float
    ms_ssim: float
    psnr_db: float | None
    compile_s: float | None = None  # compiled combos: seconds spent compiling


def _floor(tier_floor: float, measured: float | None, margin: float) -> tuple[float, bool]:
    """The tier's floor, or, when the measurement is already below it, the measurement less the margin (a regression
    gate: random-weight full-size models amplify quantization error beyond what the tier promises for real weights).
    Returns the floor and whether it is below the tier."""
    if measured is None or measured >= tier_floor:  # None: PSNR of identical images
        return tier_floor, False
    return round(measured - margin, 4), True


def derive(measured: Measured, tier: str, margins: dict, similarity: dict) -> dict:
    """The thresholds entry for one combo: limits from the measurement and margins, plus the measurement."""
    min_ms_ssim, ssim_below = _floor(similarity[tier]["min_ms_ssim"], measured.ms_ssim, margins["ms_ssim"])
    min_psnr_db, psnr_below = _floor(similarity[tier]["min_psnr_db"], measured.psnr_db, margins["psnr_db"])
    return {
        "min_it_s": round(measured.it_s * (1 - margins["speed"]), 4),
        "max_peak_mem_gib": round(measured.peak_mem_gib * (1 + margins["memory"]), 4),
        "min_ms_ssim": min_ms_ssim,
        "min_psnr_db": min_psnr_db,
        "below_tier": ssim_below or psnr_below,
        "measured_it_s": round(measured.it_s, 4),
        "measured_peak_mem_gib": round(measured.peak_mem_gib, 4),
        "measured_ms_ssim": round(measured.ms_ssim, 6),
        "measured_psnr_db": None if measured.psnr_db is None else round(measured.psnr_db, 3),
        "max_compile_s": None if measured.compile_s is None else compile_time.bound(
            measured.compile_s, *compile_time.margins(margins)),
        "measured_compile_s": None if measured.compile_s is None else round(measured.compile_s, 2),
    }


def write(root: Path, gpu_class: str, measured: list[Measured], images: dict[str, dict[str, Image.Image]],
          provenance: dict) -> tuple[Path, list[str]]:
    """Merge new limits, reference images (model -> case -> image) and provenance into `root/gpu_class`; combos not
    re-measured keep theirs. A model's images are replaced as a set: a case no longer made loses its file.
    Returns the folder and the combos whose similarity was already below their tier's floor.

    Margins and similarity floors already in the file (perhaps edited by hand) are kept; defaults fill the gaps."""
    folder = root / gpu_class
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / THRESHOLDS_FILE
    table = _read_toml(path) if path.exists() else {}
    margins, similarity = margins_of(table, gpu_class), similarity_tiers(table)
    try:
        compile_time.margins(margins)
    except ValueError as error:
        raise BaselineError(f"{path}: {error}") from None
    table["margins"], table["similarity"] = margins, similarity
    below_tier = []
    for m in measured:
        entry = derive(m, m.combo.precision_spec.tier, margins, similarity)
        table.setdefault(m.combo.model, {})[m.combo.variant] = {k: v for k, v in entry.items() if v is not None}
        if entry["below_tier"]:
            below_tier.append(m.combo.id)
    for model, cases in images.items():
        for case, image in cases.items():
            atomic_write(reference_path(folder, model, case), lambda tmp, image=image: image.save(tmp, format="PNG"))
        for old in (folder / model).glob("*.png"):
            if old.stem not in cases:
                old.unlink()
        (folder / f"{model}.png").unlink(missing_ok=True)  # the single reference image of fluxgate 0.1
    prov_path = folder / PROVENANCE_FILE
    old = _read_json(prov_path) if prov_path.exists() else {}
    provenance = {**old, **provenance, "models": {**old.get("models", {}), **provenance.get("models", {})},
                  "runs": {**old.get("runs", {}), **provenance.get("runs", {})}}
    header = (f"# fluxgate thresholds for GPU class '{gpu_class}', written by `pytest --write-baselines`.\n"
              "# min_it_s = measured_it_s * (1 - margins.speed); max_peak_mem_gib = measured * (1 + margins.memory);\n"
              "# similarity floors come from [similarity.<tier>] of the combo's precision, except where the measured\n"
              "# value is already below the tier (below_tier = true): there the floor is measured - margins.ms_ssim\n"
              "# (or psnr_db), a regression gate. Compiled combos: max_compile_s = max(measured_compile_s *\n"
              "# (1 + margins.compile), measured_compile_s + margins.compile_slack_s). Edit with care.\n")
    atomic_write(path, lambda tmp: tmp.write_text(header + tomli_w.dumps(table)))
    atomic_write(prov_path, lambda tmp: tmp.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n"))
    return folder, below_tier
