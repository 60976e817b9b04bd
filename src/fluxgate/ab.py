"""Interleaved A/B: base and candidate measured on one device in the same job, image by image, judged on their
paired per-block step-time ratios (issue 18).

    python -m fluxgate.ab --base-tree .fluxgate/ab/base [--candidate-tree .] --models flux1-dev --precisions bf16
    nox -s perf-ab -- --base origin/main [--own-envs] [these options]   (makes the base's git worktree first)

Each side is one long-lived worker process (`fluxgate.measuring.ab_worker`, started through execnet) running its own
tree's fluxgate (`<tree>/src` first on its path) in its own interpreter (`--base-python`, `--candidate-python`;
default: this one). For each combo both sides load its pipeline (when both do not fit in device memory at once,
each image loads its side again: said in the output), then blocks of one base and one candidate image, the order
alternating (A B, B A, ...), until the paired verdict (`fluxgate.judging.paired`, the device's policy) is clear:
SAME, SLOW, FAST, or UNKNOWN at --ab-max-blocks or --budget-s. Memory (candidate/base peak GiB) and similarity
(MS-SSIM of the candidate's image against the base's of the same seed) are judged on the same pairs.

Both sides' records go to --history-dir as two run files, `<ab id>-base` and `<ab id>-candidate`, whose environments
carry {"ab_run": <ab id>, "ab_side": "base" | "candidate"}; such runs never enter a history window
(`fluxgate.judging.window.unfit_for_window`).

Exit status: 0 no combo SLOW and no memory or similarity regression; 1 one of those, or a combo that failed to
measure; 2 a bad option or a side that cannot start (one line: `fluxgate.ab: error: base side: ...`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fluxgate.judging import interleave
from fluxgate.judging.interleave import BASE, CANDIDATE

ENV = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_GGUF_CUDA_KERNELS": "false"}
DEFAULT_BUDGET_S = 600.0


class SideError(Exception):
    """A side's worker answered with an error (`oom`: it ran out of device memory) or could not be reached."""

    def __init__(self, message: str, oom: bool = False):
        super().__init__(message)
        self.oom = oom


class Side:
    """One side's worker: an execnet gateway to `python` running ab_worker with `config`. Raises SideError (one line
    naming the side) when it cannot start."""

    def __init__(self, name: str, tree: Path, python: str, config: dict):
        import execnet

        from fluxgate.measuring import ab_worker

        self.name, self.tree = name, tree
        if not (tree / "src" / "fluxgate").is_dir():
            raise SideError(f"{name} side: {tree} is no fluxgate tree (no src/fluxgate there)")
        try:
            self.gateway = execnet.makegateway(f"popen//python={python}//chdir={tree}")
            self.channel = self.gateway.remote_exec(ab_worker)
        except Exception as error:  # execnet raises plain exceptions for a missing or broken interpreter
            raise SideError(f"{name} side: cannot start {python}: {type(error).__name__}: {error}") from None
        try:
            self.hello = self.ask(config)
        except SideError:
            self.gateway.exit()
            raise
        expected = (tree / "src" / "fluxgate").resolve()
        if Path(self.hello["fluxgate"]).resolve().parent != expected:
            self.close()
            raise SideError(f"{name} side: imported fluxgate from {self.hello['fluxgate']}, not {expected}")

    def ask(self, message: dict) -> dict:
        """Send one message, return the answer; SideError for an error answer or a worker that ended."""
        try:
            self.channel.send(message)
            answer = self.channel.receive()
        except Exception as error:  # execnet: RemoteError, EOFError, channel closed
            text = " ".join(str(error).split())[-400:]
            raise SideError(f"{self.name} side: worker failed: {type(error).__name__}: {text}") from None
        if not answer.get("ok"):
            raise SideError(f"{self.name} side: {answer.get('error')}", oom=bool(answer.get("oom")))
        return answer

    def close(self) -> None:
        try:
            self.ask({"op": "close"})
        except SideError:
            pass
        self.gateway.exit()


