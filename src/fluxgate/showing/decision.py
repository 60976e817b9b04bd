"""Which precision to ship: per GPU class and model, the measured frontier over precision x runtime x backend, the
cost of each combo from an editable $/GPU-hour table, each precision's fastest measured path (the paths users serve:
compiled or not, diffusers, ComfyUI's comfy-kitchen, torchao), one scatter plot per model and a plain-language
recommendation. Speed ratios are against BF16 of the same runtime (a compiled fp8 against compiled BF16); where that
BF16 was not measured the cell names the BF16 it used.

The rule (stated in the report too): among the combos of a model that passed every assert of their item (speed, VRAM,
similarity), meet the model's quality floor (MS-SSIM and PSNR against the BF16 reference) and fit the VRAM budget,
recommend the one with the highest it/s (ties: the smaller peak VRAM). A combo that failed an assert, errored or was
skipped is never recommended; one that ran a dequantize fallback is marked, since its speed is not what the format
promises on a GPU that has the kernel.

    fixtures/decision.toml   [gpu_hour_usd] per GPU class ("default" for the rest), [quality_floor] per model
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure

from fluxgate import defaults
from fluxgate.errors import FixtureError
from fluxgate.matrix import Combo
from fluxgate.showing.text import number
from fluxgate.storing.record import PASSED, Record

DEFAULT_FILE = defaults.PACKAGED["decision"]  # fluxgate's own prices; a repository's fixtures/decision.toml wins
RULE = ("Recommended: the fastest combo (median it/s) that passed its item's speed, VRAM and similarity asserts, "
        "meets the model's quality floor against the BF16 image and fits the VRAM budget; ties go to the smaller "
        "peak VRAM. Cost per 1000 images = median seconds per image × $/GPU-hour ÷ 3.6.")


@dataclass(frozen=True)
class Settings:
    """What the user decides with: prices, quality floors, a VRAM budget."""

    gpu_hour_usd: dict[str, float]
    quality_floor: dict[str, dict[str, float]]  # model (or "default") -> {"min_ms_ssim", "min_psnr_db"}
    vram_budget_gib: float | None = None
    source: str = str(DEFAULT_FILE)

    @classmethod
    def from_file(cls, path: Path, vram_budget_gib: float | None = None) -> "Settings":
        try:
            data = tomllib.loads(Path(path).read_text())
            prices = {name: float(value) for name, value in data["gpu_hour_usd"].items()}
            floors = {name: {key: float(limit) for key, limit in value.items()}
                      for name, value in data["quality_floor"].items()}
            missing = {"min_ms_ssim", "min_psnr_db"} - floors["default"].keys()
            if missing:
                raise KeyError(f"quality_floor.default.{sorted(missing)[0]}")
        except FileNotFoundError:
            raise FixtureError(f"{path}: decision settings not found (prices and quality floors)") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise FixtureError(f"{path}: malformed TOML ({error})") from None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise FixtureError(f"{path}: needs [gpu_hour_usd] (GPU class = $/hour, and `default`) and "
                               f"[quality_floor.default] with min_ms_ssim and min_psnr_db ({type(error).__name__}: "
                               f"{error})") from None
        if vram_budget_gib is not None and vram_budget_gib <= 0:
            raise FixtureError(f"--vram-budget-gib {vram_budget_gib}: must be a positive number of GiB")
        return cls(prices, floors, vram_budget_gib, str(path))

    def price(self, gpu_class: str) -> float | None:
        return self.gpu_hour_usd.get(gpu_class, self.gpu_hour_usd.get("default"))

    def floor(self, model: str) -> dict[str, float]:
        return {**self.quality_floor["default"], **self.quality_floor.get(model, {})}


def load(path: Path, vram_budget_gib: float | None = None, missing_ok: bool = False) -> Settings | None:
    """Settings from `path`; with `missing_ok` (the default file, not one the user named) a missing file skips the
    decision section with a warning instead of failing the report."""
    if missing_ok and not Path(path).exists():
        warnings.warn(f"{path}: not found, so the report has no 'which precision to ship' section "
                      "(pass --decision-file)", stacklevel=2)
        return None
    return Settings.from_file(path, vram_budget_gib)


@dataclass
class Row:
    """One measured combo as the decision sees it."""

    combo: str
    model: str
    precision: str
    runtime: str
    gpu_class: str
    it_s: float
    peak_gib: float
    ms_ssim: float | None
    psnr_db: float | None  # None: identical to the reference (infinite PSNR)
    seconds_per_image: float
    energy_j_per_image: float | None
    compile_s: float | None
    fallback: bool
    passed: bool
    failures: list[str]
    usd_per_1000: float | None = None
    speedup: float | None = None  # it/s against `speedup_base`'s
    speedup_base: "Row | None" = field(default=None, compare=False, repr=False)  # the BF16 row it divides by
    frontier: bool = False
    quality_ok: bool = False
    fits: bool = True

    @classmethod
    def from_record(cls, record: Record) -> "Row":
        """A measured record's row; its metrics hold it_s, peak_mem_gib and e2e_s (seconds per image). A precision or
        runtime the record lacks is the combo id's (a history file is anyone's to write)."""
        m = record.metrics
        energy = m.energy_j
        combo = Combo.parse(record.combo)
        precision = record.precision if isinstance(record.precision, str) and record.precision else combo.precision
        runtime = record.runtime if isinstance(record.runtime, str) and record.runtime else combo.runtime
        return cls(record.combo, record.model, precision, runtime, str(record.gpu_class),
                   m.it_s, m.peak_mem_gib, m.ms_ssim, m.psnr_db, m.e2e_s,
                   None if energy is None else energy / (m.images or 1), m.compile_s, m.fallback,
                   record.outcome == PASSED, list(record.failures or []))

    @property
    def is_reference(self) -> bool:
        return Combo.parse(self.combo).is_reference

    @property
    def speedup_against(self) -> str:
        """The variant of the BF16 combo the speedup divides by (`bf16-compile`), "" without one."""
        return Combo.parse(self.speedup_base.combo).variant if self.speedup_base else ""

    @property
    def path(self) -> str:
        """How the combo ran: runtime x backend (`eager, diffusers`, `compile, comfy`); a precision or backend this
        installation does not register (a team plugin's, in history) by its name alone."""
        combo = Combo.parse(self.combo)
        try:
            backend = combo.precision_spec.backend
        except KeyError:
            backend = combo.backend or "its default backend"
        return f"{combo.runtime}, {backend}"

    @property
    def tier(self) -> str:
        """The precision's quality tier (`reference`, `8bit`, `4bit`; `?` for one not registered here)."""
        try:
            return Combo.parse(self.combo).precision_spec.tier
        except KeyError:
            return "?"

    def quality_text(self) -> str:
        psnr = "inf" if self.psnr_db is None else f"{self.psnr_db:.1f} dB"
        return f"MS-SSIM {self.ms_ssim:.4f}, PSNR {psnr}" if self.ms_ssim is not None else "similarity not measured"


def _decidable(record: Record) -> bool:
    """A measured record with what a row needs: it/s above 0, peak memory and seconds per image."""
    m = record.metrics
    return record.measured and bool(m.it_s) and m.peak_mem_gib is not None and m.e2e_s is not None


@dataclass
class Decision:
    """One model on one GPU class: its rows (fastest first), the recommendation and what it saves against BF16."""

    gpu_class: str
    model: str
    rows: list[Row]
    reference: Row | None
    recommended: Row | None
    text: str


def _meets(row: Row, floor: dict[str, float]) -> bool:
    return (row.ms_ssim is not None and row.ms_ssim >= floor["min_ms_ssim"]
            and (row.psnr_db is None or row.psnr_db >= floor["min_psnr_db"]))


def _dominated(row: Row, others: list[Row]) -> bool:
    """Another row is at least as fast, as close to BF16 and as small, and better in one of them."""
    def key(r: Row) -> tuple[float, float, float]:
        return r.it_s, r.ms_ssim or 0.0, -r.peak_gib

    return any(all(a >= b for a, b in zip(key(o), key(row))) and key(o) != key(row) for o in others)


def _why_nothing(rows: list[Row], budget: float | None, floor: dict[str, float]) -> str:
    if budget is not None and all(not r.fits for r in rows):
        smallest = min(rows, key=lambda r: r.peak_gib)
        return (f"nothing fits the {budget:g} GiB VRAM budget: the smallest peak is {smallest.peak_gib:.1f} GiB "
                f"(`{smallest.combo}`).")
    reasons = {"failed an assert or did not run": sum(not r.passed for r in rows),
               f"below the quality floor (MS-SSIM {floor['min_ms_ssim']:g}, PSNR {floor['min_psnr_db']:g} dB)":
                   sum(r.passed and not r.quality_ok for r in rows),
               "over the VRAM budget": sum(r.passed and r.quality_ok and not r.fits for r in rows)}
    return "no combo qualifies: " + "; ".join(f"{n} {why}" for why, n in reasons.items() if n) + "."


def _recommendation(rec: Row | None, ref: Row | None, rows: list[Row], settings: Settings, model: str) -> str:
    if rec is None:
        return _why_nothing(rows, settings.vram_budget_gib, settings.floor(model))
    text = f"**`{rec.combo}`** at {rec.it_s:.2f} it/s, {rec.peak_gib:.1f} GiB peak, {rec.quality_text()}"
    if rec.fallback:
        text += " (ran a dequantize fallback GEMM: a GPU with the format's kernel would be faster)"
    if ref is None:
        return text + "; no BF16 eager measurement to compare with."
    if rec is ref:
        return text + ": BF16 eager itself is the best qualifying combo here."
    saving = ""
    if rec.usd_per_1000 is not None and ref.usd_per_1000:
        saving = (f", ${ref.usd_per_1000 - rec.usd_per_1000:.2f} less per 1000 images "
                  f"({100 * (1 - rec.usd_per_1000 / ref.usd_per_1000):.0f} % cheaper)")
    same = ("" if rec.speedup_against in ("", "bf16")
            else f" ({rec.speedup:.2f}× `{rec.speedup_against}`, the same runtime)")
    return (text + f": {rec.it_s / ref.it_s:.2f}× BF16 eager's speed{same}, {rec.peak_gib - ref.peak_gib:+.1f} GiB "
            f"VRAM{saving}.")


def decide(records: list[Record], settings: Settings, references: dict[tuple[str, str], Record] | None = None,
           regressed: set[str] = frozenset()) -> list[Decision]:
    """One Decision per (GPU class, model) among measured `records` (one per combo); `references` may supply the
    BF16 eager record of a (GPU class, model) the records lack (e.g. from an earlier run). A combo in `regressed`
    regressed against history in this run: it is not passed, so never recommended."""
    rows = [Row.from_record(r) for r in records if _decidable(r)]
    for row in rows:
        if row.combo in regressed:
            row.passed = False
            row.failures.append("regression against history in this run")
    decisions = []
    for gpu_class, model in dict.fromkeys((r.gpu_class, r.model) for r in rows):
        group = sorted((r for r in rows if (r.gpu_class, r.model) == (gpu_class, model)), key=lambda r: -r.it_s)
        reference = next((r for r in group if r.is_reference), None)
        if reference is None and references and (gpu_class, model) in references:
            reference = Row.from_record(references[gpu_class, model])
        price, floor = settings.price(gpu_class), settings.floor(model)
        bf16 = {Combo.parse(r.combo).runtime: r for r in group
                if r.precision == "bf16" and not Combo.parse(r.combo).backend}  # per runtime
        if reference is not None:
            bf16.setdefault("eager", reference)
        for row in group:
            row.usd_per_1000 = None if price is None else row.seconds_per_image * price / 3.6
            against = bf16.get(Combo.parse(row.combo).runtime) or bf16.get("eager")
            if against is not None:
                row.speedup, row.speedup_base = row.it_s / against.it_s, against
            row.quality_ok = _meets(row, floor)
            row.fits = settings.vram_budget_gib is None or row.peak_gib <= settings.vram_budget_gib
        if reference is not None and reference.usd_per_1000 is None and price is not None:
            reference.usd_per_1000 = reference.seconds_per_image * price / 3.6
        passed = [r for r in group if r.passed]
        for row in passed:
            row.frontier = not _dominated(row, passed)
        qualifying = [r for r in passed if r.quality_ok and r.fits]
        recommended = min(qualifying, key=lambda r: (-r.it_s, r.peak_gib)) if qualifying else None
        decisions.append(Decision(gpu_class, model, group, reference, recommended,
                                  _recommendation(recommended, reference, group, settings, model)))
    return decisions


def _speedup_text(row: Row) -> str:
    """The speed ratio against BF16, naming the BF16 combo when it is not the same runtime's (no compiled BF16 was
    measured: an eager BF16 is not a fair base for a compiled combo, and the cell says so)."""
    if row.speedup is None:
        return "-"
    runtime = Combo.parse(row.combo).runtime
    base = Combo.parse(row.speedup_base.combo).runtime if row.speedup_base else runtime
    return f"{row.speedup:.2f}" + ("" if base == runtime else f" (vs `{row.speedup_against}`: no {runtime} BF16)")


def served_paths(decision: Decision) -> list[str]:
    """Markdown lines: per precision, its fastest measured path (runtime x backend) among the combos that passed
    their asserts, with its speed against BF16 of the same runtime, VRAM, quality tier and cost."""
    best: dict[str, Row] = {}
    for row in decision.rows:  # fastest first
        if row.passed and row.precision not in best:
            best[row.precision] = row
    if not best:
        return []
    lines = ["Fastest measured path per precision (combos that passed their asserts):", "",
             "| precision | tier | fastest path (runtime, backend) | it/s | × BF16 (same runtime) | peak VRAM GiB | "
             "$/1000 img |", "|---|---|---|--:|--:|--:|--:|"]
    for precision, row in best.items():
        lines.append(f"| {precision} | {row.tier} | `{row.combo}` ({row.path}) | {row.it_s:.3f} | "
                     f"{_speedup_text(row)} | {row.peak_gib:.2f} | {number(row.usd_per_1000, '.3f')} |")
    return lines


def markdown(decisions: list[Decision], settings: Settings, plots: dict[tuple[str, str], str] | None = None) -> str:
    """The decision section: the rule, then per GPU class and model a table and the recommendation."""
    budget = "none" if settings.vram_budget_gib is None else f"{settings.vram_budget_gib:g} GiB"
    lines = ["### Which precision to ship", "", RULE,
             f"VRAM budget: {budget}. Prices and quality floors: `{settings.source}`.", ""]
    for d in decisions:
        floor, price = settings.floor(d.model), settings.price(d.gpu_class)
        lines += [f"#### {d.model} on {d.gpu_class}", "",
                  f"Quality floor MS-SSIM ≥ {floor['min_ms_ssim']:g}, PSNR ≥ {floor['min_psnr_db']:g} dB; "
                  f"{'$' + format(price, '.2f') + '/GPU-hour' if price is not None else 'no price for this class'}.",
                  "", "| combo | it/s | × BF16 (same runtime) | peak VRAM GiB | MS-SSIM | PSNR dB | J/image | "
                  "$/1000 img | compile s | notes |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in d.rows:
            notes = [n for n, on in (("recommended", r is d.recommended), ("frontier", r.frontier),
                                     ("fallback GEMM", r.fallback), ("failed asserts", not r.passed),
                                     ("below quality floor", r.passed and not r.quality_ok),
                                     ("over VRAM budget", not r.fits)) if on]
            psnr = "inf" if r.psnr_db is None and r.ms_ssim is not None else number(r.psnr_db, ".1f")
            name = f"**`{r.combo}`**" if r is d.recommended else f"`{r.combo}`"
            lines.append(f"| {name} | {r.it_s:.3f} | {_speedup_text(r)} | {r.peak_gib:.2f} | "
                         f"{number(r.ms_ssim, '.4f')} | {psnr} | {number(r.energy_j_per_image, '.0f')} | "
                         f"{number(r.usd_per_1000, '.3f')} | {number(r.compile_s, '.1f')} | {', '.join(notes)} |")
        if d.reference is not None and d.reference not in d.rows:
            lines += ["", f"BF16 eager reference from an earlier run: {d.reference.it_s:.3f} it/s, "
                          f"{d.reference.peak_gib:.2f} GiB."]
        lines += ["", *served_paths(d), "", f"Recommendation: {d.text}"]
        if plots and (d.gpu_class, d.model) in plots:
            lines += ["", f"Scatter plot: `{plots[d.gpu_class, d.model]}`"]
        lines.append("")
    if not decisions:
        lines.append("No measured combos to decide from.")
    return "\n".join(lines).rstrip() + "\n"


def scatter(path: Path, decision: Decision, settings: Settings) -> None:
    """it/s against MS-SSIM vs BF16, marker area proportional to peak VRAM; eager and compile in two colours,
    failed combos as crosses, fallback-GEMM combos hollow, the recommendation ringed, the quality floor dashed."""
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(9, 5.5), layout="constrained")
    ax = figure.subplots()
    largest = max(r.peak_gib for r in decision.rows)
    colours = {"eager": "tab:blue", "compile": "tab:green"}

    def area(row: Row) -> float:
        return 60 + 900 * row.peak_gib / largest

    for r in decision.rows:
        x = r.ms_ssim if r.ms_ssim is not None else float("nan")
        colour = colours.get(r.runtime, "tab:purple")
        if not r.passed:
            ax.scatter([x], [r.it_s], s=area(r), marker="X", color="tab:red", alpha=0.8, zorder=3)
        else:
            ax.scatter([x], [r.it_s], s=area(r), facecolors="none" if r.fallback else colour, edgecolors=colour,
                       linewidths=2, alpha=0.75, zorder=3)
        combo = Combo.parse(r.combo)
        label = r.precision + (f"@{combo.backend}" if combo.backend else "")
        ax.annotate(f"{label}\n{r.peak_gib:.1f} GiB", (x, r.it_s), textcoords="offset points", xytext=(10, 4),
                    fontsize=8)
    if decision.recommended is not None:
        rec = decision.recommended
        ax.scatter([rec.ms_ssim], [rec.it_s], s=area(rec) + 500, facecolors="none", edgecolors="tab:orange",
                   linewidths=2.5, zorder=4)
    floor = settings.floor(decision.model)["min_ms_ssim"]
    ax.axvline(floor, color="tab:red", linestyle="--", linewidth=1)
    if decision.reference is not None:
        ax.axhline(decision.reference.it_s, color="grey", linestyle=":", linewidth=1)
    low, high = ax.get_xlim()
    ax.set_xlim(low, high + 0.12 * (high - low))  # room for the labels of the points nearest 1.0
    runtimes = dict.fromkeys(r.runtime for r in decision.rows)
    handles = [*(Line2D([], [], marker="o", linestyle="", color=colours.get(name, "tab:purple"), label=name)
                 for name in runtimes),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="grey",
                      label="fallback GEMM (hollow)"),
               Line2D([], [], marker="X", linestyle="", color="tab:red", label="failed asserts"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="tab:orange",
                      markeredgewidth=2.5, markersize=12, label="recommended"),
               Line2D([], [], color="tab:red", linestyle="--", label=f"quality floor {floor:g}"),
               Line2D([], [], color="grey", linestyle=":", label="BF16 eager it/s")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="marker area = peak VRAM", title_fontsize=8)
    ax.set_xlabel("MS-SSIM vs BF16 reference image (right = closer)")
    ax.set_ylabel("it/s (median denoising step)")
    ax.grid(True, alpha=0.3)
    figure.suptitle(f"{decision.model} on {decision.gpu_class}: speed vs quality", fontsize=11)
    figure.savefig(path, dpi=100)


