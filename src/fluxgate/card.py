"""`python -m fluxgate.card`: the detection card of a GPU class from recorded runs (see `fluxgate.showing.card`)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from fluxgate.errors import FluxgateError
from fluxgate.showing import ab_card, card
from fluxgate.storing.fsstore import load_paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxgate card", description=card.__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="history run files or folders of them (paths or URLs)")
    parser.add_argument("--gpu-class", required=True, help="the class to make the card of, e.g. nvidia-h200")
    parser.add_argument("--baselines-dir", type=Path, default=Path("baselines"),
                        help="holds <gpu-class>/thresholds.toml for the fixed limits [default: baselines]")
    parser.add_argument("--out", type=Path, default=None, help="write the card (markdown) here [default: print]")
    args = parser.parse_args(argv)
    try:
        records = load_paths(args.runs)
    except (FluxgateError, OSError) as error:  # a URL no fsspec backend serves, a folder that cannot be listed
        print(f"fluxgate.card: error: {error}", file=sys.stderr)
        return 2
    path = args.baselines_dir / args.gpu_class / "thresholds.toml"
    thresholds = tomllib.loads(path.read_text()) if path.is_file() else None
    cards = card.build(records, args.gpu_class, thresholds)
    # recorded A/A A/B runs, if any: the A/B rule's section, host-synchronous combos (from the one-sided runs' kernel
    # paths) judged as an A/B run judges them
    ab_cards = ab_card.build(records, args.gpu_class,
                             host_synchronous=[row.combo for row in cards if row.host_synchronous])
    if not cards and not ab_cards:
        print(f"fluxgate.card: error: no usable records of {args.gpu_class} in {', '.join(map(str, args.runs))}",
              file=sys.stderr)
        return 2
    runs = len({r.run_id for r in records if r.gpu_class == args.gpu_class and not r.env.get("ab_run")})
    text = card.markdown(cards, args.gpu_class, runs, ab_cards, ab_card.injected_runs(records, args.gpu_class))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
