"""One xdist worker per GPU: pinning, shares of the matrix, and one merged run at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxgate import workers
from fluxgate.errors import FluxgateError
from fluxgate.matrix import combos, shard
from fluxgate.storing.layout import SHARDS_DIR
from fluxgate.storing.record import Record

ROOT = Path(__file__).resolve().parents[1]


def test_workers_are_pinned_round_robin_over_the_visible_gpus():
    gpus = workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 7"})
    assert gpus == ["2", "7"]
    assert [workers.pin(index, gpus) for index in range(4)] == ["2", "7", "2", "7"]
    assert [workers.pin(index, ["0"]) for index in range(2)] == ["0", "0"]  # two workers sharing one GPU
    assert workers.pin(0, []) is None


def test_the_controller_pins_each_worker_process_as_it_starts():
    # The variable must be in the worker's environment from its start: importing diffusers starts the CUDA driver,
    # which ignores CUDA_VISIBLE_DEVICES set later (on a 2-GPU H200 both workers ran on GPU 0 that way).
    assert workers.worker_specs(["popen"] * 3, ["GPU-a", "GPU-b"]) == [
        "popen//env:CUDA_VISIBLE_DEVICES=GPU-a", "popen//env:CUDA_VISIBLE_DEVICES=GPU-b",
        "popen//env:CUDA_VISIBLE_DEVICES=GPU-a"]
    assert workers.worker_specs(["popen", "ssh=host"], ["0", "1"]) == ["popen//env:CUDA_VISIBLE_DEVICES=0", "ssh=host"]
    assert workers.worker_specs(["popen"] * 2, []) == ["popen", "popen"]  # no GPU: nothing to pin


def test_a_worker_whose_cuda_runs_on_another_gpu_than_its_pin_is_refused():
    workers.check_pinned("GPU-aa", {"CUDA_VISIBLE_DEVICES": "GPU-aa"})
    workers.check_pinned("aa", {"CUDA_VISIBLE_DEVICES": "GPU-AA"})  # torch's UUID comes without the prefix
    workers.check_pinned("bb", {"CUDA_VISIBLE_DEVICES": "1"})  # an index: not checkable without CUDA_DEVICE_ORDER
    with pytest.raises(FluxgateError, match="pinned to CUDA_VISIBLE_DEVICES=GPU-aa runs CUDA on GPU-bb"):
        workers.check_pinned("bb", {"CUDA_VISIBLE_DEVICES": "GPU-aa"})


def test_workers_that_shared_one_gpu_fail_the_merged_run():
    def record(pin, uuid, worker="1/2"):
        return Record("c", environment={"xdist_worker": worker, "cuda_visible_devices": pin, "gpu": {"uuid": uuid}})

    apart = [record("0", "GPU-a"), record("1", "GPU-b", "2/2"), record("0", "GPU-a")]
    assert workers.shared_gpus(apart) is None
    # more workers than GPUs (round robin), or a pin the driver ignored: both measure a shared GPU
    for shared in ([record("0", "GPU-a"), record("0", "GPU-a", "2/2")],
                   [record("0", "GPU-a"), record("1", "GPU-a", "2/2")]):
        assert workers.shared_gpus(shared).startswith("xdist workers shared a GPU (workers 1/2, 2/2 on GPU-a)")
    assert workers.shared_gpus([Record("c", environment={"xdist_worker": "1/2", "cuda_visible_devices": "0"})]) is None


def test_each_worker_share_is_the_shard_of_the_same_number():
    selected = combos()
    for count in (2, 3):
        groups = {}
        for position, combo in enumerate(selected):
            groups.setdefault(workers.group_marker(position, count).args[0], []).append(combo)
        assert [groups[f"{workers.GROUP_PREFIX}{i}-of-{count}"] for i in range(1, count + 1)] == [
            shard(selected, i, count) for i in range(1, count + 1)]


@pytest.mark.subprocess
def test_two_workers_run_on_their_own_devices_and_leave_one_merged_run(tmp_path):
    history = tmp_path / "history"
    # Fake GPU list: on this CPU machine the pin shows only in each worker's fingerprint.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "--device", "cpu", "--models",
         "z-image-turbo", "-n", "2", "--history-dir", str(history), "--history-gate",
         "off", "-m", "not faults"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    assert "one run merged from 2 worker file(s)" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert ("against history (advisory: --history-gate off; each worker judged its own combos): 4 not comparable"
            in done.stdout), done.stdout[-3000:]
    runs = list(history.glob("*.json"))
    assert len(runs) == 1 and not list((history / SHARDS_DIR).glob("*.json"))
    records = json.loads(runs[0].read_text())["records"]
    placed = {}
    for r in records:
        placed.setdefault((r["environment"]["cuda_visible_devices"], r["environment"]["xdist_worker"]),
                          set()).add(r["combo"])
    assert sorted(placed) == [("3", "1/2"), ("5", "2/2")]
    # Each worker ran one whole share, as --shard cuts it (xdist loadgroup), whichever share it drew.
    shares = {frozenset(c.id for c in shard(combos(["z-image-turbo"]), i, 2)) for i in (1, 2)}
    assert {frozenset(ran) for ran in placed.values()} == shares
    assert all((history / r["image"]).is_file() for r in records)


def test_a_worker_tags_its_items_with_their_share_when_the_controller_schedules_by_share(monkeypatch):
    # xdist's worker derives `loadgroup` from its own command line (`-n N`), not from the dist mode fluxgate sets in
    # the controller: without the flag from workerinput, items carry no group and xdist deals them out one by one.
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    node_config = SimpleNamespace(getoption=lambda name, default=None: "loadgroup")
    node = SimpleNamespace(config=node_config, workerinput={"workerid": "gw1", "workercount": 2})
    workers.configure_node(node)
    config = SimpleNamespace(workerinput=node.workerinput, option=SimpleNamespace(loadgroup=False))
    workers.pin_this_worker(config)
    assert config.option.loadgroup is True
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a"  # pinned at process start: left as it is
