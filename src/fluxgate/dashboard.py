"""`python -m fluxgate.dashboard`: the history as a static site of trend charts, verdicts and image grids (see
`fluxgate.showing.dashboard`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxgate import defaults, options, probing
from fluxgate.errors import FluxgateError
from fluxgate.showing import dashboard, decision
from fluxgate.showing.site import OutFolderError
from fluxgate.storing import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxgate dashboard", description=dashboard.__doc__.split("\n\n")[0])
    options.declare(parser, "history_dir", "decision_file", "vram_budget_gib", history_dir={
        "help": "the history to show, a folder or URL [default: .fluxgate/history]"})
    parser.add_argument("--out", type=Path, default=Path(".fluxgate/dashboard"), metavar="DIR",
                        help="where the site goes: a new or empty folder, or one an earlier build wrote (only its files, "
                             "listed in DIR/.fluxgate-dashboard, are removed); never the history folder or one above "
                             "it; open DIR/index.html [default: .fluxgate/dashboard]")
    parser.add_argument("--baselines-dir", type=Path, default=Path("baselines"), metavar="DIR",
                        help="reference images for the grids, and ../docs/detection-card-<class>.md beside it "
                             "[default: baselines]")
    args = parser.parse_args(argv)
    try:
        settings = decision.load(args.decision_file or defaults.input_file("decision"), args.vram_budget_gib,
                                 missing_ok=args.decision_file is None)
        probing.check_writable([("--out", args.out)])  # before reading the history, not after
        index = dashboard.build(open_store(args.history_dir), args.out, args.baselines_dir, settings)
    except OutFolderError as error:  # a folder it must not write into: a usage error
        print(f"fluxgate.dashboard: error: {error}", file=sys.stderr)
        return 4
    except (FluxgateError, OSError) as error:
        print(f"fluxgate.dashboard: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
