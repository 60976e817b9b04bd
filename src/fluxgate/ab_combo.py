"""One combo of an A/B run (`fluxgate.ab`): both sides' loads, the interleaved blocks (`judging.interleave`), the
candidate judged as a one-sided run judges it (its worker's `judge` op), and each side's Record of it."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from fluxgate.ab_sides import Side, SideError
from fluxgate.judging import interleave, paired
from fluxgate.judging.interleave import BASE, CANDIDATE


def _progress(combo: str, offset: int = 0):
    """`on_block` for run_blocks: one stderr line per block (numbered after `offset` earlier ones)."""
    def show(number: int, pair: interleave.Pair, seconds: float) -> None:
        number += offset
        steps = {side: statistics.fmean(getattr(pair, side)["step_times_s"]) for side in (BASE, CANDIDATE)}
        images_s = sum(getattr(pair, side).get("e2e_s") or 0.0 for side in (BASE, CANDIDATE))
        image = f", image {pair.image_ratio:.4f}" if pair.image_ratio is not None else ""
        print(f"  {combo} block {number} ({' '.join('A' if s == BASE else 'B' for s in pair.order)}): steps "
              f"{pair.ratio:.4f}{image}, mean step base {steps[BASE]:.4f} s, candidate {steps[CANDIDATE]:.4f} s; "
              f"images {images_s:.1f} s; {seconds:.1f} s"
              + (f"; set aside: {pair.set_aside}" if pair.set_aside else ""), file=sys.stderr, flush=True)
    return show


def measure_combo(combo, sides: dict[str, Side], policy, budget_s: float, limits, deadline: float | None = None,
                   steps: int | None = None, image_steps: int | None = None, baselines_dir: Path | None = None,
                   judge_steps: int | None = None, references_dir: Path | None = None,
                   ) -> tuple[interleave.ComboResult, dict[str, dict]]:
    """Load the combo on both sides (or alternate loads when both do not fit), then `interleave.run_blocks` with
    `budget_s`, or less when the blocks would run past `deadline` (time.monotonic()), then (with `baselines_dir`)
    the candidate judged against the class's baselines there (`_judge`; its images' time, estimated from the
    candidate's blocks, is kept out of the blocks' budget); the sides hold nothing afterwards. `steps`:
    this combo's denoising steps (None: the side's --steps or the profile's); `image_steps`: the model's own, at
    which the whole image is judged; `judge_steps`: the steps of the candidate's case images (None: the model's
    own), against the references under `references_dir` (made at them) when given. Returns the result and each side's image settings. Raises SideError."""
    base = sides[BASE]
    alternating, settings, cases = False, {}, {}
    phases = {"load_s": 0.0, "blocks_s": 0.0, "judge_s": 0.0, "release_s": 0.0}

    def load(side: str, phase: str | None = "load_s") -> None:
        started = time.monotonic()
        message = {"op": "load", "combo": combo.id, **({"steps": steps} if steps else {})}
        try:
            answer = sides[side].ask(message)
            settings[side], cases[side] = answer["settings"], answer.get("cases")
        finally:
            if phase:  # a load inside a block is the block's time
                phases[phase] += time.monotonic() - started

    load(BASE)
    try:
        load(CANDIDATE)
    except SideError as error:
        if not error.oom:
            raise
        alternating = True  # the candidate's failed load is unloaded already
        base.ask({"op": "unload"})
    print(f"  {combo.id}: loaded in {phases['load_s']:.1f} s" + (" (alternating)" if alternating else ""),
          file=sys.stderr, flush=True)

    # Block k makes case k (in turn) on both sides, when both said they make any case on request (a base from
    # before makes the first only; alternating loads: the candidate has not said): the candidate's block images are
    # then its judged case images at the blocks' steps.
    cycle = cases.get(BASE) if cases.get(BASE) and cases.get(BASE) == cases.get(CANDIDATE) else None
    made = {BASE: 0, CANDIDATE: 0}
    judging_s = [0.0]  # the candidate's judging to come: its cases' images the blocks did not make, estimated

    def image(side: str) -> dict:
        message = {"op": "image", **({"case": made[side] % len(cycle)} if cycle else {})}
        made[side] += 1
        if not alternating:
            answer = sides[side].ask(message)
        else:
            load(side, phase=None)
            try:
                answer = sides[side].ask(message)
            finally:
                sides[side].ask({"op": "unload"})
        if side == CANDIDATE and baselines_dir is not None:
            whole = interleave.image_s(answer, judge_steps or image_steps)
            count = len(settings[CANDIDATE].get("cases") or [None])
            # the worker's rule (`ab_worker.Worker.judge`): block images are reused when judged at their steps
            at_block_steps = cycle and (judge_steps or image_steps) == settings[CANDIDATE].get("steps")
            left = max(0, count - made[side]) if at_block_steps else count
            judging_s[0] = left * (whole or 0.0)
        return answer

    try:
        if deadline is not None:
            budget_s = max(0.0, min(budget_s, deadline - time.monotonic()))
        def blocks(seconds: float, number: int = 0) -> interleave.ComboResult:
            return interleave.run_blocks(combo.id, image, policy, seconds, limits, alternating_loads=alternating,
                                         on_block=_progress(combo.id, number), image_steps=image_steps,
                                         reserve_s=lambda: judging_s[0], cases=len(cycle) if cycle else None)

        result = blocks(budget_s)
        if interleave.needs_second_load(result, policy) and not alternating:  # alternating: every image a new load
            second = _second_load(combo.id, result, sides, load, blocks, budget_s, deadline, policy,
                                  phases["load_s"], judging_s[0])
            result = interleave.two_loads(result, second, policy, limits)
        phases["blocks_s"] = result.seconds
        if baselines_dir is not None:
            started = time.monotonic()
            try:
                if alternating:
                    load(CANDIDATE)
                _judge(result, sides[CANDIDATE], baselines_dir, judge_steps, references_dir)
            except SideError as error:  # the blocks stand: the combo is recorded, failing on what was not judged
                result.limit_failures = [f"fixed limits not judged: {error}"]
                result.limits_note = "not judged"
            phases["judge_s"] = time.monotonic() - started
        result.phases_s = phases
        return result, settings
    finally:
        started = time.monotonic()
        for side in sides.values():
            side.ask({"op": "unload"})
        phases["release_s"] = time.monotonic() - started


