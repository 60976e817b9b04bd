"""--shard i/n splits the matrix deterministically, and `python -m fluxgate.merge` joins the shards' histories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fluxgate.errors import HistoryError
from fluxgate.matrix import combos, parse_shard, shard
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import Record

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 16, 20])
def test_shards_cover_the_selection_exactly_once(count):
    selected = combos()
    parts = [shard(selected, index, count) for index in range(1, count + 1)]
    assert sorted(c for part in parts for c in part) == sorted(selected)
    assert shard(selected, 1, count) == shard(combos(), 1, count)  # deterministic


@pytest.mark.parametrize("value", ["0/2", "3/2", "1/0", "a/b", "2", "1/2/3"])
def test_bad_shard_values_are_refused_naming_the_option(value):
    with pytest.raises(ValueError, match=r"--shard"):
        parse_shard(value)


def _run_shard(tmp_path: Path, index: int) -> Path:
    out = tmp_path / f"shard{index}"
    # Not check=True: the shard's verdicts do not matter here, only that it records its own combo.
    subprocess.run([sys.executable, "-m", "pytest", "perf", "-q", "--device", "cpu", "--models", "flux1-dev",
                    "--precisions", "bf16,nvfp4", "--shard", f"{index}/2", "--history-dir", str(out)],
                   cwd=ROOT, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("*.json")
    return path


def test_two_shards_merge_into_one_run_with_every_combo(tmp_path):
    shards = [_run_shard(tmp_path, 1), _run_shard(tmp_path, 2)]

    done = subprocess.run([sys.executable, "-m", "fluxgate.merge", *map(str, shards), "--history-dir",
                           str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True, check=True)

    (merged,) = (tmp_path / "merged").glob("*.json")
    document = json.loads(merged.read_text())
    assert str(merged) in done.stdout
    assert sorted(r["combo"] for r in document["records"]) == ["flux1-dev[bf16]", "flux1-dev[nvfp4]"]
    assert {r["run_id"] for r in document["records"]} == {document["run_id"]}
    assert sorted(r["source_run_id"] for r in document["records"]) == sorted(path.stem for path in shards)
    assert all(r.environment["device_type"] == "cpu" for r in LocalFolderStore(tmp_path / "merged").load())


def test_overlapping_or_unreadable_shards_are_refused_naming_the_file(tmp_path):
    run = LocalFolderStore(tmp_path / "a").open_run("run-a", {"device_type": "cpu"})
    run.append(Record(combo="flux1-dev[bf16]"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")

    merged = LocalFolderStore(tmp_path / "merged")
    with pytest.raises(HistoryError, match="also in"):
        merged.merge_files([run.path, run.path])
    with pytest.raises(HistoryError, match="broken.json"):
        merged.merge_files([run.path, broken])
    assert not (tmp_path / "merged").exists() or not list((tmp_path / "merged").glob("*.json"))


def test_compiled_combo_ids_parse_back_to_their_runtime():
    from fluxgate.matrix import Combo

    for combo in (Combo("flux1-dev", "fp8-scaled", "compile"), Combo("flux2-dev", "gguf-q8_0"),
                  Combo("z-image-turbo", "bf16", "compile")):
        assert Combo.parse(combo.id) == combo
