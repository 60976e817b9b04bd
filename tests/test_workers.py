"""One xdist worker per GPU: pinning, shares of the matrix, and one merged run at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fluxgate import workers
from fluxgate.matrix import combos, shard

ROOT = Path(__file__).resolve().parents[1]


def test_workers_are_pinned_round_robin_over_the_visible_gpus():
    gpus = workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 7"})
    assert gpus == ["2", "7"]
    assert [workers.pin(index, gpus) for index in range(4)] == ["2", "7", "2", "7"]
    assert [workers.pin(index, ["0"]) for index in range(2)] == ["0", "0"]  # two workers sharing one GPU
    assert workers.pin(0, []) is None


def test_each_worker_share_is_the_shard_of_the_same_number():
    selected = combos()
    for count in (2, 3):
        groups = {}
        for position, combo in enumerate(selected):
            groups.setdefault(workers.group_marker(position, count).args[0], []).append(combo)
        assert [groups[f"{workers.GROUP_PREFIX}{i}-of-{count}"] for i in range(1, count + 1)] == [
            shard(selected, i, count) for i in range(1, count + 1)]


def test_two_workers_run_on_their_own_devices_and_leave_one_merged_run(tmp_path):
    history = tmp_path / "history"
    # Fake GPU list: on this CPU machine the pin shows only in each worker's fingerprint.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,5", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "--device", "cpu", "--models",
         "z-image-turbo", "--precisions", "bf16,nvfp4", "-n", "2", "--history-dir", str(history), "--history-gate",
         "off", "-m", "not faults"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)

    assert "one run merged from 2 worker file(s)" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert ("against history (advisory: --history-gate off; each worker judged its own combos): 2 not comparable"
            in done.stdout), done.stdout[-3000:]
    runs = list(history.glob("*.json"))
    assert len(runs) == 1 and not list((history / workers.WORKERS_DIR).glob("*.json"))
    records = json.loads(runs[0].read_text())["records"]
    assert sorted(r["combo"] for r in records) == ["z-image-turbo[bf16]", "z-image-turbo[nvfp4]"]
    placed = {r["environment"]["cuda_visible_devices"]: r["environment"]["xdist_worker"] for r in records}
    assert placed == {"3": "1/2", "5": "2/2"}
    assert all((history / r["image"]).is_file() for r in records)
