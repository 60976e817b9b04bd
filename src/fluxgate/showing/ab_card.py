"""The A/B rule's section of a GPU class's detection card: how often an interleaved A/B run (`python -m fluxgate.ab`)
cries wolf on unchanged code, and how often it sees a slowdown of 1, 2, 3, 5 or 8 %, per combo, from recorded A/A A/B
runs.

An A/A A/B run is one whose two sides ran the same tree (equal `ab_tree` digests in the two run files' environments)
with nothing injected (no `ab_inject`) and no host contention. Each of its combos recorded one candidate/base
step-time ratio per block (`paired.block_ratio`: the mean steps of its two images, recomputed from the recorded
steps), and whether the rule sets it aside as disturbed
(`judging.paired.disturbance`). Per combo, many sequential A/B comparisons are simulated: each picks one usable
recorded run and takes its blocks in a random order (without replacement: a live run on that load), then draws from
the same run again up to the policy's `max_blocks`, judging after each block with the real rule (`paired.Blocks`,
`paired.judge`; the class's policy: CUDA's, or the CPU's for `cpu`; host-synchronous combos
`paired.host_synchronous`). Each load of both sides is a run here (a combo judged again on a second load recorded
two); a SLOW or FAST under the rule's `confirm_below` is judged again on another recorded load, as a live run's second
load judges it (`paired.confirm`). A time budget is not simulated.

- A/A: the drawn ratios as recorded (a side bias the recorded blocks show is the rule's to answer for). A false
  alarm is SLOW or FAST.
- Injected +E %: every drawn ratio times 1 + E (a candidate whose steps are all E % slower). Detected when SLOW.

Each figure is a share of the simulated comparisons, with the mean number of blocks they judged; each row says how
many recorded runs and blocks it rests on. Recorded runs understate the spread a new run can meet (another GPU,
another day), and a run shorter than the policy's `max_blocks` repeats its blocks in the later draws: such rows say so.
Real A/B runs with a slowdown injected (`injected_runs`) are listed beside the resampled figures they check.
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
from fluxgate.showing.text import counted
from fluxgate.storing.record import Record

EFFECTS = (0.01, 0.02, 0.03, 0.05, 0.08)  # +5 and +8 %: what host-synchronous combos can show
SIMULATIONS = 400
MIN_BLOCKS = 3  # no recorded run of this many blocks: no figures for the combo
MIN_RUN_BLOCKS = 5  # simulations draw from runs of this many blocks when the combo has one


@dataclass
class AbComboCard:
    """One combo's figures: recorded blocks and runs, their spread, and per effect (0.0 = A/A) the share of simulated
    comparisons per outcome and the mean blocks used."""

    combo: str
    runs: int  # usable runs the simulations draw from
    blocks: int  # their blocks
    spread: float  # standard deviation of their blocks' log ratios
    disturbed: int = 0  # of those blocks, the disturbed ones (`paired.disturbance`)
    recorded_runs: int = 0  # A/A runs of the combo recorded, usable or not (`usable`)
    longest: int = 0  # blocks of the longest usable run
    host_synchronous: bool = False  # judged with `paired.host_synchronous`
    left_out: list[tuple[int, float]] = field(default_factory=list)  # (blocks, geometric mean ratio) of unused runs
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


def _images(record: Record) -> list[list[float]]:
    """One side's per-image step times: its pooled steps cut into `metrics.images` equal parts ([] when they do not
    divide)."""
    steps, images = list(record.metrics.step_times_s or []), record.metrics.images or 0
    if not steps or not images or len(steps) % images:
        return []
    size = len(steps) // images
    return [steps[i * size:(i + 1) * size] for i in range(images)]


Block = tuple[float, "paired.Disturbance | None"]  # (candidate/base ratio, why it is disturbed or None)


def _mean(blocks: Sequence[Block]) -> float:
    """Geometric mean ratio of a run's blocks."""
    return math.exp(statistics.fmean(math.log(ratio) for ratio, _ in blocks))


