"""`python -m fluxgate.publish`: one run of the history as a PR summary, trend plots and image grids (see `fluxgate.showing.publish`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from fluxgate import defaults, options, probing
from fluxgate.errors import FluxgateError
from fluxgate.showing import decision, publish
from fluxgate.storing import open_store
from fluxgate.storing.fsio import is_url


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxgate publish",
        description="Publish one fluxgate run from the benchmark history: summary.md (a PR comment), per-combo trend "
                    "plots (trends/*.png) and reference | candidate | difference grids for combos whose image "
                    "moved (grids/*.png).")
    options.declare(parser, "history_dir", "decision_file", "vram_budget_gib", history_dir={
        "required": True, "help": "benchmark history written by the pytest run (<run_id>.json files and image "
                                  "folders), a folder or URL, e.g. .fluxgate/history or s3://bucket/fluxgate/history"})
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="where to write summary.md, trends/ and grids/ (created if missing; an earlier report's "
                             "summary, decision and PNGs there are removed first)")
    parser.add_argument("--baselines-dir", default=Path("baselines"), type=Path, metavar="DIR",
                        help="stored baselines; grids use <DIR>/<gpu-class>/<model>.png as the BF16 reference, else "
                             "the run's own bf16 image [default: baselines]")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="the run to publish (a history file name without .json) [default: the newest run]")
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fluxgate.publish: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # restored on exit; a skipped file is news, not a traceback
            settings = decision.load(args.decision_file or defaults.input_file("decision"), args.vram_budget_gib,
                                     missing_ok=args.decision_file is None)
            if not is_url(args.history_dir) and not Path(args.history_dir).is_dir():
                raise publish.PublishError(f"--history-dir {args.history_dir}: no such directory")
            probing.check_writable([("--out", args.out)])  # before reading the history, not after
            publish.write_report(open_store(args.history_dir), args.out, args.baselines_dir, args.run_id,
                                 progress=lambda path: print(f"wrote {path}", flush=True), decision_settings=settings)
    except (FluxgateError, OSError) as error:
        print(f"fluxgate.publish: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
