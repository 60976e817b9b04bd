"""`python -m fluxgate.dashboard`: the history as a static site of trend charts, verdicts and image grids (see
`fluxgate.showing.dashboard`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxgate import probing
from fluxgate.errors import FluxgateError
from fluxgate.showing import dashboard, decision
from fluxgate.storing import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fluxgate.dashboard", description=dashboard.__doc__.split("\n\n")[0])
    parser.add_argument("--history-dir", default=".fluxgate/history", metavar="DIR|URL",
                        help="the benchmark history to show, every GPU class in it: a folder or a store URL such as "
                             "s3://bucket/prefix (see --history-dir in README) [default: .fluxgate/history]")
    parser.add_argument("--out", type=Path, default=Path(".fluxgate/dashboard"), metavar="DIR",
                        help="where the site goes; an earlier site there is removed first; open DIR/index.html "
                             "[default: .fluxgate/dashboard]")
    parser.add_argument("--baselines-dir", type=Path, default=Path("baselines"), metavar="DIR",
                        help="reference images for the grids, and ../docs/detection-card-<class>.md beside it "
                             "[default: baselines]")
    parser.add_argument("--decision-file", type=Path, default=decision.DEFAULT_FILE, metavar="FILE",
                        help=f"prices and quality floors of the decision report [default: {decision.DEFAULT_FILE}]")
    parser.add_argument("--vram-budget-gib", type=float, default=None, metavar="GIB",
                        help="the decision recommends only combos within this VRAM budget [default: none]")
    args = parser.parse_args(argv)
    try:
        settings = decision.load(args.decision_file, args.vram_budget_gib,
                                 missing_ok=args.decision_file == decision.DEFAULT_FILE)
        probing.check_writable([("--out", args.out)])  # before reading the history, not after
        index = dashboard.build(open_store(args.history_dir), args.out, args.baselines_dir, settings)
    except (FluxgateError, OSError) as error:
        print(f"fluxgate.dashboard: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