def combo_blocks(base: Record, candidate: Record, policy: paired.PairedPolicy = paired.PairedPolicy()
                 ) -> list[Block]:
    """Every block of one combo of an A/B run, in order, set-aside ones included: (ratio, `paired.disturbance`)
    from the two sides' per-image step times (block i is image i of each side); when they cannot be split, the
    recorded `ab.ratios` without disturbances."""
    return [block for load in combo_loads(base, candidate, policy) for block in load]


def combo_loads(base: Record, candidate: Record, policy: paired.PairedPolicy = paired.PairedPolicy()
                ) -> list[list[Block]]:
    """`combo_blocks` cut into the run's loads of both sides (`ABVerdict.loads`: a SLOW or FAST judged again on a
    second load), each load's blocks in order: each load carries its own side bias. One load when the record names
    none, or names another count of blocks than it recorded."""
    bases, candidates = _images(base), _images(candidate)
    if bases and len(bases) == len(candidates):
        blocks = [(paired.block_ratio(b, c, policy.statistic), paired.disturbance(b, c, policy))
                  if min(b) > 0 and min(c) > 0 else None for b, c in zip(bases, candidates)]
    else:
        recorded = candidate.ab.ratios if candidate.ab is not None else ()
        blocks = [(float(r), None) if isinstance(r, (int, float)) and math.isfinite(r) and r > 0 else None
                  for r in recorded]
    loads = list(getattr(candidate.ab, "loads", None) or ())
    if len(loads) != len(blocks):
        loads = [1] * len(blocks)
    cut: dict[int, list[Block]] = {}
    for load, block in zip(loads, blocks):
        if block is not None:  # a block without usable steps, after its load is known
            cut.setdefault(load, []).append(block)
    return [cut[load] for load in sorted(cut)]


def block_ratios(base: Record, candidate: Record) -> list[float]:
    """The candidate/base ratio of each block of one combo of an A/B run (`combo_blocks` without disturbances)."""
    return [ratio for ratio, _ in combo_blocks(base, candidate)]


def is_a_a(base_env: dict, candidate_env: dict) -> bool:
    """Both sides ran the same tree and nothing was injected."""
    trees = base_env.get("ab_tree"), candidate_env.get("ab_tree")
    return bool(trees[0]) and trees[0] == trees[1] and not base_env.get("ab_inject") and \
        not candidate_env.get("ab_inject")


def _ab_pairs(records: Iterable[Record], gpu_class: str) -> list[tuple[str, Record, Record]]:
    """(combo, base record, candidate record) of every A/B run of the class with both sides recorded, in run order."""
    sides: dict[tuple[str, str], dict[str, Record]] = {}
    for record in records:
        env = record.env
        if record.gpu_class != gpu_class or not env.get("ab_run") or env.get("ab_side") not in ("base", "candidate"):
            continue
        sides.setdefault((env["ab_run"], record.combo), {})[env["ab_side"]] = record
    return [(combo, pair["base"], pair["candidate"]) for (_, combo), pair in sorted(sides.items())
            if "base" in pair and "candidate" in pair]


def aa_runs(records: Iterable[Record], gpu_class: str, policy: paired.PairedPolicy | None = None
            ) -> dict[str, list[list[Block]]]:
    """combo -> the blocks of each load of each of the class's A/A A/B runs of it (`combo_loads`), from history
    records (both sides' run files among them). Runs under host contention are left out."""
    policy = policy or policy_of(gpu_class)
    runs: dict[str, list[list[Block]]] = {}
    for combo, base, candidate in _ab_pairs(records, gpu_class):
        if not is_a_a(base.env, candidate.env) or (candidate.ab is not None and candidate.ab.contention):
            continue
        for load in combo_loads(base, candidate, policy):  # each load its own run: its own side bias
            runs.setdefault(combo, []).append(load)
    return runs


