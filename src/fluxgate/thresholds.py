"""`python -m fluxgate.thresholds`: a GPU class's speed limits from recorded runs (see `fluxgate.judging.spread`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxgate.errors import FluxgateError
from fluxgate.judging import spread
from fluxgate.storing.fsstore import load_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxgate.thresholds", description=spread.__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="history run files (<run_id>.json) or folders of them (paths or URLs), from several GPUs "
                             "of the class")
    parser.add_argument("--gpu-class", required=True, help="the class whose limits to derive, e.g. nvidia-h200")
    parser.add_argument("--baselines-dir", type=Path, default=Path("baselines"),
                        help="baselines root holding <gpu-class>/thresholds.toml [default: baselines]")
    parser.add_argument("--write", action="store_true", help="rewrite the thresholds file (default: only print)")
    args = parser.parse_args(argv)
    try:
        limits = spread.derive(load_paths(args.runs), args.gpu_class)
        path = args.baselines_dir / args.gpu_class / "thresholds.toml"
        text = spread.apply(path, limits)
    except (ValueError, OSError, FluxgateError) as error:
        print(f"fluxgate.thresholds: error: {error}", file=sys.stderr)
        return 2
    for limit in limits.values():
        print(f"{limit.combo}: min {limit.min_it_s:.3f} it/s ({limit.derivation})")
    if args.write:
        from fluxgate.files import atomic_write

        atomic_write(path, lambda tmp: tmp.write_text(text))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
