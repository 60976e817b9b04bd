"""One pytest-xdist worker per GPU (`-n N`): each worker is pinned to its own GPU, runs a fixed share of the matrix,
writes its own history file; the controller merges them into one run when the workers are done.

- Pinning: worker `gwK` sets CUDA_VISIBLE_DEVICES to the K-th visible GPU (wrapping round when there are more
  workers than GPUs, e.g. two workers sharing one GPU) before anything touches CUDA, so `cuda` in that worker is its
  GPU. The visible GPUs are the CUDA_VISIBLE_DEVICES list the run was started with, else every GPU NVML counts.
- Shares: the selected combos are grouped as `--shard K+1/N` would group them (every N-th, so each worker gets some
  of every model) and xdist's `loadgroup` scheduling sends each group to one worker, in collection order.
- History: a worker's run file goes to `<history-dir>/.workers/`, where readers do not look; the controller merges
  the worker files into one run in `<history-dir>` (each record keeps its worker's fingerprint: GPU UUIDs differ) and
  only then removes them. Each worker judges its own combos against the history (and re-measures a suspected
  regression on its own GPU); the controller fails the session if any worker confirmed one.
pytest-benchmark disables itself under xdist; fluxgate's own timing (CUDA events) is unaffected.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

WORKERS_DIR = ".workers"
GROUP_PREFIX = "fluxgate-share-"


def worker(config: pytest.Config) -> tuple[int, int] | None:
    """(index, count) in an xdist worker, None elsewhere."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return None
    return int(workerinput["workerid"].removeprefix("gw")), int(workerinput["workercount"])


def controller_workers(config: pytest.Config) -> int:
    """How many xdist workers this (controller) process starts; 0 when the run is not distributed."""
    if worker(config) is not None or config.getoption("dist", "no") == "no":
        return 0
    return len(config.getoption("tx", None) or [])


def visible_gpus(environ: dict | None = None) -> list[str]:
    """The GPUs this run may use: CUDA_VISIBLE_DEVICES as given, else NVML's device indices ([] without NVML)."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(index) for index in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver: a CPU machine
        return []


def pin(index: int, gpus: list[str]) -> str | None:
    """The GPU worker `index` runs on (round robin over `gpus`), None when there is none."""
    return gpus[index % len(gpus)] if gpus else None


def pin_this_worker(config: pytest.Config) -> None:
    """In an xdist worker, restrict CUDA to its GPU (must run before CUDA is initialized), and give it its share of
    the CPU cores: workers that each start one torch thread per core slow each other down many times over."""
    me = worker(config)
    if me is None:
        return
    gpu = pin(me[0], visible_gpus())
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // me[1]))


def group_marker(position: int, count: int) -> pytest.MarkDecorator:
    """The xdist_group of the combo at `position` in the selection: its share, as `--shard` would cut it."""
    return pytest.mark.xdist_group(f"{GROUP_PREFIX}{position % count + 1}-of-{count}")


def worker_history_dir(history_dir: Path) -> Path:
    return history_dir / WORKERS_DIR