def partition(runs: Sequence[Sequence[Block]]) -> tuple[list[list[Block]], list[list[Block]]]:
    """(usable, left out) runs: usable are those of MIN_RUN_BLOCKS blocks or more; when there are none, those of
    MIN_BLOCKS or more (a run cut short by its time budget, an early live verdict); possibly none. `runs` may also
    hold plain ratios (no disturbances)."""
    pools = [[block if isinstance(block, tuple) else (block, None) for block in run] for run in runs]
    least = MIN_RUN_BLOCKS if any(len(pool) >= MIN_RUN_BLOCKS for pool in pools) else MIN_BLOCKS
    return [pool for pool in pools if len(pool) >= least], [pool for pool in pools if len(pool) < least]


def usable(runs: Sequence[Sequence[Block]]) -> list[list[Block]]:
    """The runs a simulation draws from (`partition`)."""
    return partition(runs)[0]


def simulate(runs: Sequence[Sequence[Block]], policy: paired.PairedPolicy, effect: float, simulations: int,
             rng: random.Random) -> tuple[dict[str, float], float]:
    """(share of each outcome, mean judged blocks) of `simulations` sequential comparisons; `({}, nan)` when no run
    is `usable`. Each picks one usable run and takes its blocks in a random order, without replacement, then (a live
    run may go on to the policy's `max_blocks`) draws further blocks from the same run with replacement; each ratio
    times 1 + effect, set aside or judged as a live run would (`paired.Blocks`), judged after each by `paired.judge`.
    So every simulated comparison is a live run on that load: its side bias and spread, its blocks in another order
    (pooling runs would average each load's bias away; drawing a dozen blocks with replacement from the start repeats
    a few and looks surer than any real run). A SLOW or FAST that a live run would judge again on a second load
    (`paired.needs_second_load`) is confirmed on another usable run, as that load (`paired.confirm`); with no other
    run it stands. `runs` may also be plain ratios (one run, no disturbances)."""
    pools = usable(runs)
    if not pools:
        return {}, math.nan
    counts: dict[str, int] = {}
    used = 0
    for _ in range(simulations):
        first = rng.randrange(len(pools))
        verdict = _one_load(pools[first], policy, effect, rng)
        if paired.needs_second_load(verdict, policy):  # a live run's second load: another recorded load, if any
            others = [pool for number, pool in enumerate(pools) if number != first]
            verdict = paired.confirm(verdict, _one_load(rng.choice(others), policy, effect, rng) if others else None,
                                     policy)
        counts[verdict.outcome] = counts.get(verdict.outcome, 0) + 1
        used += verdict.blocks
    return {outcome: n / simulations for outcome, n in counts.items()}, used / simulations


def _one_load(pool: Sequence[Block], policy: paired.PairedPolicy, effect: float, rng: random.Random
              ) -> paired.PairedVerdict:
    """One simulated load's verdict (`simulate`): the pool's blocks in a random order, then drawn again."""
    blocks = paired.Blocks(policy)
    order = rng.sample(list(pool), len(pool))
    verdict = None
    while verdict is None:
        ratio, disturbed = order.pop() if order else rng.choice(pool)
        blocks.add(ratio * (1 + effect), disturbed)
        verdict = blocks.judge()
    return verdict


def policy_of(gpu_class: str) -> paired.PairedPolicy:
    """The paired policy an A/B run of the class judges with: the CPU's for `cpu`, else CUDA's."""
    return paired.policy_for("cpu" if gpu_class == "cpu" else "cuda")


