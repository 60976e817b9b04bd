"""One pytest-xdist worker per GPU (`-n N`): each worker is pinned to its own GPU, runs a fixed share of the matrix,
writes its own history file; the controller merges them into one run when the workers are done.

- Pinning: worker `gwK` runs on the K-th visible GPU (wrapping round when there are more workers than GPUs, which
  fails the run: see `shared_gpus`). The controller writes CUDA_VISIBLE_DEVICES into each worker's execnet spec
  (`popen//env:CUDA_VISIBLE_DEVICES=...`), so the variable is set when the worker process starts, before any import:
  importing diffusers asks `torch.accelerator.is_available()`, which starts the CUDA driver, and the driver reads the
  variable once, then ignores later changes (seen on a 2-GPU H200: both workers ran on GPU 0). The visible GPUs are
  the CUDA_VISIBLE_DEVICES list the run was started with, else every GPU NVML counts, by UUID (unambiguous whatever
  CUDA_DEVICE_ORDER says). A worker checks that CUDA runs on its GPU (`check_pinned`); the controller fails a run in
  which two workers ran on one GPU (`shared_gpus`).
- Shares: the selected combos are grouped as `--shard K+1/N` would group them (every N-th, so each worker gets some
  of every model) and xdist's `loadgroup` scheduling sends each group to one worker. Workers are told to tag items
  with their group (`loadgroup` in their own options, through `workerinput`): xdist derives that from the worker's
  command line, which says `-n N`, not the `loadgroup` fluxgate chooses.
- History: a worker's run file goes to `<history-dir>/.workers/`, where readers do not look; the controller merges
  the worker files into one run in `<history-dir>` (each record keeps its worker's fingerprint: GPU UUIDs differ) and
  only then removes them. Each worker judges its own combos against the history (and re-measures a suspected
  regression on its own GPU); the controller fails the session if any worker confirmed one.
pytest-benchmark disables itself under xdist; fluxgate's own timing (CUDA events) is unaffected.
"""

from __future__ import annotations

import os

import pytest

from fluxgate.storing.record import Record

GROUP_PREFIX = "fluxgate-share-"
PIN_ENV = "CUDA_VISIBLE_DEVICES"


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
    """The GPUs this run may use: the CUDA_VISIBLE_DEVICES entries as given, else the UUID (`GPU-...`) of every GPU
    NVML counts; [] without NVML (a CPU machine)."""
    environ = os.environ if environ is None else environ
    if environ.get(PIN_ENV, "").strip():
        return [gpu.strip() for gpu in environ[PIN_ENV].split(",") if gpu.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
                    for index in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver: a CPU machine
        return []


def pin(index: int, gpus: list[str]) -> str | None:
    """The GPU worker `index` runs on (round robin over `gpus`), None when there is none."""
    return gpus[index % len(gpus)] if gpus else None


def worker_specs(specs: list[str], gpus: list[str]) -> list[str]:
    """The controller's execnet specs with each plain `popen` worker pinned to its GPU by environment: worker K gets
    `popen//env:CUDA_VISIBLE_DEVICES=<gpus[K mod len]>`. Specs that are not plain `popen` (a user's own `--tx`) and
    runs without GPUs are left as they are."""
    if not gpus:
        return list(specs)
    return [f"{spec}//env:{PIN_ENV}={pin(index, gpus)}" if spec == "popen" else spec
            for index, spec in enumerate(specs)]


def pin_worker_processes(config: pytest.Config) -> None:
    """Controller: pin the workers xdist is about to start (`worker_specs`); call from pytest_configure."""
    specs = config.getoption("tx", None) or []
    config.option.tx = worker_specs(list(specs), visible_gpus())


def configure_node(node) -> None:
    """Controller, per worker (xdist's pytest_configure_node): what the worker needs to know before it collects."""
    node.workerinput["fluxgate_loadgroup"] = node.config.getoption("dist", "no") == "loadgroup"


def pin_this_worker(config: pytest.Config) -> None:
    """In an xdist worker: tag items with their share (`loadgroup`), set CUDA_VISIBLE_DEVICES to its GPU where the
    controller could not (a user's own `--tx`; only effective if nothing has started CUDA yet, see `check_pinned`),
    and give it its share of the CPU cores: workers that each start one torch thread per core slow each other down
    many times over."""
    me = worker(config)
    if me is None:
        return
    if config.workerinput.get("fluxgate_loadgroup"):
        config.option.loadgroup = True
    gpus = visible_gpus()
    gpu = pin(me[0], gpus) if len(gpus) > 1 else None  # one entry: already this worker's own
    if gpu is not None:
        os.environ[PIN_ENV] = gpu
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // me[1]))


def check_pinned(torch_uuid: str, environ: dict | None = None) -> None:
    """A worker's check that CUDA runs on the GPU it was pinned to: `torch_uuid` is the UUID torch reports for its
    device 0 (`torch.cuda.get_device_properties(0).uuid`, with or without the `GPU-` prefix). Checked only where the
    pin is a UUID (an index depends on CUDA_DEVICE_ORDER).

    Raises FluxgateError naming both GPUs when they differ: the driver started before the pin was set."""
    from fluxgate.errors import FluxgateError

    environ = os.environ if environ is None else environ
    pinned = environ.get(PIN_ENV, "").strip()
    if not pinned.startswith("GPU-") or "," in pinned:
        return
    running = torch_uuid if torch_uuid.startswith("GPU-") else f"GPU-{torch_uuid}"
    if running.lower() != pinned.lower():
        raise FluxgateError(f"xdist worker pinned to {PIN_ENV}={pinned} runs CUDA on {running}: the CUDA driver "
                            "started before the pin was set, so its timings would share another worker's GPU")


def shared_gpus(records: list[Record]) -> str | None:
    """Controller, on the workers' records: a one-line problem when two workers ran on one GPU (by UUID; pinned there
    by round robin with more workers than GPUs, or by a driver started before the pin), else None. Their timings
    shared the GPU and measure neither combo. Records without a UUID (CPU) are not judged."""
    workers_on: dict[str, set[str]] = {}
    for record in records:
        environment = record.env
        uuid = (environment.get("gpu") or {}).get("uuid")
        if uuid and environment.get("xdist_worker"):
            workers_on.setdefault(uuid, set()).add(str(environment["xdist_worker"]))
    shared = {uuid: names for uuid, names in workers_on.items() if len(names) > 1}
    if not shared:
        return None
    where = "; ".join(f"workers {', '.join(sorted(names))} on {uuid}" for uuid, names in sorted(shared.items()))
    return (f"xdist workers shared a GPU ({where}): their timings are not valid (use -n no larger than the number of "
            "GPUs); the run is kept in history, marked shared_gpu, out of every window")


def group_marker(position: int, count: int) -> pytest.MarkDecorator:
    """The xdist_group of the combo at `position` in the selection: its share, as `--shard` would cut it."""
    return pytest.mark.xdist_group(f"{GROUP_PREFIX}{position % count + 1}-of-{count}")