@dataclass
class Outcome:
    """A combo that could not be A/B-measured: its error line."""

    combo: str
    error: str


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fluxgate.ab", description=__doc__.split("\n\n")[0],
                                     usage="python -m fluxgate.ab --base-tree BASE_TREE [options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--base-tree", required=True, type=Path, help="the base's checkout (a git worktree of REF)")
    parser.add_argument("--base-python", default=sys.executable, help="the base's interpreter [default: this one]")
    parser.add_argument("--candidate-tree", type=Path, default=Path("."), help="the candidate's checkout [.]")
    parser.add_argument("--candidate-python", default=sys.executable, help="its interpreter [default: this one]")
    parser.add_argument("--models", help="comma-separated models [all]")
    parser.add_argument("--precisions", help="comma-separated precisions [all]")
    parser.add_argument("--runtimes", default="eager", help="eager, compile or all [eager]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N [auto]")
    parser.add_argument("--profile", default="auto", help="auto, tiny, synthetic, real [auto: synthetic on CUDA]")
    parser.add_argument("--prompts", type=Path, help="prompts file for both sides [candidate's fixtures/prompts.toml]")
    parser.add_argument("--models-file", type=Path, help="real profile's models file [candidate's fixtures/models.toml]")
    parser.add_argument("--fixture-cache", type=Path,
                        default=Path(os.environ.get("FLUXGATE_CACHE", ".fluxgate-cache")),
                        help="generated checkpoints, shared by both sides [$FLUXGATE_CACHE or .fluxgate-cache]")
    parser.add_argument("--steps", type=_positive(int), help="denoising steps [profile's]")
    parser.add_argument("--warmup-steps", type=_positive(int), default=1, help="steps of the warm-up image [1]")
    parser.add_argument("--cpu-threads", type=_positive(int),
                        help="torch threads per side on a CPU [half the usable cores]")
    parser.add_argument("--budget-s", type=_positive(float), default=DEFAULT_BUDGET_S,
                        help=f"seconds of blocks per combo before an unclear verdict is UNKNOWN [{DEFAULT_BUDGET_S:g}]")
    parser.add_argument("--ab-max-blocks", type=_positive(int), help="blocks per combo at most [policy's: 20 CUDA, "
                        "12 CPU]")
    parser.add_argument("--max-mem-ratio", type=_positive(float),
                        help="candidate/base peak memory above this fails [1.02 CUDA, 1.10 CPU]")
    parser.add_argument("--min-ms-ssim", type=float, help="candidate vs base MS-SSIM below this fails [0.95]")
    parser.add_argument("--history-dir", type=Path, default=Path(".fluxgate/history"),
                        help="where both sides' records go [.fluxgate/history]")
    parser.add_argument("--inject-slow", metavar="COMBO:FRACTION",
                        help="tests: slow COMBO's steps on the candidate side by FRACTION of its first step "
                             "(the candidate tree's tests/injectors/slow_combo.py)")
    options = parser.parse_args(argv)
    from fluxgate import matrix
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS

    try:
        runtimes = list(matrix.RUNTIMES) if options.runtimes == "all" else \
            matrix.parse_names("--runtimes", options.runtimes, matrix.RUNTIMES)
        options.combos = matrix.combos(matrix.parse_names("--models", options.models, MODELS),
                                       matrix.parse_names("--precisions", options.precisions, PRECISIONS), runtimes)
        if options.inject_slow:
            combo, _, fraction = options.inject_slow.rpartition(":")
            options.inject_slow = (matrix.Combo.parse(combo).id, float(fraction))
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