def build(records: Iterable[Record], gpu_class: str, effects: tuple[float, ...] = EFFECTS,
          simulations: int = SIMULATIONS, seed: int = 0, policy: paired.PairedPolicy | None = None,
          host_synchronous: Iterable[str] = ()) -> list[AbComboCard]:
    """The section's rows (module docs), sorted by combo; seeded per combo, so the same records give the same card.
    Combos in `host_synchronous` are judged with the host-synchronous policy (`paired.host_synchronous`), as an A/B
    run judges them. A combo with no usable run gets a row without figures (`simulations` 0)."""
    policy = policy or policy_of(gpu_class)
    records = list(records)
    synchronous = set(host_synchronous) | {  # and those an A/B run itself judged as host-synchronous
        combo for combo, _, candidate in _ab_pairs(records, gpu_class)
        if candidate.ab is not None and candidate.ab.host_synchronous}
    cards = []
    for combo, runs in sorted(aa_runs(records, gpu_class, policy).items()):
        pools, short = partition(runs)
        ratios = [ratio for blocks in pools for ratio, _ in blocks]
        spread = statistics.stdev(math.log(r) for r in ratios) if len(ratios) > 1 else math.nan
        card = AbComboCard(combo, len(pools), len(ratios), spread,
                           disturbed=sum(1 for blocks in pools for _, why in blocks if why),
                           recorded_runs=len(runs), longest=max((len(b) for b in pools), default=0),
                           host_synchronous=combo in synchronous,
                           left_out=[(len(blocks), _mean(blocks)) for blocks in short])
        if pools:
            combo_policy = paired.host_synchronous(policy) if card.host_synchronous else policy
            rng = random.Random(seed * 1_000_003 + zlib.crc32(combo.encode()))
            card.simulations = simulations
            for effect in (0.0, *effects):
                card.outcomes[effect], card.mean_blocks[effect] = simulate(pools, combo_policy, effect, simulations,
                                                                           rng)
        cards.append(card)
    return cards


@dataclass
class InjectedRun:
    """One combo of a real A/B run with a slowdown injected on the candidate side (`--inject-slow`)."""

    combo: str
    run: str
    fraction: float
    outcome: str
    ratio: float
    blocks: int
    min_effect: float | None = None  # the rule's minimum effect it was judged with (None: not recorded)
    shape: str = "steps"  # how the slowdown landed (tests/injectors/slow_combo.py)
    image_outcome: str | None = None  # the whole image's verdict (None: not recorded)
    image_ratio: float | None = None

    @property
    def slow(self) -> bool:
        """SLOW on the steps or on the whole image."""
        return paired.SLOW in (self.outcome, self.image_outcome)


def injected_runs(records: Iterable[Record], gpu_class: str) -> list[InjectedRun]:
    """The class's A/B runs with a slowdown injected (`ab_inject` naming the combo or `*`), per combo, by combo then
    run: the real check of the resampled detection figures."""
    found = []
    for combo, base, candidate in _ab_pairs(records, gpu_class):
        entries = _injected(candidate.env.get("ab_inject"))
        inject = entries.get(combo) or entries.get("*")
        ab = candidate.ab
        if inject is None or ab is None:
            continue
        found.append(InjectedRun(combo, candidate.env["ab_run"], float(inject.get("fraction") or 0.0), ab.outcome,
                                 float(ab.ratio or math.nan), int(ab.blocks or 0), ab.min_effect,
                                 str(inject.get("shape") or "steps"), ab.image_outcome, ab.image_ratio))
    return sorted(found, key=lambda run: (run.combo, run.run))


def _injected(inject) -> dict[str, dict]:
    """combo id (or "*") -> its injection, from a run's `ab_inject`: one {"combo", "fraction", "shape"}, or
    {"plan": [those]} when the run slowed several combos each its own way."""
    if not isinstance(inject, dict):
        return {}
    entries = inject.get("plan") if isinstance(inject.get("plan"), list) else [inject]
    return {entry["combo"]: entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("combo"), str)}


def _share(value: float, blocks: float) -> str:
    return f"{value:.0%} ({blocks:.1f} blocks)"


