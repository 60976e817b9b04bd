"""One combo of an A/B run: blocks of one base image and one candidate image, the order alternating between blocks
(A B, B A, ...), judged after each block by the paired rule (`fluxgate.judging.paired`), and the memory and similarity
of the same pairs.

Two paired verdicts come from the same blocks: the **steps** (`paired.block_ratio`: mean step time) and the
**image** (`image_s`: the whole image at the model's own steps, with what lies outside the steady steps: the first
step's start-up, text encoding where the pipeline runs it, VAE decode, the pipeline's own work). A PR that makes the
VAE decode 30 % slower, or adds a warm-up cost to each image's first steps, leaves the steps SAME and the image SLOW:
users pay for the whole image.

`run_blocks` is independent of processes: it asks `image(side)` for one timed image of "base" or "candidate" (an
A/B worker's answer: `first_steps_s` and `step_times_s` in seconds, `e2e_s` the whole call in seconds,
`peak_mem_gib` in GiB, `pixels`: {"size", "rgb"}) and reads the time from `clock`, so it runs against fakes in tests.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from fluxgate.judging import paired

BASE, CANDIDATE = "base", "candidate"


@dataclass(frozen=True)
class Limits:
    """When the same pairs fail on memory or similarity: candidate/base peak memory above `max_mem_ratio` (median
    over the pairs), MS-SSIM of the candidate's image against the base's of the same seed below `min_ms_ssim` (the
    lowest pair)."""

    max_mem_ratio: float = 1.02
    min_ms_ssim: float = 0.95


def limits_for(device_type: str, max_mem_ratio: float | None = None, min_ms_ssim: float | None = None) -> Limits:
    """The default limits of a device type (CPU: peak RSS of a whole process moves more, 1.10), overridden by the
    values given."""
    default = Limits() if device_type == "cuda" else Limits(max_mem_ratio=1.10)
    return Limits(max_mem_ratio if max_mem_ratio is not None else default.max_mem_ratio,
                  min_ms_ssim if min_ms_ssim is not None else default.min_ms_ssim)


def image_s(answer: dict, steps: int | None = None) -> float | None:
    """One image's whole time at `steps` denoising steps (seconds): its measured call (`e2e_s`) with `steps` less the
    steps it made (`first_steps_s` and `step_times_s`) added at its mean step after the first. The A/B's images may
    have fewer steps than the model's own (`--steps`): this is the image a user waits for at the model's steps, each
    per-image cost (the first step's start-up, text encoding, VAE decode) counted once. None without `e2e_s`; `steps`
    None: the image as made."""
    settled = list(answer["step_times_s"])
    if not answer.get("e2e_s") or not settled:
        return None
    made = len(answer.get("first_steps_s") or []) + len(settled)
    return answer["e2e_s"] + ((steps or made) - made) * statistics.fmean(settled)


@dataclass
class Pair:
    """One block: both sides' answers (without their PNG bytes), its step-time ratio (`paired.block_ratio`), whole
    image time ratio (`image_s`; None without e2e_s), memory ratio, MS-SSIM, and why it was set aside
    (`paired.disturbance`; None: judged)."""

    order: tuple[str, str]
    base: dict
    candidate: dict
    ratio: float
    mem_ratio: float
    ms_ssim: float | None
    set_aside: str | None = None
    image_ratio: float | None = None
    load: int = 1  # which load of both sides made it (`two_loads`)


@dataclass
class ComboResult:
    """A combo's A/B result: the paired verdict, the pairs, seconds spent, and the memory and similarity summaries
    with the failures they make (`failures`: one line each; the speed verdict is `verdict.outcome`)."""

    combo: str
    verdict: paired.PairedVerdict
    pairs: list[Pair]
    seconds: float
    mem_ratio: float
    min_ms_ssim: float | None
    alternating_loads: bool = False
    failures: list[str] = field(default_factory=list)
    images: dict = field(default_factory=dict, repr=False)  # side -> the last pair's PNG bytes
    contention: str | None = None  # `base: host contention: ...` when a side's steps waited for a CPU
    image_verdict: paired.PairedVerdict | None = None  # the whole image's (`image_s`); None: no e2e_s measured
    # The candidate judged as a one-sided run judges it (`fluxgate.ab`: the class's fixed limits, each case against
    # the stored BF16 reference): the lines of the limits it missed; None: not judged (`limits_note` says why).
    limit_failures: list[str] | None = None
    limits_note: str | None = None
    judged: dict = field(default_factory=dict, repr=False)  # the candidate worker's `judge` answer
    phases_s: dict = field(default_factory=dict)  # where the combo's time went (`fluxgate.ab`), seconds

    @property
    def failed(self) -> bool:
        """SLOW steps or a SLOW image, a memory or similarity regression against the base, or a fixed limit
        missed."""
        return paired.SLOW in (self.verdict.outcome, getattr(self.image_verdict, "outcome", None)) or \
            bool(self.failures) or bool(self.limit_failures)


def ms_ssim(candidate: dict, base: dict) -> float | None:
    """MS-SSIM of two images as a side's worker sends them ({"size": [width, height], "rgb": bytes}, 8-bit RGB
    rows: no encoding, which cost 0.12 s per 1024 px image as PNG), 1.0 = identical; None when they are too small
    for it. Identical pixels (an A/A run's usual pair) are 1.0 without comparing them."""
    from PIL import Image

    from fluxgate.judging import similarity

    if min(candidate["size"]) < similarity.MIN_SIDE_PX:
        return None
    if candidate["size"] == base["size"] and candidate["rgb"] == base["rgb"]:
        return 1.0
    return similarity.compare(*(Image.frombytes("RGB", tuple(image["size"]), image["rgb"])
                                for image in (candidate, base))).ms_ssim


def run_blocks(combo: str, image: Callable[[str], dict], policy: paired.PairedPolicy, budget_s: float,
               limits: Limits = Limits(), clock: Callable[[], float] = time.monotonic,
               alternating_loads: bool = False, on_block: Callable[[int, Pair, float], None] | None = None,
               image_steps: int | None = None, reserve_s: Callable[[], float] = lambda: 0.0,
               cases: int | None = None) -> ComboResult:
    """Blocks until `paired.judge` decides on both the steps and the whole image (`image_s` at `image_steps`, the
    model's own steps; None: the steps each image made): SAME/SLOW/FAST when clear, UNKNOWN at `policy.max_blocks`
    judged blocks or when the next block would end past `budget_s` seconds from the start (estimated from the slowest
    block so far; `reserve_s()`: seconds of the budget kept for what follows the blocks; `cases`: how many cases the
    blocks cycle through, each answer naming its `case`, for the by-case interval and no SAME before every case was
    made, `paired.judge`). Disturbed blocks (`paired.disturbance`) are set aside, up to
    the policy's `max_disturbed` and unless they keep to one side (`paired.Blocks`), for both verdicts alike; the
    verdict's message says how many. `on_block(number, pair, seconds so far)` is called after each block (progress).
    Propagates what `image` raises."""
    started, pairs, slowest = clock(), [], 0.0
    blocks, whole = paired.Blocks(policy, cases=cases), paired.Blocks(policy, cases=cases)
    images: dict = {}
    verdict = image_verdict = None  # each kept once decided: more blocks for the other never undo it
    while True:
        block_start = clock()
        order = (BASE, CANDIDATE) if len(pairs) % 2 == 0 else (CANDIDATE, BASE)
        answers = {side: image(side) for side in order}
        images = {side: answers[side].pop("pixels", None) for side in order}
        base, candidate = answers[BASE], answers[CANDIDATE]
        ratio = paired.block_ratio(base["step_times_s"], candidate["step_times_s"], policy.statistic)
        seconds = [image_s(answer, image_steps) for answer in (base, candidate)]
        image_ratio = seconds[1] / seconds[0] if None not in seconds and seconds[0] > 0 else None
        similar = ms_ssim(images[CANDIDATE], images[BASE]) if images[BASE] and images[CANDIDATE] else None
        disturbed = paired.disturbance(base["step_times_s"], candidate["step_times_s"], policy)
        judged = blocks.add(ratio, disturbed, candidate.get("case"))  # the case both sides made (by-case interval)
        if image_ratio is not None:  # a block without e2e_s counts for the steps only
            whole.add(image_ratio, disturbed, candidate.get("case"))
        pairs.append(Pair(order, base, candidate, ratio, candidate["peak_mem_gib"] / base["peak_mem_gib"], similar,
                          None if judged else str(disturbed), image_ratio))
        now = clock()
        slowest = max(slowest, now - block_start)
        if on_block is not None:
            on_block(len(pairs), pairs[-1], now - started)
        # the time kept for what follows is taken from the budget only once the policy's fewest blocks are measured
        reserve = reserve_s() if len(blocks.ratios) >= policy.min_blocks else 0.0
        out_of_budget = len(blocks.ratios) >= policy.max_blocks or now - started + slowest > budget_s - reserve
        verdict = verdict or blocks.judge(out_of_budget=out_of_budget)
        timed = bool(whole.ratios or whole.set_aside)
        if timed:
            image_verdict = image_verdict or whole.judge(out_of_budget=out_of_budget)
        if verdict is not None and (image_verdict is not None or not timed):
            break
    if blocks.restored:  # a lopsided set: the blocks set aside were judged after all
        for pair in pairs:
            pair.set_aside = None
    verdict = replace(verdict, message=verdict.message + blocks.note())
    if image_verdict is not None:
        image_verdict = replace(image_verdict, message="image " + image_verdict.message.replace(
            "step time", "image time") + whole.note())
    return summarize(combo, verdict, pairs, clock() - started, limits, alternating_loads, images, image_verdict)


def needs_second_load(result: ComboResult, policy: paired.PairedPolicy) -> bool:
    """The steps' or the whole image's verdict is a SLOW or FAST that a second load of both sides must confirm
    (`paired.needs_second_load`)."""
    return any(paired.needs_second_load(verdict, policy) for verdict in (result.verdict, result.image_verdict))


def two_loads(first: ComboResult, second: ComboResult | None, policy: paired.PairedPolicy,
              limits: Limits = Limits()) -> ComboResult:
    """One result of a combo measured on two loads of both sides (`second` None: a second load was due but there was
    no time for it): each verdict `paired.confirm`ed by the second load's, the pairs of both (each marked with its
    load), their time, and the memory and similarity summaries of all of them. The images are the newest load's."""
    if second is None:
        return replace(first, verdict=paired.confirm(first.verdict, None, policy),
                       image_verdict=first.image_verdict and paired.confirm(first.image_verdict, None, policy))
    for pair in second.pairs:
        pair.load = 2
    image_verdict = None
    if first.image_verdict is not None:  # the second load's blocks time images as the first's did
        image_verdict = paired.confirm(first.image_verdict, second.image_verdict, policy, "image time")
        if image_verdict.outcome == paired.UNKNOWN and image_verdict is not first.image_verdict:
            image_verdict = replace(image_verdict, message="image " + image_verdict.message)
    return summarize(first.combo, paired.confirm(first.verdict, second.verdict, policy),
                     first.pairs + second.pairs, first.seconds + second.seconds, limits, first.alternating_loads,
                     second.images or first.images, image_verdict)


def summarize(combo: str, verdict: paired.PairedVerdict, pairs: list[Pair], seconds: float, limits: Limits,
              alternating_loads: bool = False, images: dict | None = None,
              image_verdict: paired.PairedVerdict | None = None) -> ComboResult:
    """The ComboResult of these pairs: median memory ratio, lowest MS-SSIM, and the failures they make."""
    mem_ratio = statistics.median(p.mem_ratio for p in pairs) if pairs else math.nan
    scores = [p.ms_ssim for p in pairs if p.ms_ssim is not None]
    lowest = min(scores) if scores else None
    failures = []
    if mem_ratio > limits.max_mem_ratio:
        failures.append(f"memory: candidate/base peak {mem_ratio:.3f} > max {limits.max_mem_ratio:.3f}")
    if lowest is not None and lowest < limits.min_ms_ssim:
        failures.append(f"similarity: MS-SSIM vs base {lowest:.4f} < min {limits.min_ms_ssim:.4f}")
    return ComboResult(combo, verdict, pairs, seconds, mem_ratio, lowest, alternating_loads, failures, images or {},
                       contention(pairs), image_verdict)


def contention(pairs: list[Pair]) -> str | None:
    """`<side>: host contention: ...` (`stats.contention_note`) for the first side whose pooled steps
    waited for a CPU, else None: the verdict then rests on a machine other work held (UNKNOWN is likely)."""
    from fluxgate.stats import contention_note

    for side in (BASE, CANDIDATE):
        answers = [getattr(pair, side) for pair in pairs]
        waits = [answer.get("run_wait_s") for answer in answers]
        if not answers or any(wait is None for wait in waits):
            continue
        note = contention_note([s for a in answers for s in a.get("step_times_s", [])],
                               [w for wait in waits for w in wait])
        if note:
            return f"{side}: {note}"
    return None


def policy_with(device_type: str, max_blocks: int | None = None, min_blocks: int | None = None
                ) -> paired.PairedPolicy:
    """`paired.policy_for(device_type)`, with `max_blocks` and `min_blocks` when given. `min_blocks` alone raises
    max_blocks to it when needed (recording a fixed number of blocks: `--ab-min-blocks`). Raises ValueError (naming
    the option) when max_blocks ends up below min_blocks."""
    policy = paired.policy_for(device_type)
    if min_blocks is not None:
        policy = replace(policy, min_blocks=min_blocks, max_blocks=max(policy.max_blocks, min_blocks))
    if max_blocks is None:
        return policy
    if max_blocks < policy.min_blocks:
        raise ValueError(f"--ab-max-blocks {max_blocks}: must be at least {policy.min_blocks} (the policy's "
                         f"min_blocks{' from --ab-min-blocks' if min_blocks is not None else ''})")
    return replace(policy, max_blocks=max_blocks)
