"""`python -m fluxgate.scan DIR`: every checkpoint under a folder identified, and a models file of the slots they fill."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxgate.weights import scan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxgate scan", description=scan.__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder to scan (recursively)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the models file here (run it with `--profile real --models-file FILE`) "
                             "[default: print only]")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"fluxgate.scan: error: {args.root}: not a folder", file=sys.stderr)
        return 2
    listed, slots = scan.scan(args.root)
    if not listed:
        print(f"no checkpoints (.safetensors, .sft, .gguf or diffusers model folders) found under {args.root}")
        return 1
    print("-> fills a slot of the models file; x has no slot (why in brackets); = another file fills the slot")
    for path, identity in listed:
        if isinstance(identity, str):
            print(f"x  skipped: {identity}")
            continue
        placement = scan.place(identity)
        model = placement.model
        used = slots.get(model or "", {}).get(identity.precision or "")
        if used == path:
            mark, why = "->", f" [{placement.how}]" if placement.how else ""
        elif model is None or identity.precision is None:
            mark, why = "x ", f" [{placement.how if model is None else 'no fluxgate precision'}]"
        else:
            mark, why = "= ", f" [slot taken by {used}]"
        print(f"{mark} {model or identity.member or '?'}[{identity.precision or '-'}]  {path}  ({identity.describe()}){why}")
    text = scan.models_toml(slots, scan.pipelines(args.root))
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}: {sum(len(p) for p in slots.values())} slots over {len(slots)} models")
    else:
        print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