def markdown(cards: list[AbComboCard], gpu_class: str, policy: paired.PairedPolicy | None = None,
             injected: list[InjectedRun] | None = None) -> str:
    """The card's A/B section as markdown (empty when there are no A/A A/B records of the class): how it was made,
    the headline figures (A/A false alarms: mean and highest; detection at +2 % of the combos that are not
    host-synchronous), one row per combo, then the real injected runs (`injected_runs`) beside the resampled figure
    for the same effect."""
    if not cards:
        return ""
    policy = policy or policy_of(gpu_class)
    effects = sorted({effect for card in cards for effect in card.outcomes if effect})
    measured = [card for card in cards if card.simulations]
    simulations = max((card.simulations for card in measured), default=0)
    runs = max(card.runs for card in cards)
    synchronous = {card.combo for card in cards if card.host_synchronous}
    lines = ["## The A/B rule (interleaved base and candidate on one GPU)", "",
             f"From recorded A/A A/B runs of {gpu_class} (`python -m fluxgate.ab`, both sides the same tree, nothing "
             f"injected; up to {runs} usable runs per combo: of {MIN_RUN_BLOCKS}+ blocks, or {MIN_BLOCKS}+ where "
             f"none is that long): {simulations} sequential comparisons per combo, each picking one usable run and "
             "taking its blocks' candidate/base ratios in a random order, without replacement, then drawing from "
             "the same run again up to the rule's block limit (a run here is one load of both sides: a run that "
             "judged a combo again on a second load counts as two); judged after each block by the A/B rule "
             f"(`judging.paired`: ±{policy.equivalence:.1%} equivalence, {policy.min_effect:.2%} effect, "
             f"{policy.confidence:.1%} per look, {policy.min_blocks}-{policy.max_blocks} judged blocks, up to "
             f"{policy.max_disturbed} disturbed blocks set aside unless they keep to one side"
             + (f"; host-synchronous combos at ±{paired.host_synchronous(policy).min_effect:.0%}" if synchronous
                else "") + f"; a SLOW or FAST under {policy.confirm_below:.1%} judged again on another recorded "
             "load, as a live run's second load judges it, standing only if that agrees; no time budget). A false "
             "alarm is SLOW or "
             "FAST on the ratios as recorded; detection is SLOW with every ratio stretched by the effect. Each cell: "
             "the share of the simulated comparisons (the mean blocks they judged). Each simulated comparison is a "
             "live run on one recorded load (its side bias and spread); recorded runs cannot show a spread they did "
             f"not have, and rows whose longest run is under {policy.max_blocks} blocks are marked: their later "
             "draws repeat blocks; runs too short to draw from are named in the row. The resampled blocks carry no "
             "case, so the rule's by-case part is not in these figures (a SLOW or FAST from the by-case interval "
             "where the blocks' one is unclear; no SAME before every case was made, a fourth block for Z-Image's "
             "four cases); replayed block by block over the recorded loads it changed no SLOW or FAST "
             "(docs/methodology.md).", ""]
    if measured:
        alarms = statistics.fmean(card.false_alarms for card in measured)
        worst = max(measured, key=lambda card: card.false_alarms)
        highest = f"highest {worst.false_alarms:.1%}, `{worst.combo}`" if worst.false_alarms else "none in any combo"
        lines.append(f"A/A false alarms, mean over {counted(len(measured), 'combo')}: **{alarms:.1%}** of simulated "
                     f"comparisons ({highest}).")
        gated = [card for card in measured if card.combo not in synchronous and 0.02 in card.outcomes]
        if gated:
            weakest = min(gated, key=lambda card: card.detected(0.02))
            lowest = "every one" if weakest.detected(0.02) == 1.0 else f"lowest: `{weakest.combo}`"
            lines.append(f"Detected at +2 %, the {counted(len(gated), 'combo that is', 'combos that are')} not "
                         "host-synchronous: at least "
                         f"**{weakest.detected(0.02):.0%}** ({lowest}).")
        lines.append("")
    lines += ["| combo | usable runs (recorded) | blocks | disturbed | block spread | A/A false alarms | A/A SAME | "
              + " | ".join(f"detected at +{e:.0%}" for e in effects) + " | note |",
              "|---|--:|--:|--:|--:|--:|--:|" + "--:|" * len(effects) + "---|"]
    for card in cards:
        spread = "—" if math.isnan(card.spread) else f"{card.spread:.2%}"
        notes = [f"host-synchronous: judged at ±{paired.host_synchronous(policy).min_effect:.0%}"] \
            if card.host_synchronous else []
        if not card.simulations:
            cells = ["—"] * (2 + len(effects))
            notes.append(f"no run of {MIN_BLOCKS}+ recorded blocks: no figures")
        else:
            cells = [_share(card.false_alarms, card.mean_blocks[0.0]),
                     _share(card.outcomes[0.0].get(paired.SAME, 0.0), card.mean_blocks[0.0]),
                     *(_share(card.detected(e), card.mean_blocks[e]) for e in effects)]
            if card.longest < policy.max_blocks:
                notes.append(f"runs of {card.longest} blocks at most: shares are optimistic")
        if card.left_out:
            notes.append("left out, too short: " + ", ".join(f"a run of {n} blocks at {mean - 1:+.2%}"
                                                            for n, mean in card.left_out))
        lines.append("| " + " | ".join([f"`{card.combo}`", f"{card.runs} ({card.recorded_runs})", str(card.blocks),
                                         str(card.disturbed), spread, *cells, "; ".join(notes)]) + " |")
    if injected:
        by_combo = {card.combo: card for card in cards}
        lines += ["", "### Real injected runs", "",
                  "A/B runs on the GPU with the candidate slowed by the stated fraction of its denoising loop "
                  "(estimated from its first step) in the stated shape (`--inject-slow`, "
                  "tests/injectors/slow_combo.py: steps = a GPU-side delay on every step, stallK = on every K-th step, "
                  "rstallK = on each step with probability 1/K, "
                  "host = host time on every step, first = on each image's first step, decode = in the VAE decode, "
                  "caseN = on every step of the N-th case's images only), "
                  "judged live by the same rule: the check of the resampled detection above (which stretches every "
                  "step alike). The measured ratio is below the fraction where the first step is shorter than the "
                  "steady steps. Steps: the step-time verdict and ratio; image: the whole image's at the model's "
                  "steps (recorded from 2026-12-07). The verdict is as recorded, under the rule's minimum effect of "
                  "that run (where not recorded: 0.5 % with nothing set aside before the A/B runs of 2026-11-30 14:09 UTC, "
                  "0.75 % with set-aside from then; neither had the host-synchronous rule); the resampled figure is "
                  "today's rule.", "",
                  "| combo | injected | shape | run | rule's effect | verdict (steps) | blocks judged | measured ratio "
                  "| image verdict | image ratio | resampled detection at that effect |",
                  "|---|--:|---|---|--:|---|--:|--:|---|--:|--:|"]
        for run in injected:
            card = by_combo.get(run.combo)
            effect = min(card.outcomes, key=lambda e: abs(e - run.fraction)) if card and card.outcomes else None
            resampled = f"{card.detected(effect):.0%} at +{effect:.0%}" if effect else "—"
            rule = f"{run.min_effect:.2%}" if run.min_effect is not None else "not recorded"
            image = (run.image_outcome or "not recorded",
                     "—" if run.image_ratio is None else f"{run.image_ratio:.4f}")
            lines.append(f"| `{run.combo}` | +{run.fraction:.1%} | {run.shape} | `{run.run}` | {rule} | {run.outcome} "
                         f"| {run.blocks} | {run.ratio:.4f} | {image[0]} | {image[1]} | "
                         f"{resampled if run.shape == 'steps' else '—'} |")
        slow = sum(run.slow for run in injected if run.combo not in synchronous)
        total = sum(run.combo not in synchronous for run in injected)
        shapes = sorted({run.shape for run in injected})
        tally = "; ".join(f"{shape} {sum(r.slow for r in injected if r.shape == shape and r.combo not in synchronous)}"
                          f" of {sum(r.shape == shape and r.combo not in synchronous for r in injected)}"
                          for shape in shapes)
        lines += ["", f"Not host-synchronous: **{slow} of {total}** real injected runs SLOW (steps or image)"
                  + (f"; by shape: {tally}" if len(shapes) > 1 else "") + ". The image ratio is the effect the "
                  "injection had on the whole image: where the GPU hides it (host time on a GPU-bound combo, a "
                  "first-step delay the host's lead absorbs), the user pays less than the fraction injected."]
    return "\n".join(lines) + "\n"
