"""Interleaved A/B: base and candidate measured on one device in the same job, image by image, judged on their
paired per-block ratios of the mean step time and of the whole image's time (issues 18, 31).

    fluxgate ab --base origin/main --models flux1-dev --precisions bf16      (in any repository that uses fluxgate)
    fluxgate ab --base-tree CHECKOUT [--candidate-tree .] [options]          (the base already checked out)
    nox -s perf-ab -- --base origin/main [--own-envs] [these options]        (fluxgate's own repository)

The sides differ by the repository's tree, never by fluxgate: `--base REF` makes (or reuses) a git worktree of REF
of the candidate's repository under --envs-dir (`base`). Each side is one long-lived worker process
(`fluxgate.ab_worker`, started through execnet) in its own interpreter (`--base-python`,
`--candidate-python`; default: this one) with its own tree first on its path: `<tree>/src` for a src layout, else
the tree itself, and the tree's pyproject.toml entry points as its registries (`fluxgate.models`,
`fluxgate.precisions`, `fluxgate.hooks`), read in that process; its `pytest_fluxgate_prepare_pipeline` hooks change
its pipelines, its `pytest_fluxgate_environment` hooks its records. fluxgate is the candidate's installed one on both
sides, except in fluxgate's own repository, whose src/fluxgate is the team code: there each side runs its own tree's
(`fluxgate.ab_sides` has the rules).

For each combo both sides load its pipeline (when both do not fit in device memory at once,
each image loads its side again: said in the output), then blocks of one base and one candidate image, the order
alternating (A B, B A, ...), until the paired verdicts (`fluxgate.judging.paired`, the device's policy) are clear,
one on the mean step time and one on the whole image at the model's steps (`judging.interleave.image_s`: the first
step, text encoding and VAE decode counted once per image): SAME, SLOW, FAST, or UNKNOWN at --ab-max-blocks judged
blocks or --budget-s (--ab-min-blocks: no verdict before that many). A disturbed block (one side's steps spread by
a burst of host work) is set aside and another measured, up to 5 per combo and unless they keep to one side. A combo
that the newest one-sided run of its class in --history-dir found host-synchronous, and the one-sided runs before it
too, is judged at its own ±4 % (`paired.host_synchronous`; on a PR those are main's runs, so a combo the PR made
host-synchronous keeps the tighter rule).
Memory (candidate/base peak GiB) and similarity
(MS-SSIM of the candidate's image against the base's of the same seed) are judged on the same pairs.

Each side is measured with the same options; each reads its own tree's fixtures/prompts.toml (else fluxgate's
packaged prompts) unless --prompts names one for both. --steps sets the denoising steps of every image on both sides
(fewer than the model's default: more blocks in the same time; the verdict is on per-step times, so it keeps its
meaning). --budget-s bounds each combo's blocks on one load (a SLOW or FAST under 2.5 % gets a second load of both
sides with up to that again), --total-budget-s the whole run: each combo gets at most its share of what is left,
second load included (combos whose share is gone are listed as not measured). Progress goes to stderr, one line per
combo and per block; the run ends with its wall time and the seconds inside timed steps (the figure to put next to a
one-sided run's).

--own-envs makes (or reuses) one virtualenv per side under --envs-dir (`venv-base`, `venv-candidate`): `python -m
venv`, then `pip install <--torch> -e <tree>`, so each side runs with its own tree's pins. A venv is
reused only when its stamp (`fluxgate-ab-env.json`: interpreter, torch spec, tree, sha256 of the tree's
pyproject.toml) matches and its interpreter imports torch and fluxgate; otherwise it is cleared and made again.

Both sides' records go to --history-dir (a folder or an fsspec URL) as two run files, `<ab id>-base` and
`<ab id>-candidate`, whose environments carry {"ab_run": <ab id>, "ab_side": "base" | "candidate", "ab_tree":
<sha256 of the side's sources and pyproject.toml>, "ab_fluxgate": <the fluxgate package the side imported>,
"ab_inject": <the injected slowdown, that side only>}; such runs never enter a history window
(`fluxgate.judging.window.unfit_for_window`).

With --limits on (the default) the same pass judges the candidate as a one-sided run judges it: one image per case
against the class's stored BF16 references (at the blocks' steps against --references-dir's when they were made at
them, as the PR workflow's are; else at the model's own steps against --baselines-dir's), the class's fixed speed
and memory limits under --baselines-dir on all its images, and at the end the trade-offs against BF16 (a combo
judged at fewer steps than its model's own leaves its quality trade-off to those references' similarity limits).
Block k makes case k (in turn) on both sides, so at the blocks' steps the candidate's block images are its judged
case images; only the cases no block reached are made after the blocks.

Exit status: 0 no combo SLOW (steps or image), no memory or similarity regression, no fixed limit or trade-off
missed; 1 one of those, or a combo that failed to measure or be judged (a combo left out by --total-budget-s does
not fail the run: it is listed); 2 a bad option, a place it writes that cannot be written (tried before any side
starts), or a side that cannot start (one line: `fluxgate.ab: error: base side: ...`).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fluxgate import ab_combo, probing
from fluxgate import options as shared
from fluxgate.ab_sides import DEFAULT_TORCH, Side, SideError, prepare
from fluxgate.judging import interleave, paired
from fluxgate.judging.interleave import BASE, CANDIDATE
from fluxgate.showing.text import counted

DEFAULT_BUDGET_S = 600.0
INJECTED_SHAPES = ("steps", "host", "first", "decode")  # and stallK, caseN: tests/injectors/slow_combo.py
INJECTED_PATTERNS = r"r?stall([2-9]|[1-9][0-9]+)|case(0|[1-9][0-9]*)"
# Options whose meaning is the pytest run's (`fluxgate.options`), with the defaults and help an A/B run gives them.
SHARED = ("models", "precisions", "runtimes", "backends", "device", "profile", "prompts", "models_file",
          "fixture_cache", "steps", "model_steps", "warmup_steps", "cpu_threads", "history_dir", "baselines_dir")
CHANGES = {
    "prompts": {"help": "prompts file for both sides [each side's own fixtures/prompts.toml, else fluxgate's packaged "
                        "prompts]"},
    "models_file": {"default": None, "help": "the real profile's models file [the candidate's fixtures/models.toml]"},
    "fixture_cache": {"help": "generated checkpoints, shared by both sides [$FLUXGATE_CACHE or .fluxgate-cache]"},
    "steps": {"help": "denoising steps of every image, both sides [each model's profile default]. Fewer steps give "
                      "more blocks in the same time; the steps' verdict is on per-step times and the image's on the "
                      "image at the model's own steps (its measured time plus the steps it left out), so both keep "
                      "their meaning (FLUX.2's 50 steps of ~0.5-1 s on an H200 make a block of a minute or more)"},
    "model_steps": {"help": "denoising steps per model, over --steps (e.g. flux1-dev=6,flux2-dev=4): each model's "
                            "images about as long as the others'. The candidate's cases are judged at these steps when "
                            "--references-dir has references made at them, else at the model's own steps (an image "
                            "per case more)"},
    "baselines_dir": {"default": None, "help": "stored baselines, one folder per GPU class: the fixed limits, BF16 "
                                               "references and trade-offs the candidate is judged by [the candidate's "
                                               "baselines/]"},
    "history_dir": {"help": "where both sides' records go: a folder or an fsspec URL (s3://bucket/prefix, ...; see "
                            "`pytest --help`) [.fluxgate/history]; its one-sided runs say which combos are "
                            "host-synchronous"},
}


@dataclass
class Outcome:
    """A combo that could not be A/B-measured: its error line."""

    combo: str
    error: str


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fluxgate ab", description=__doc__.split("\n\n")[0],
                                     usage="fluxgate ab (--base REF | --base-tree BASE_TREE) [options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", metavar="REF", help="the base: a git worktree of REF (a commit, branch or tag of the "
                      "candidate's repository) under --envs-dir, made or reused")
    base.add_argument("--base-tree", type=Path, help="the base: a checkout already made")
    parser.add_argument("--base-python", default=sys.executable, help="the base's interpreter [default: this one]")
    parser.add_argument("--candidate-tree", type=Path, default=Path("."), help="the candidate's checkout [.]")
    parser.add_argument("--candidate-python", default=sys.executable, help="its interpreter [default: this one]")
    parser.add_argument("--own-envs", action="store_true",
                        help="one virtualenv per side under --envs-dir with that tree's pins (overrides --*-python)")
    parser.add_argument("--envs-dir", type=Path, default=Path(".fluxgate/ab"),
                        help="where --base's worktree (base) and --own-envs' venv-base and venv-candidate are kept "
                             "[.fluxgate/ab]")
    parser.add_argument("--torch", default=os.environ.get("FLUXGATE_TORCH", DEFAULT_TORCH),
                        help="pip requirement(s) of torch for --own-envs, shell-quoted [$FLUXGATE_TORCH or "
                             f"{DEFAULT_TORCH}]")
    shared.declare(parser, *SHARED, **CHANGES)
    parser.add_argument("--budget-s", type=_positive(float), default=DEFAULT_BUDGET_S,
                        help="seconds of blocks per combo, the candidate's judging after them included (--limits "
                             f"on: estimated from its blocks), before an unclear verdict is UNKNOWN "
                             f"[{DEFAULT_BUDGET_S:g}]")
    parser.add_argument("--total-budget-s", type=_positive(float),
                        help="seconds for the whole run: each combo (loading included) gets at most its share of what "
                             "is left; combos left without time are listed as not measured [none]")
    parser.add_argument("--ab-max-blocks", type=_positive(int), help="judged blocks per combo at most (set-aside "
                        "disturbed blocks come on top) [policy's: 20 CUDA, 12 CPU]")
    parser.add_argument("--ab-min-blocks", type=_positive(int),
                        help="blocks per combo at least, whatever the verdict after fewer (raises --ab-max-blocks to "
                             "it): record a fixed number of blocks, e.g. A/A evidence for the detection card "
                             "[policy's: 3]")
    parser.add_argument("--limits", choices=("on", "off"), default="on",
                        help="judge the candidate as a one-sided run judges it, besides the A/B verdict: the class's "
                             "fixed speed and memory limits on its images, one image per case (at the blocks' steps "
                             "where --references-dir has references made at them, else the model's) against the "
                             "stored BF16 references (similarity limits, broken-image tripwire), and the "
                             "trade-offs against BF16 [on]; off: the A/B verdict alone")
    parser.add_argument("--references-dir", type=Path, metavar="DIR",
                        help="BF16 references made at the blocks' steps, one folder per GPU class (a one-sided run "
                             "with the same --model-steps: `nox -s perf-gpu -- --model-steps ... --write-baselines "
                             "--baselines-dir DIR`): a model whose references there were made at its blocks' steps "
                             "has its cases judged at those steps, against them and the similarity limits measured "
                             "with them; the speed and memory limits stay --baselines-dir's [none: every case at "
                             "the model's own steps against --baselines-dir]")
    parser.add_argument("--max-mem-ratio", type=_positive(float),
                        help="candidate/base peak memory above this fails [1.02 CUDA, 1.10 CPU]")
    parser.add_argument("--min-ms-ssim", type=float, help="candidate vs base MS-SSIM below this fails [0.95]")
    parser.add_argument("--summary-out", type=Path,
                        help="also write the result as markdown here (the PR comment's A/B section)")
    parser.add_argument("--inject-slow", metavar="COMBO:FRACTION[:SHAPE][,...]",
                        help="tests: slow COMBO (`*`: every combo) on the candidate side by FRACTION of its denoising "
                             "loop, in SHAPE: steps (every step, the default), stallK (every K-th step), rstallK "
                             "(each step with probability 1/K), host (host time per step), first (each image's "
                             "first step), decode (the VAE decode), caseN "
                             "(every step of the N-th case's images only, 0-based: a slowdown on some prompts); a "
                             "comma-separated list slows several combos, each its own way (the candidate tree's "
                             "tests/injectors/slow_combo.py)")
    options = parser.parse_args(argv)
    options.baselines_dir = Path(options.baselines_dir).resolve() if options.baselines_dir else \
        options.candidate_tree.resolve() / "baselines"
    if options.references_dir is not None:
        options.references_dir = options.references_dir.resolve()
        if not options.references_dir.is_dir():
            parser.error(f"--references-dir {options.references_dir}: no such folder")
    from fluxgate import matrix
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS

    try:
        runtimes = list(matrix.RUNTIMES) if options.runtimes == "all" else \
            matrix.parse_names("--runtimes", options.runtimes, matrix.RUNTIMES)
        options.combos = matrix.combos(matrix.parse_names("--models", options.models, MODELS),
                                       matrix.parse_names("--precisions", options.precisions, PRECISIONS), runtimes,
                                       matrix.parse_backends(options.backends))
        options.steps_by_model = dict(options.model_steps or {})
        for model in options.steps_by_model:
            matrix.parse_names("--model-steps", model, MODELS)
        for device_type in ("cuda", "cpu"):  # both policies' block counts, before any side starts
            interleave.policy_with(device_type, options.ab_max_blocks, options.ab_min_blocks)
        if options.inject_slow:
            options.inject_slow = _injections(options.inject_slow)
    except ValueError as error:
        parser.error(str(error))
    return options


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}': must be above 0")
        return value
    return parse


def host_synchronous_combos(store, gpu_class: str, window: int = 5) -> dict[str, str]:
    """combo -> why an A/B run judges it with `paired.host_synchronous`: its newest one-sided record of the class in
    `store` (a HistoryStore, `fluxgate.storing.open_store`) AND the `window` one-sided records before it all show it
    host-synchronous (their kernel paths: `judging.compare.is_host_synchronous`), at least one of them older. On a PR
    these are main's runs (the workflow downloads main's history; A/B runs never count), so a combo the PR made
    host-synchronous (a new sync in its step, which may be the regression) is not among them: it keeps the tighter
    rule, as the one-sided history rule does. Empty when the store holds no such records; unreadable runs are skipped
    (`store.load` warns)."""
    from fluxgate.judging.compare import host_syncs_per_step, is_host_synchronous

    runs: dict[str, list] = {}
    for record in store.load():
        if record.gpu_class == gpu_class and not record.env.get("ab_run") and host_syncs_per_step(record) is not None:
            runs.setdefault(record.combo, []).append(record)
    found = {}
    for combo, records in runs.items():
        records.sort(key=lambda record: record.run_id or "")
        recent = records[-(window + 1):]
        if len(recent) >= 2 and all(is_host_synchronous(record) for record in recent):
            found[combo] = (f"host-synchronous in its {len(recent)} newest one-sided runs (to "
                            f"{recent[-1].run_id or 'an unnamed run'})")
    return found


def _injections(text: str) -> list[tuple[str, float, str]]:
    """--inject-slow's COMBO:FRACTION[:SHAPE][,...] as (combo id or "*", fraction, shape) per combo. Raises
    ValueError naming the bad part."""
    from fluxgate import matrix

    plan = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3):
            raise ValueError(f"--inject-slow {part!r}: want COMBO:FRACTION[:SHAPE]")
        combo, fraction, shape = (fields + ["steps"])[:3]
        if not (shape in INJECTED_SHAPES or re.fullmatch(INJECTED_PATTERNS, shape)):
            raise ValueError(f"--inject-slow {part!r}: SHAPE {shape!r} is none of {', '.join(INJECTED_SHAPES)}, "
                             "stallK or rstallK (K >= 2), caseN (N >= 0)")
        if not (0 <= float(fraction) < 10):  # also refuses nan
            raise ValueError(f"--inject-slow {part!r}: FRACTION {fraction} is not a fraction of the loop (0 to 10)")
        plan.append((combo if combo == "*" else matrix.Combo.parse(combo).id, float(fraction), shape))
    combos = [combo for combo, _, _ in plan]
    if len(set(combos)) < len(combos) or ("*" in combos and len(combos) > 1):
        raise ValueError(f"--inject-slow {text!r}: each combo once, and `*` alone")
    return plan


def start_sides(wanted: dict[str, tuple]) -> dict[str, Side]:
    """Each side's worker (name -> (tree, python, config)), started at once: each imports torch and its tree's
    fluxgate, some seconds each; meanwhile this process imports what compares the sides' images (torch,
    torchmetrics: the first block otherwise carried it, ~16 s over its images on the H100 host, 2.4 s on a 2-core
    CPU). Raises SideError (one line, naming every side that failed) with every side that did start closed;
    KeyboardInterrupt likewise closes them first."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(wanted) + 1) as pool:
        futures = {name: pool.submit(Side, name, *arguments) for name, arguments in wanted.items()}
        pool.submit(importlib.import_module, "fluxgate.judging.similarity")
        started, errors = {}, {}
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except BaseException as error:  # noqa: BLE001 - every side is waited for, then the others closed
                errors[name] = error
    if errors:
        for side in started.values():
            side.close()
        for error in errors.values():
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
                raise error
        raise SideError("; ".join(str(error) if isinstance(error, SideError) else
                                  f"{name} side: cannot start: {type(error).__name__}: "
                                  + " ".join(str(error).split())[:300] for name, error in errors.items()))
    return started


