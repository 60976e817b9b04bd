"""`fluxgate`: the one command line besides pytest. `fluxgate <command> --help` explains each command's options;
`python -m fluxgate.<command>` runs the same command.

Commands run the matrix's results after the fact (history, baselines, reports); the matrix itself runs under pytest
(`pytest perf`, `nox -s perf-gpu`). Options a command shares with the pytest run (`--history-dir`, `--baselines-dir`,
`--models`, ...) are declared once, in `fluxgate.options`.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with `main(argv) -> int`, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "ab": ("fluxgate.ab", "base and candidate trees interleaved on one device: a paired SAME/SLOW/FAST verdict per combo"),
    "merge": ("fluxgate.merge", "combine the history files of shards (--shard i/n) into one run"),
    "scan": ("fluxgate.scan", "identify every checkpoint under a folder and write the models file of the slots they fill"),
    "publish": ("fluxgate.publish", "a run's report from history: summary.md (the PR comment), trends, image grids"),
    "card": ("fluxgate.card", "the detection card of a GPU class from recorded runs"),
    "thresholds": ("fluxgate.thresholds", "derive a GPU class's limits (speed, quality, trade-offs, compile time) from recorded runs"),
    "dashboard": ("fluxgate.dashboard", "the history as a static site"),
    "list": ("fluxgate.cli", "the registered models, precisions, history rules and hooks, and who registered each"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: fluxgate <command> [options]   (fluxgate <command> --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def list_registered(argv: list[str]) -> int:
    """`fluxgate list`: every registry's entries with their origin. Exit 4 when an entry point cannot be read."""
    import argparse

    from fluxgate.errors import RegistryError

    argparse.ArgumentParser(prog="fluxgate list", description=COMMANDS["list"][1]).parse_args(argv)
    from fluxgate.judging.rules import RULES
    from fluxgate.models import MODELS
    from fluxgate.precisions import BACKENDS, PRECISIONS
    from fluxgate.registry import HOOKS_GROUP, group_targets

    try:
        print("models:")
        for name, spec in MODELS.items():
            only = f"; precisions {', '.join(spec.precisions)}" if spec.precisions else ""
            print(f"  {name:<22} denoiser {spec.denoiser}{only}  [{MODELS.origin(name)}]")
        print("precisions:")
        for name, spec in PRECISIONS.items():
            how = f"loads {spec.file_precision}, then transforms" if spec.file_precision else f"{spec.suffix} file"
            print(f"  {name:<22} tier {spec.tier}, {how}, backend {spec.backend}  [{PRECISIONS.origin(name)}]")
        print("backends (other than each precision's own; --backends):")
        for name, backend in BACKENDS.items():
            print(f"  {name:<22} {backend.description}  [{BACKENDS.origin(name)}]")
        print("history rules:")
        for name, rule in RULES.items():
            print(f"  {name:<22} {rule.description}  [{RULES.origin(name)}]")
        hooks = group_targets(HOOKS_GROUP)
        print("hooks:" + ("" if hooks else " none registered through entry points (conftest.py hooks are not listed)"))
        for origin, target in hooks:
            print(f"  {target}  [{origin}]")
    except RegistryError as error:
        print(f"fluxgate list: error: {error}", file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fluxgate: error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    if command == "list":
        return list_registered(rest)
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
