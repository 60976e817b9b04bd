"""The A/B rule's section of a GPU class's detection card: how often an interleaved A/B run (`python -m fluxgate.ab`)
cries wolf on unchanged code, and how often it sees a slowdown of 1, 2 or 3 %, per combo, from recorded A/A A/B runs.

An A/A A/B run is one whose two sides ran the same tree (equal `ab_tree` digests in the two run files' environments)
with nothing injected (no `ab_inject`) and no host contention. Each of its combos recorded one candidate/base
step-time ratio per block (`ab.ratios`; older records: the per-image medians of each side's pooled steps). Per
combo, the blocks of every such run of the class are pooled, and many sequential A/B comparisons are simulated by
drawing blocks from the pool with replacement and judging after each draw with the real rule (`judging.paired.judge`,
the class's policy: CUDA's, or the CPU's for `cpu`), up to the policy's `max_blocks` (a time budget is not simulated):

- A/A: the drawn ratios as recorded (a side bias the recorded blocks show is the rule's to answer for). A false
  alarm is SLOW or FAST.
- Injected +E %: every drawn ratio times 1 + E (a candidate whose steps are all E % slower). Detected when SLOW.

Each figure is a share of the simulated comparisons, with the mean number of blocks they used; each row says how
many recorded blocks (and runs) it rests on. Resampling a few recorded blocks understates the spread a new run can
meet (a run on another GPU, another day): with fewer than `FEW_BLOCKS` blocks a row says so.
Imports neither torch nor diffusers.
"""

from __future__ import annotations

import math
import random
import statistics
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fluxgate.judging import paired
from fluxgate.storing.record import Record

EFFECTS = (0.01, 0.02, 0.03)
SIMULATIONS = 400
MIN_BLOCKS = 3  # fewer recorded blocks than this: no figures for the combo
FEW_BLOCKS = 20  # fewer than this: the row warns that the shares are optimistic


@dataclass
class AbComboCard:
    """One combo's figures: recorded blocks and runs, their spread, and per effect (0.0 = A/A) the share of simulated
    comparisons per outcome and the mean blocks used."""

    combo: str
    runs: int
    blocks: int
    spread: float  # standard deviation of the recorded blocks' log ratios
    simulations: int = 0
    outcomes: dict[float, dict[str, float]] = field(default_factory=dict)  # effect -> outcome -> share
    mean_blocks: dict[float, float] = field(default_factory=dict)

    @property
    def false_alarms(self) -> float:
        """Share of A/A comparisons that ended SLOW or FAST."""
        shares = self.outcomes.get(0.0, {})
        return shares.get(paired.SLOW, 0.0) + shares.get(paired.FAST, 0.0)

    def detected(self, effect: float) -> float:
        """Share of comparisons with +effect injected that ended SLOW."""
        return self.outcomes.get(effect, {}).get(paired.SLOW, 0.0)


def _image_medians(record: Record) -> list[float]:
    """Per-image median step times of one side's record: its pooled steps cut into `metrics.images` equal parts."""
    steps, images = list(record.metrics.step_times_s or []), record.metrics.images or 0
    if not steps or not images or len(steps) % images:
        return []
    size = len(steps) // images
    return [statistics.median(steps[i * size:(i + 1) * size]) for i in range(images)]


def block_ratios(base: Record, candidate: Record) -> list[float]:
    """The candidate/base ratio of each block of one combo of an A/B run: the recorded `ab.ratios`, else from the
    per-image medians of both sides."""
    recorded = (candidate.extra.get("ab") or {}).get("ratios")
    if recorded:
        return [float(r) for r in recorded if r and math.isfinite(r) and r > 0]
    bases, candidates = _image_medians(base), _image_medians(candidate)
    if len(bases) != len(candidates):
        return []
    return [c / b for b, c in zip(bases, candidates) if b > 0 and c > 0]


def is_a_a(base_env: dict, candidate_env: dict) -> bool:
    """Both sides ran the same tree and nothing was injected."""
    trees = base_env.get("ab_tree"), candidate_env.get("ab_tree")
    return bool(trees[0]) and trees[0] == trees[1] and not base_env.get("ab_inject") and \
        not candidate_env.get("ab_inject")


def aa_blocks(records: Iterable[Record], gpu_class: str) -> dict[str, tuple[list[float], int]]:
    """combo -> (block ratios pooled over the class's A/A A/B runs, how many runs), from history records (both sides'
    run files among them). Runs under host contention are left out."""
    sides: dict[tuple[str, str], dict[str, Record]] = {}
    for record in records:
        env = record.env
        if record.gpu_class != gpu_class or not env.get("ab_run") or env.get("ab_side") not in ("base", "candidate"):
            continue
        sides.setdefault((env["ab_run"], record.combo), {})[env["ab_side"]] = record
    pooled: dict[str, tuple[list[float], int]] = {}
    for (_, combo), pair in sorted(sides.items()):
        base, candidate = pair.get("base"), pair.get("candidate")
        if base is None or candidate is None or not is_a_a(base.env, candidate.env):
            continue
        if (candidate.extra.get("ab") or {}).get("contention"):
            continue
        ratios = block_ratios(base, candidate)
        if ratios:
            blocks, runs = pooled.get(combo, ([], 0))
            pooled[combo] = (blocks + ratios, runs + 1)
    return pooled


