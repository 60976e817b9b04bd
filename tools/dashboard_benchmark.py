"""How the dashboard's build time grows with the history: synthetic histories of N runs of the 16 eager combos (one
GPU class, no images: the records as a GPU run writes them, with per-step times and a stored history verdict), each
built by `fluxgate dashboard` in a fresh process; prints seconds per build and per run.

    python tools/dashboard_benchmark.py [--runs 250,500,1000,2000] [--steps 27]

Issue 27's bound: 2,000 runs of 16 combos within 60 s on a 2-core machine. A measurement, not a test: run it on a
quiet machine. The histories are written once under --work (default: a temporary folder) and reused when present.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

MODELS = ("flux1-dev", "flux1-kontext-dev", "flux2-dev", "z-image-turbo")
PRECISIONS = ("bf16", "fp8-scaled", "gguf-q8_0", "nvfp4")


def write_history(folder: Path, runs: int, steps: int, seed: int = 0) -> None:
    """`runs` run files of the 16 eager combos into `folder` (one FsspecStore run each, as a GPU run writes them)."""
    from fluxgate.storing import open_store
    from fluxgate.storing.record import PASSED, Metrics, Record
    from fluxgate.storing.verdicts import HistoryVerdict

    store, rng = open_store(str(folder)), random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for index in range(runs):
        stamp = (start + timedelta(hours=index)).strftime("%Y%m%dT%H%M%SZ")
        environment = {"git_commit": f"{index:040x}", "device_name": "NVIDIA H200", "branch": "main", "event": "push",
                       "gpu": {"uuid": f"GPU-{index % 6}"}}
        writer = store.open_run(f"{stamp}-{index:06x}", environment)
        for model in MODELS:
            for precision in PRECISIONS:
                step = 0.1 * (1 + rng.gauss(0, 0.005))
                metrics = Metrics(it_s=1 / step, step_times_s=[step * (1 + rng.gauss(0, 0.002)) for _ in range(steps)],
                                  peak_mem_gib=24.0, ms_ssim=0.998, e2e_s=3.0, images=3)
                writer.append(Record(f"{model}[{precision}]", model, precision, "eager", "synthetic", "nvidia-h200",
                                     metrics=metrics, outcome=PASSED,
                                     history_verdict=HistoryVerdict("no change", "no change: synthetic")))


def build_seconds(history: Path, out: Path) -> float:
    """Wall seconds of one `fluxgate dashboard` build in a fresh process."""
    command = [sys.executable, "-m", "fluxgate.dashboard", "--history-dir", str(history), "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="250,500,1000,2000", help="history sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=27, help="timed steps per record [27]")
    parser.add_argument("--work", type=Path, help="where the histories are kept [a temporary folder]")
    options = parser.parse_args()
    work = options.work or Path(tempfile.mkdtemp(prefix="fluxgate-dashboard-bench-"))
    print(f"histories under {work}", flush=True)
    for runs in (int(n) for n in options.runs.split(",")):
        history = work / f"history-{runs}"
        if not history.is_dir():
            started = time.perf_counter()
            write_history(history, runs, options.steps)
            print(f"{runs} runs written in {time.perf_counter() - started:.0f} s", flush=True)
        seconds = build_seconds(history, work / f"site-{runs}")
        print(f"{runs} runs x 16 combos: dashboard built in {seconds:.1f} s ({1000 * seconds / runs:.1f} ms per run)",
              flush=True)


if __name__ == "__main__":
    main()
