"""`python -m fluxgate.thresholds`: a GPU class's limits derived from recorded runs, in four parts.

- speed: each combo's min it/s from the spread of its runs on several GPUs (`fluxgate.judging.spread`);
- quality: each model's BF16 noise floor and each combo's similarity limits from it and its tier
  (`fluxgate.judging.noise`);
- tradeoffs: each quantized combo's peak-memory and speed ratio to bf16 of the same run and its quality tier
  (`fluxgate.judging.tradeoffs`);
- compile: each compiled combo's compile-time bound from the slowest compile of its runs
  (`fluxgate.judging.compile_time`).

Each part is derived on its own: one that cannot be derived prints a one-line error and the others are still printed
(and written with --write); the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from fluxgate.errors import FluxgateError
from fluxgate.judging import compile_time, noise, spread, tradeoffs
from fluxgate.storing.fsstore import load_paths

PARTS = ("speed", "quality", "tradeoffs", "compile")
_ERRORS = (ValueError, KeyError, OSError, FluxgateError)


def _speed(records, gpu_class: str, table: dict, text: str, source: str) -> tuple[str, list[str]]:
    skipped: list[str] = []
    limits = spread.derive(records, gpu_class, skipped)
    lines = [f"speed limits ({spread.STATISTIC} it/s from the spread of the runs):"]
    lines += [f"  {limit.combo}: min {limit.min_it_s:.3f} it/s ({limit.derivation})" for limit in limits.values()]
    lines += [f"  {line}" for line in skipped]
    return spread.apply_text(text, limits, source), lines


def _listed(limits: dict, table: dict) -> tuple[dict, list[str]]:
    """(the limits of combos the thresholds `table` has an entry for, the other combo ids): a combo without one
    (e.g. one compile run, made with --write-baselines elsewhere) gets no limit."""
    from fluxgate.matrix import Combo

    unlisted = sorted(c for c in limits if not isinstance(
        (table.get(Combo.parse(c).model) or {}).get(Combo.parse(c).variant), dict))
    return {c: limit for c, limit in limits.items() if c not in unlisted}, unlisted


def _quality(records, gpu_class: str, table: dict, text: str, source: str) -> tuple[str, list[str]]:
    floors = noise.derive_floors(records, gpu_class)
    limits = noise.derive_limits(floors, table, records, gpu_class)
    limits, unlisted = _listed(limits, table)
    lines = ["noise floors (each model's bf16 records against its reference image):"]
    lines += [f"  {floor.model}: {floor.derivation}" for floor in floors.values()]
    lines.append(f"similarity limits (tier budget + K x noise floor, K = {noise.K:g}):")
    lines += [f"  {limit.combo}: min MS-SSIM {limit.min_ms_ssim:.6f}, min PSNR {limit.min_psnr_db:.3f} dB"
              f"{', below tier' if limit.below_tier else ''} ({limit.derivation})" for limit in limits.values()]
    lines += [f"  {combo}: no entry in {source}: no limit written (its runs still count in the noise floor)"
              for combo in unlisted]
    return noise.apply_text(text, floors, limits, source), lines


def _tradeoffs(records, gpu_class: str, table: dict, text: str, source: str) -> tuple[str, list[str]]:
    found = tradeoffs.derive(records, gpu_class, table)
    lines = ["trade-offs against bf16 of the same run:"]
    for tradeoff in found.values():
        entry = tradeoff.to_toml()
        speed = (f"speed {entry['min_speed_ratio']}x-{entry['max_speed_ratio']}x" if "min_speed_ratio" in entry
                 else "speed not gated")
        quality = "below tier (stated)" if tradeoff.below_tier else f"inside the {tradeoff.tier} tier"
        lines.append(f"  {tradeoff.combo}: {tradeoff.statement}; limits: memory <= {tradeoff.max_mem_ratio}x, "
                     f"{speed}, quality {quality}")
        lines += [f"      memory: {tradeoff.mem_derivation}", f"      speed: {tradeoff.speed_derivation}",
                  f"      quality: {tradeoff.quality_derivation}"]
    return tradeoffs.apply_text(text, found), lines


def _compile(records, gpu_class: str, table: dict, text: str, source: str) -> tuple[str, list[str]]:
    limits, unlisted = _listed(compile_time.derive(records, gpu_class, table.get("margins")), table)
    lines = ["compile-time bounds (from the slowest compile of the runs):"]
    lines += [f"  {limit.combo}: max {limit.max_compile_s:.1f} s ({limit.derivation})" for limit in limits.values()]
    lines += [f"  {combo}: no entry in {source}: no bound written (write its baselines first)" for combo in unlisted]
    if not limits and not unlisted:
        lines.append(f"  no run of {gpu_class} recorded a compile time (--runtimes compile or all): none derived")
    return compile_time.apply_text(text, limits, source), lines


DERIVE = {"speed": _speed, "quality": _quality, "tradeoffs": _tradeoffs, "compile": _compile}


def _parts(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(PARTS)} (comma-separated)")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fluxgate thresholds", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="parts: speed = min it/s per combo from the spread of the runs (needs 3 runs on 2 GPUs per combo); "
               "quality = each model's bf16 noise floor ([noise_floor.<model>]) and every combo's min_ms_ssim / "
               "min_psnr_db from it and its tier; tradeoffs = [tradeoffs.<model>.<variant>]: peak memory and p10 "
               "speed of each quantized combo against bf16 of the same run, and its quality tier; compile = each "
               "compiled combo's max_compile_s from the slowest compile of its runs. A part that cannot "
               "be derived prints one error line; the others are still printed and written; exit status 2.")
    parser.add_argument("runs", nargs="+",
                        help="history run files (<run_id>.json) or folders of them (paths or URLs), from several "
                             "runs and GPUs of the class")
    parser.add_argument("--gpu-class", required=True, help="the class whose limits to derive, e.g. nvidia-h200 or cpu")
    parser.add_argument("--baselines-dir", type=Path, default=Path("baselines"),
                        help="baselines root holding <gpu-class>/thresholds.toml [default: baselines]")
    parser.add_argument("--parts", type=_parts, default=list(PARTS),
                        help=f"which parts to derive, comma-separated [default: {','.join(PARTS)}]")
    parser.add_argument("--write", action="store_true",
                        help="rewrite the thresholds file with the parts derived (default: only print)")
    args = parser.parse_args(argv)
    path = args.baselines_dir / args.gpu_class / "thresholds.toml"
    from fluxgate.storing.fsio import is_url

    missing = [run for run in args.runs if not is_url(run) and not Path(run).exists()]
    if missing:
        print(f"fluxgate.thresholds: error: {', '.join(missing)}: no such run file or folder", file=sys.stderr)
        return 2
    try:
        records = load_paths(args.runs)
    except _ERRORS as error:
        print(f"fluxgate.thresholds: error: {error}", file=sys.stderr)
        return 2
    try:
        text = path.read_text()
        table = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        print(f"fluxgate.thresholds: error: {path}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    failed, derived = [], []
    for part in args.parts:
        try:
            text, lines = DERIVE[part](records, args.gpu_class, table, text, str(path))
        except _ERRORS as error:
            where = f"{path}: " if isinstance(error, KeyError) else ""  # a key missing from the file
            print(f"fluxgate.thresholds: error: {part}: {where}{type(error).__name__ + ': ' if where else ''}{error}",
                  file=sys.stderr)
            failed.append(part)
            continue
        derived.append(part)
        print("\n".join(lines))
    if args.write and derived:
        from fluxgate.files import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(text))
        print(f"wrote {path} ({', '.join(derived)}{'; not ' + ', '.join(failed) if failed else ''})")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
