"""What installing fluxgate costs a pytest session that runs none of its items: wall time and peak memory of a
one-test session with the plugin and with it disabled (`-p no:fluxgate.plugin`), paired and interleaved.

    python tools/plugin_overhead.py [--pairs 7]

Prints the medians and the difference (issue 26's bound: within 0.05 s and 10 MiB), and which of torch, diffusers,
gguf, transformers, numpy, matplotlib loading the plugin imported. A measurement, not a test: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "diffusers", "gguf", "transformers", "numpy", "scipy", "matplotlib", "PIL", "safetensors")


def one_session(folder: Path, disabled: bool) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python -m pytest -q test_one.py` in `folder`."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"]
    if disabled:
        command[3:3] = ["-p", "no:fluxgate.plugin"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed in {folder}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def imported_by_plugin() -> list[str]:
    probe = ("import sys, fluxgate.plugin; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    return eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=7, help="interleaved pairs of sessions [default: 7]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_one.py").write_text("def test_one():\n    assert True\n")
        one_session(folder, False), one_session(folder, True)  # warm the file cache
        runs = {False: [], True: []}
        for _ in range(args.pairs):
            for disabled in (False, True):
                runs[disabled].append(one_session(folder, disabled))
    with_plugin = [statistics.median(values) for values in zip(*runs[False])]
    without = [statistics.median(values) for values in zip(*runs[True])]
    print(f"median of {args.pairs} pairs   wall s   peak MiB")
    print(f"with fluxgate      {with_plugin[0]:8.3f}   {with_plugin[1]:8.1f}")
    print(f"-p no:fluxgate     {without[0]:8.3f}   {without[1]:8.1f}")
    print(f"difference         {with_plugin[0] - without[0]:+8.3f}   {with_plugin[1] - without[1]:+8.1f}"
          "   (bound: 0.05 s, 10 MiB)")
    print(f"heavy modules the plugin imports: {', '.join(imported_by_plugin()) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