def write(run: list[Record], records: list[Record], settings: Settings, out_dir: Path,
          wrote: Callable[[Path], None], regressed: set[str] = frozenset()) -> str:
    """decision.md and the scatter plots; returns the markdown. A model whose BF16 eager combo is not in this run is
    compared with the newest such record of the same GPU class, profile and image settings in the history. Combos in
    `regressed` (a regression against history in this run) count as not passed: never recommended."""
    def same_images(a: Record, b: Record) -> bool:
        return (a.model, a.gpu_class, a.profile, a.settings) == (b.model, b.gpu_class, b.profile, b.settings)

    references = {}
    for record in records:
        if Combo.parse(record.combo).is_reference and record.measured and any(same_images(record, r) for r in run):
            references[str(record.gpu_class), record.model] = record  # newest wins
    decisions = decide(run, settings, references, regressed)
    plots = {}
    for d in decisions:
        (out_dir / "decision").mkdir(parents=True, exist_ok=True)
        path = out_dir / "decision" / f"{d.gpu_class}.{d.model}.png"
        scatter(path, d, settings)
        wrote(path)
        plots[d.gpu_class, d.model] = f"decision/{path.name}"
    text = markdown(decisions, settings, plots)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decision.md").write_text(text)
    wrote(out_dir / "decision.md")
    return text