def _second_load(combo: str, first: interleave.ComboResult, sides: dict[str, Side], load, blocks, budget_s: float,
                 deadline: float | None, policy, reload_s: float, reserve_s: float) -> interleave.ComboResult | None:
    """The blocks of a second load of both sides (the candidate loaded first this time), for a SLOW or FAST under the
    policy's `confirm_below` (`paired.confirm`): up to `budget_s` seconds of blocks again, within `deadline` after
    the reload (estimated as `reload_s`, the first loads' time) and the candidate's judging (`reserve_s`, estimated);
    None when that would not hold the policy's fewest blocks, or when a side fails to load or image again (said in a
    line; the first load's verdict then stands unconfirmed, the candidate loaded again for its judging if it can
    be)."""
    per_block = first.seconds / max(1, len(first.pairs))
    left = budget_s if deadline is None else min(budget_s, deadline - time.monotonic() - reload_s - reserve_s)
    shown = first.verdict if paired.needs_second_load(first.verdict, policy) else first.image_verdict
    if left < per_block * (policy.min_blocks + 1):
        print(f"  {combo}: {shown.outcome} at {shown.ratio - 1:+.2%} on one load; no time left to confirm it on a "
              "second", file=sys.stderr, flush=True)
        return None
    print(f"  {combo}: {shown.outcome} at {shown.ratio - 1:+.2%} on one load, under the "
          f"{policy.confirm_below:.1%} a load's own bias could explain: loading both sides again to confirm",
          file=sys.stderr, flush=True)
    try:
        for side in sides.values():
            side.ask({"op": "unload"})
        load(CANDIDATE)
        load(BASE)
        seconds = budget_s if deadline is None else min(budget_s, deadline - time.monotonic() - reserve_s)
        return blocks(max(0.0, seconds), len(first.pairs))
    except SideError as error:
        print(f"  {combo}: the second load failed ({error}); the first load's verdict stands unconfirmed",
              file=sys.stderr, flush=True)
        try:
            sides[BASE].ask({"op": "unload"})
            load(CANDIDATE)  # for the candidate's judging; a side that died fails it there, saying so
        except SideError:
            pass
        return None