def simulate(ratios: Sequence[float], policy: paired.PairedPolicy, effect: float, simulations: int,
             rng: random.Random) -> tuple[dict[str, float], float]:
    """(share of each outcome, mean blocks used) of `simulations` sequential comparisons drawing blocks from `ratios`
    with replacement, each times 1 + effect, judged after each draw by `paired.judge`."""
    counts: dict[str, int] = {}
    used = 0
    for _ in range(simulations):
        drawn: list[float] = []
        while True:
            drawn.append(rng.choice(ratios) * (1 + effect))
            verdict = paired.judge(drawn, policy)
            if verdict is not None:
                break
        counts[verdict.outcome] = counts.get(verdict.outcome, 0) + 1
        used += verdict.blocks
    return {outcome: n / simulations for outcome, n in counts.items()}, used / simulations


def policy_of(gpu_class: str) -> paired.PairedPolicy:
    """The paired policy an A/B run of the class judges with: the CPU's for `cpu`, else CUDA's."""
    return paired.policy_for("cpu" if gpu_class == "cpu" else "cuda")


def build(records: Iterable[Record], gpu_class: str, effects: tuple[float, ...] = EFFECTS,
          simulations: int = SIMULATIONS, seed: int = 0, policy: paired.PairedPolicy | None = None
          ) -> list[AbComboCard]:
    """The section's rows (module docs), sorted by combo; seeded per combo, so the same records give the same card.
    A combo with fewer than MIN_BLOCKS recorded blocks gets a row without figures (`simulations` 0)."""
    policy = policy or policy_of(gpu_class)
    cards = []
    for combo, (ratios, runs) in sorted(aa_blocks(records, gpu_class).items()):
        spread = statistics.stdev(math.log(r) for r in ratios) if len(ratios) > 1 else math.nan
        card = AbComboCard(combo, runs, len(ratios), spread)
        if len(ratios) >= MIN_BLOCKS:
            rng = random.Random(seed * 1_000_003 + zlib.crc32(combo.encode()))
            card.simulations = simulations
            for effect in (0.0, *effects):
                card.outcomes[effect], card.mean_blocks[effect] = simulate(ratios, policy, effect, simulations, rng)
        cards.append(card)
    return cards


def _share(value: float, blocks: float) -> str:
    return f"{value:.0%} ({blocks:.1f} blocks)"


def markdown(cards: list[AbComboCard], gpu_class: str, policy: paired.PairedPolicy | None = None) -> str:
    """The card's A/B section as markdown (empty when there are no A/A A/B records of the class)."""
    if not cards:
        return ""
    policy = policy or policy_of(gpu_class)
    effects = sorted({effect for card in cards for effect in card.outcomes if effect})
    measured = [card for card in cards if card.simulations]
    simulations = max((card.simulations for card in measured), default=0)
    runs = max(card.runs for card in cards)
    lines = ["## The A/B rule (interleaved base and candidate on one GPU)", "",
             f"From recorded A/A A/B runs of {gpu_class} (`python -m fluxgate.ab`, both sides the same tree, nothing "
             f"injected; up to {runs} runs per combo): per combo the recorded blocks' candidate/base ratios are "
             f"pooled and {simulations} sequential comparisons are simulated by drawing blocks with replacement, "
             f"judged after each draw by the A/B rule (`judging.paired`: ±{policy.equivalence:.1%} equivalence, "
             f"{policy.min_effect:.1%} effect, {policy.confidence:.1%} per look, {policy.min_blocks}-"
             f"{policy.max_blocks} blocks; no time budget). A false alarm is SLOW or FAST on the ratios as recorded; "
             "detection is SLOW with every ratio stretched by the effect. Each cell: the share of the simulated "
             "comparisons (the mean blocks they used). Resampled blocks cannot show a spread the recorded ones did "
             f"not have: rows resting on fewer than {FEW_BLOCKS} blocks are marked.", ""]
    if measured:
        alarms = statistics.fmean(card.false_alarms for card in measured)
        lines += [f"A/A false alarms, mean over {len(measured)} combos: **{alarms:.1%}** of simulated comparisons.", ""]
    lines += ["| combo | runs | recorded blocks | block spread | A/A false alarms | A/A SAME | "
              + " | ".join(f"detected at +{e:.0%}" for e in effects) + " | note |",
              "|---|--:|--:|--:|--:|--:|" + "--:|" * len(effects) + "---|"]
    for card in cards:
        spread = "—" if math.isnan(card.spread) else f"{card.spread:.2%}"
        if not card.simulations:
            cells = ["—"] * (2 + len(effects))
            note = f"fewer than {MIN_BLOCKS} recorded blocks: no figures"
        else:
            cells = [_share(card.false_alarms, card.mean_blocks[0.0]),
                     _share(card.outcomes[0.0].get(paired.SAME, 0.0), card.mean_blocks[0.0]),
                     *(_share(card.detected(e), card.mean_blocks[e]) for e in effects)]
            note = f"few blocks ({card.blocks} < {FEW_BLOCKS}): shares are optimistic" if card.blocks < FEW_BLOCKS \
                else ""
        lines.append("| " + " | ".join([f"`{card.combo}`", str(card.runs), str(card.blocks), spread, *cells, note])
                     + " |")
    return "\n".join(lines) + "\n"
