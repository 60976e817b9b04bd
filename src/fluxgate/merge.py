"""`python -m fluxgate.merge`: combine the history files of shards into one run (see `FsspecStore.merge_files`).
Run files and the history may be paths or URLs (`s3://bucket/prefix`: see `fluxgate.storing.open_store`)."""

from __future__ import annotations

import argparse
import posixpath
import sys

from fluxgate.errors import FluxgateError
from fluxgate.storing import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fluxgate merge",
        description="Combine the history run files written by shards (--shard i/n, one runner or GPU each) into "
                    "one run file, so verdicts and reports see one run with every combo.")
    parser.add_argument("files", nargs="+", help="the shards' run files, paths or URLs (<history-dir>/<run-id>.json)")
    parser.add_argument("--history-dir", default=".fluxgate/history",
                        help="where the merged run is written, a folder or URL (default: .fluxgate/history)")
    parser.add_argument("--run-id", default=None, help="id of the merged run (default: a new time-stamped id)")
    args = parser.parse_args(argv)
    try:
        path, moved = open_store(args.history_dir).merge_files(args.files, run_id=args.run_id)
    except (FluxgateError, OSError) as error:
        print(f"fluxgate.merge: error: {error}", file=sys.stderr)
        return 2
    print(f"merged {len(args.files)} shard(s) into {path}")
    # A shard file left among the runs would count its measurements twice (and be the merged run's own baseline).
    for shard, aside in moved:
        print(f"moved {shard} to {posixpath.dirname(aside)}/ (merged; readers of the history skip that folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