def _config(options: argparse.Namespace, tree: Path, side: str) -> dict:
    candidate_tree = options.candidate_tree.resolve()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    config = {"tree": str(tree), "profile": options.profile, "device": options.device,
              "prompts": str((options.prompts or candidate_tree / "fixtures/prompts.toml").resolve()),
              "models_file": str((options.models_file or candidate_tree / "fixtures/models.toml").resolve()),
              "fixture_cache": str(options.fixture_cache.resolve()), "warmup_steps": options.warmup_steps,
              "steps": options.steps, "cpu_threads": options.cpu_threads or max(1, usable // 2),
              "env": ENV, "inject": None}
    if side == CANDIDATE and options.inject_slow:
        combo, fraction = options.inject_slow
        config["inject"] = {"path": str(tree / "tests" / "injectors"), "module": "slow_combo"}
        config["env"] = {**ENV, "FLUXGATE_SLOW_COMBO": combo, "FLUXGATE_SLOW_FRACTION": str(fraction)}
    return config


def _measure_combo(combo, sides: dict[str, Side], policy, budget_s: float, limits
                   ) -> tuple[interleave.ComboResult, dict[str, dict]]:
    """Load the combo on both sides (or alternate loads when both do not fit), then `interleave.run_blocks`; the
    sides hold nothing afterwards. Returns the result and each side's image settings. Raises SideError."""
    base = sides[BASE]
    alternating, settings = False, {}

    def load(side: str) -> None:
        settings[side] = sides[side].ask({"op": "load", "combo": combo.id})["settings"]

    load(BASE)
    try:
        load(CANDIDATE)
    except SideError as error:
        if not error.oom:
            raise
        alternating = True  # the candidate's failed load is unloaded already
        base.ask({"op": "unload"})

    def image(side: str) -> dict:
        if not alternating:
            return sides[side].ask({"op": "image"})
        load(side)
        try:
            return sides[side].ask({"op": "image"})
        finally:
            sides[side].ask({"op": "unload"})

    try:
        result = interleave.run_blocks(combo.id, image, policy, budget_s, limits, alternating_loads=alternating)
        return result, settings
    finally:
        for side in sides.values():
            side.ask({"op": "unload"})


def _records(result: interleave.ComboResult, combo, hello: dict, side: str, settings: dict):
    """One side's Record of a combo: its images' steps pooled, the A/B verdict under `extra["ab"]`."""
    from fluxgate.storing.record import FAILED, PASSED, Metrics, Record

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
    ab = {"outcome": verdict.outcome, "ratio": verdict.ratio, "low": verdict.low, "high": verdict.high,
          "blocks": verdict.blocks, "message": verdict.message, "mem_ratio": result.mem_ratio,
          "seconds": result.seconds, "alternating_loads": result.alternating_loads, "contention": result.contention}
    failed = side == CANDIDATE and result.failed
    return Record(combo.id, combo.model, combo.precision, combo.runtime, hello["profile"], hello["gpu_class"],
                  settings=settings, metrics=metrics, outcome=FAILED if failed else PASSED,
                  failures=([verdict.message] if verdict.outcome == "SLOW" else []) + result.failures
                  if failed else None, extra={"ab": ab})


def new_ab_id() -> str:
    """`20261130T083818Z-7b3312`: sortable and unique, like a run id."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def main(argv: list[str] | None = None) -> int:
    """Run the A/B comparison; returns the exit status (module docstring)."""
    options = _options(argv)
    from fluxgate.showing import ab_table
    from fluxgate.storing.local import LocalFolderStore

    trees = {BASE: options.base_tree.resolve(), CANDIDATE: options.candidate_tree.resolve()}
    pythons = {BASE: options.base_python, CANDIDATE: options.candidate_python}
    sides: dict[str, Side] = {}
    started = time.monotonic()
    try:
        for name in (BASE, CANDIDATE):
            sides[name] = Side(name, trees[name], pythons[name], _config(options, trees[name], name))
        device_type = sides[BASE].hello["device"].split(":")[0]
        if sides[CANDIDATE].hello["device"] != sides[BASE].hello["device"]:
            raise SideError(f"the sides resolved different devices: base {sides[BASE].hello['device']}, "
                            f"candidate {sides[CANDIDATE].hello['device']}")
        policy = interleave.policy_with(device_type, options.ab_max_blocks)
        limits = interleave.limits_for(device_type, options.max_mem_ratio, options.min_ms_ssim)
        ab_id = new_ab_id()
        store = LocalFolderStore(options.history_dir)
        writers = {name: store.open_run(f"{ab_id}-{name}", {**side.hello["environment"], "ab_run": ab_id,
                                                            "ab_side": name}) for name, side in sides.items()}
        print(f"A/B run {ab_id} on {sides[BASE].hello['device']} (profile {sides[BASE].hello['profile']}): "
              f"base {trees[BASE]}, candidate {trees[CANDIDATE]}", flush=True)
        results, errors = [], []
        for combo in options.combos:
            try:
                result, settings = _measure_combo(combo, sides, policy, options.budget_s, limits)
            except SideError as error:
                errors.append(Outcome(combo.id, str(error)))
                print(f"{combo.id}: ERROR: {error}", file=sys.stderr, flush=True)
                continue
            results.append(result)
            print(f"{combo.id}: {result.verdict.message}", file=sys.stderr, flush=True)
            for name, side in sides.items():
                writers[name].append(_records(result, combo, side.hello, name, settings[name]))
    except SideError as error:
        print(f"fluxgate.ab: error: {error}", file=sys.stderr)
        return 2
    finally:
        for side in sides.values():
            side.close()
    for line in ab_table.table(results):
        print(line)
    for error in errors:
        print(f"{error.combo}: ERROR: {error.error}")
    print(f"wall {time.monotonic() - started:.1f} s; history: {options.history_dir}/{ab_id}-base.json and "
          f"{ab_id}-candidate.json")
    return 1 if errors or any(result.failed for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