def _judge(result: interleave.ComboResult, candidate: Side, baselines_dir: Path, steps: int | None,
           references_dir: Path | None = None) -> None:
    """The candidate, still loaded, judged as a one-sided run judges it (its worker's `judge`: one image per case at
    `steps` (None: the model's own; at the blocks' steps, each case's first block image, the rest made now) against
    the stored BF16 references (under `references_dir` when given: made at `steps`), the class's fixed speed and
    memory limits under `baselines_dir` on all its images): sets
    the result's `limit_failures` and `judged`; a combo that cannot be judged (no baseline, stale references) gets
    one failure line naming why."""
    started = time.monotonic()
    try:
        judged = candidate.ask({"op": "judge", "baselines_dir": str(baselines_dir), "steps": steps,
                                "references_dir": None if references_dir is None else str(references_dir)})
    except SideError as error:  # a worker that died fails the combo at its unload, right after
        result.limit_failures = [f"fixed limits not judged: {error} (--limits off: the A/B verdict alone)"]
        result.limits_note = "not judged"
        return
    result.judged, result.limit_failures = judged, list(judged["failures"])
    count, made = len(judged['metrics'].get('cases') or []), judged.get("made")
    source = "" if made is None or made == count else f" ({count - made} from the blocks, {made} made to judge)"
    result.limits_note = (f"{count} case image(s) at {judged['steps']} steps{source} against the BF16 references, "
                          f"fixed limits on every candidate image: {time.monotonic() - started:.1f} s")


def keep_images(result: interleave.ComboResult, writer) -> None:
    """The judged candidate's case images into its run's history (`writer.save_image`); each case then names where
    its image went, as a one-sided record's do."""
    import io

    from PIL import Image

    stored = {}
    try:
        for name, png in (result.judged.get("images") or {}).items():
            stored[name] = writer.save_image(name, Image.open(io.BytesIO(png)))
    except OSError as error:  # the records go to history without their images, saying why
        print(f"{result.combo}: case images not stored ({error}); its records are kept without them",
              file=sys.stderr, flush=True)
    for case in (result.judged.get("metrics") or {}).get("cases") or []:
        case["image"] = stored.get(case.get("image"))
    result.judged.pop("images", None)


def records(result: interleave.ComboResult, combo, hello: dict, side: str, settings: dict,
             policy: paired.PairedPolicy, host_synchronous: bool):
    """One side's Record of a combo: its images' steps pooled, the A/B verdict (`Record.ab`) with the policy it was
    judged by."""
    from fluxgate.storing.record import FAILED, PASSED, Metrics, Record
    from fluxgate.storing.verdicts import ABVerdict

    answers = [getattr(pair, side) for pair in result.pairs]
    steps = [s for a in answers for s in a["step_times_s"]]
    waits = [a.get("run_wait_s") for a in answers]
    metrics = Metrics(it_s=1 / statistics.median(steps), it_s_mean=len(steps) / sum(steps), step_times_s=steps,
                      first_steps_s=[s for a in answers for s in a.get("first_steps_s") or []],
                      run_wait_s=None if any(w is None for w in waits) else [s for w in waits for s in w],
                      e2e_s=statistics.median(a["e2e_s"] for a in answers),
                      peak_mem_gib=max(a["peak_mem_gib"] for a in answers), mem_kind=answers[0]["mem_kind"],
                      images=len(answers), ms_ssim=result.min_ms_ssim if side == CANDIDATE else None)
    verdict = result.verdict
    ab = ABVerdict(verdict.outcome, verdict.ratio, verdict.low, verdict.high, verdict.blocks, verdict.message,
                   result.mem_ratio, tuple(pair.ratio for pair in result.pairs),
                   tuple("".join(s[0] for s in p.order) for p in result.pairs),
                   tuple([number, pair.set_aside] for number, pair in enumerate(result.pairs, 1) if pair.set_aside),
                   result.seconds, result.alternating_loads, result.contention, policy.min_effect, policy.equivalence,
                   host_synchronous, *_image_fields(result.image_verdict), result.min_ms_ssim,
                   loads=tuple(pair.load for pair in result.pairs))
    failed = side == CANDIDATE and result.failed
    slow = [v.message for v in (verdict, result.image_verdict) if v is not None and v.outcome == paired.SLOW]
    judged = result.judged if side == CANDIDATE else {}
    if judged:  # the one-sided judgement: similarity against the BF16 references, its cases, the limits used
        metrics = Metrics.from_json({**metrics.to_json(), **judged["metrics"]})
    return Record(combo.id, combo.model, combo.precision, combo.runtime, hello["profile"], hello["gpu_class"],
                  settings=settings, metrics=metrics, outcome=FAILED if failed else PASSED,
                  failures=slow + result.failures + (result.limit_failures or []) if failed else None, ab=ab,
                  thresholds=judged.get("thresholds"), image=(judged["metrics"].get("cases") or [{}])[0].get("image")
                  if judged else None, not_judged=judged.get("not_judged") or None)


def _image_fields(verdict: paired.PairedVerdict | None) -> tuple:
    """ABVerdict's image_outcome, image_ratio, image_low, image_high, image_message (all None without one)."""
    if verdict is None:
        return (None,) * 5
    return verdict.outcome, verdict.ratio, verdict.low, verdict.high, verdict.message