def judge_steps(options: argparse.Namespace, gpu_class: str, model: str) -> tuple[int | None, Path | None, str]:
    """How the candidate's case images of `model` are judged: (steps, references folder, a note). At the blocks'
    steps (--model-steps, else --steps) against --references-dir when its references of the class were made at them,
    so judging costs no image longer than a block's; else (None, None): at the model's own steps against
    --baselines-dir's references, the note saying why when --references-dir was given."""
    from fluxgate.judging import baselines

    steps = options.steps_by_model.get(model) or options.steps
    if not options.references_dir:
        return None, None, ""
    made_at = baselines.recorded_steps(options.references_dir, gpu_class, model)
    if steps and made_at == steps:
        return steps, options.references_dir, f"cases judged at {steps} steps against {options.references_dir}"
    wanted = f"{steps} steps" if steps else "the blocks' steps (no --model-steps or --steps)"
    found = f"made at {made_at} steps" if made_at else "none there"
    return None, None, (f"{options.references_dir / gpu_class} has no {model} references at {wanted} ({found}): "
                        f"cases judged at the model's own steps against {options.baselines_dir / gpu_class}")


def new_ab_id() -> str:
    """`20261130T083818Z-7b3312`: sortable and unique, like a run id."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def main(argv: list[str] | None = None) -> int:
    """Run the A/B comparison; returns the exit status (module docstring)."""
    options = _options(argv)
    from fluxgate.errors import HistoryError
    from fluxgate.showing import ab_table
    from fluxgate.storing import open_store

    sides: dict[str, Side] = {}
    started = time.monotonic()
    results, errors, left_out = [], [], []
    site = Path(tempfile.mkdtemp(prefix="fluxgate-ab-"))  # the sides' generated distributions, read all run long
    try:
        store = open_store(options.history_dir)  # a URL no installed backend serves fails here, before any side
        # every place the run writes, tried before any side starts (a store without credentials, a read-only folder)
        probing.check_writable([("--history-dir", options.history_dir), ("--fixture-cache", options.fixture_cache),
                                ("--envs-dir", options.envs_dir)]
                               + ([("--summary-out", options.summary_out.parent)] if options.summary_out else []))
        trees, configs, pythons = prepare(options, site)
        sides.update(start_sides({name: (trees[name], pythons[name], configs[name]) for name in (BASE, CANDIDATE)}))
        for name in (BASE, CANDIDATE):
            if sides[name].hello.get("hooks"):
                print(f"{name} side: hooks {', '.join(sides[name].hello['hooks'])}", file=sys.stderr, flush=True)
        device_type = sides[BASE].hello["device"].split(":")[0]
        if sides[CANDIDATE].hello["device"] != sides[BASE].hello["device"]:
            raise SideError(f"the sides resolved different devices: base {sides[BASE].hello['device']}, "
                            f"candidate {sides[CANDIDATE].hello['device']}")
        setup_s = time.monotonic() - started
        policy = interleave.policy_with(device_type, options.ab_max_blocks, options.ab_min_blocks)
        noted: set[str] = set()  # models whose --references-dir note was printed
        synchronous = host_synchronous_combos(store, sides[BASE].hello["gpu_class"]) if device_type == "cuda" else {}
        limits = interleave.limits_for(device_type, options.max_mem_ratio, options.min_ms_ssim)
        ab_id = new_ab_id()
        writers = {}
        for name, side in sides.items():
            environment = {**side.hello["environment"], "ab_run": ab_id, "ab_side": name,
                           "ab_tree": trees[name].digest(), "ab_python": side.hello.get("python", pythons[name]),
                           "ab_fluxgate": str(Path(side.hello.get("fluxgate", configs[name]["fluxgate"])).parent)}
            if configs[name]["inject"]:
                plan = [dict(zip(("combo", "fraction", "shape"), entry)) for entry in options.inject_slow]
                environment["ab_inject"] = plan[0] if len(plan) == 1 else {"plan": plan}
            writers[name] = store.open_run(f"{ab_id}-{name}", environment)
        print(f"A/B run {ab_id} on {sides[BASE].hello['device']} (profile {sides[BASE].hello['profile']}): "
              f"base {trees[BASE].root}, candidate {trees[CANDIDATE].root}; {counted(len(options.combos), 'combo')}",
              flush=True)
        for index, combo in enumerate(options.combos):
            deadline = None
            if options.total_budget_s:
                left = options.total_budget_s - (time.monotonic() - started)
                share = left / (len(options.combos) - index)
                if share <= 0:
                    left_out.append(combo.id)
                    print(f"[{index + 1}/{len(options.combos)}] {combo.id}: not measured: --total-budget-s "
                          f"{options.total_budget_s:g} spent", file=sys.stderr, flush=True)
                    continue
                deadline = time.monotonic() + share
            combo_policy = paired.host_synchronous(policy) if combo.id in synchronous else policy
            print(f"[{index + 1}/{len(options.combos)}] {combo.id}: loading both sides"
                  + (f" (share of the total budget: {deadline - time.monotonic():.0f} s)" if deadline else "")
                  + (f"; {synchronous[combo.id]}: judged at ±{combo_policy.min_effect:.0%}"
                     if combo.id in synchronous else ""), file=sys.stderr, flush=True)
            steps = options.steps_by_model.get(combo.model)
            case_steps, references, note = judge_steps(options, sides[BASE].hello["gpu_class"], combo.model)
            if note and options.limits == "on" and combo.model not in noted:
                noted.add(combo.model)
                print(f"  {combo.model}: {note}", file=sys.stderr, flush=True)
            try:
                result, settings = ab_combo.measure_combo(
                    combo, sides, combo_policy, options.budget_s, limits, deadline, steps,
                    combo.model_spec.settings(sides[BASE].hello["profile"]).steps,
                    options.baselines_dir if options.limits == "on" else None, case_steps, references)
            except SideError as error:
                errors.append(Outcome(combo.id, str(error)))
                print(f"{combo.id}: ERROR: {error}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            ab_combo.keep_images(result, writers[CANDIDATE])
            print(f"{combo.id}: {result.verdict.message}; {result.seconds:.1f} s of blocks"
                  + (f"; limits: {result.limits_note}" if result.limits_note else "")
                  + f"; {time.monotonic() - started:.0f} s into the run", file=sys.stderr, flush=True)
            for name, side in sides.items():
                writers[name].append(ab_combo.records(result, combo, side.hello, name, settings[name], combo_policy,
                                              combo.id in synchronous))
    except (SideError, HistoryError, probing.UnwritableError) as error:
        print(f"fluxgate.ab: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the history store failed mid-run (network, quota): its records are lost, said once
        print(f"fluxgate.ab: error: --history-dir {options.history_dir}: {type(error).__name__}: {error}",
              file=sys.stderr)
        return 2
    finally:
        for side in sides.values():
            side.close()
        shutil.rmtree(site, ignore_errors=True)
    tradeoffs, traded_off = _tradeoffs(store, writers.get(CANDIDATE), options,
                                       _quality_judged_by(results, sides[BASE].hello["profile"]) if sides else {})
    wall_s = time.monotonic() - started
    for line in ab_table.table(results):
        print(line)
    for line in tradeoffs:
        print(line)
    for error in errors:
        print(f"{error.combo}: ERROR: {error.error}")
    if left_out:
        print(f"not measured (--total-budget-s {options.total_budget_s:g} spent): {', '.join(left_out)}")
    timed_s = sum(s for result in results for pair in result.pairs for side in (BASE, CANDIDATE)
                  for s in getattr(pair, side)["step_times_s"])
    print(f"wall {wall_s:.1f} s for {counted(len(results), 'combo')}, of which {timed_s:.1f} s "
          f"({timed_s / wall_s:.0%}) inside timed steps of both sides; history: {writers[BASE].location} and "
          f"{writers[CANDIDATE].location}")
    print(phase_line(results, wall_s, setup_s))
    if options.summary_out:
        options.summary_out.parent.mkdir(parents=True, exist_ok=True)
        options.summary_out.write_text(ab_table.markdown(
            results, [(e.combo, e.error) for e in errors], left_out, wall_s=wall_s, timed_s=timed_s,
            title=f"A/B run `{ab_id}` on {sides[BASE].hello['gpu_class']}",
            base=_describe(sides[BASE].hello), candidate=_describe(sides[CANDIDATE].hello), tradeoffs=tradeoffs,
            traded_off=traded_off))
    return 1 if errors or traded_off or any(result.failed for result in results) else 0


def phase_line(results: list, wall_s: float, setup_s: float) -> str:
    """Where an A/B run's wall time went: starting the sides (worktree, venvs, workers), loads (both sides'
    pipelines, warm-ups and compiles included), blocks (the paired images and their comparison), judging (the
    candidate's case images at the model's steps and its one-sided limits), releases, and the rest (trade-offs,
    report, history writes)."""
    totals = {name: sum((getattr(result, "phases_s", None) or {}).get(name, 0.0) for result in results)
              for name in ("load_s", "blocks_s", "judge_s", "release_s")}
    rest = wall_s - setup_s - sum(totals.values())
    return (f"phases: sides started {setup_s:.0f} s, loads {totals['load_s']:.0f} s, blocks {totals['blocks_s']:.0f} "
            f"s, judging the candidate {totals['judge_s']:.0f} s, releases {totals['release_s']:.0f} s, the rest "
            f"{rest:.0f} s (of {wall_s:.0f} s)")


def _tradeoffs(store, writer, options, quality_judged_by: dict[str, str]) -> tuple[list[str], int]:
    """The candidate's trade-offs against BF16 of the same run (`judging.tradeoff_checks`), as a one-sided run checks
    them at its end: (its summary lines, how many failed); nothing with `--limits off` or without a class file that
    has trade-offs."""
    if options.limits != "on" or writer is None:
        return [], 0
    from fluxgate.judging import tradeoff_checks

    lines, failed, problem = tradeoff_checks.check_stored(store, writer.run_id, options.baselines_dir,
                                                          quality_judged_by)
    return ([problem] if problem else lines), failed


def _quality_judged_by(results: list, profile: str) -> dict[str, str]:
    """Combos whose cases were judged at fewer steps than their model's own, against --references-dir (the worker's
    `judge` says which folder it used): their quality trade-off (the class's tiers and noise floor, measured at the
    model's own steps) is left to those references' similarity limits, measured at the same steps."""
    from fluxgate.matrix import Combo

    judged_by = {}
    for result in results:
        judged = getattr(result, "judged", None) or {}
        own = Combo.parse(result.combo).model_spec.settings(profile).steps
        if judged.get("references") and judged.get("steps") != own:
            judged_by[result.combo] = (f"images at {judged['steps']} steps (the model's own: {own}), judged by the "
                                       f"similarity limits of the references made at them ({judged['references']})")
    return judged_by


def _describe(hello: dict) -> str:
    """A side's commit for the summary: `abc1234` (+ uncommitted changes), or `no git commit`."""
    environment = hello.get("environment") or {}
    commit = environment.get("git_commit")
    if not commit:
        return "no git commit"
    return commit[:12] + (" + uncommitted changes" if environment.get("git_dirty") else "")


if __name__ == "__main__":
    sys.exit(main())
