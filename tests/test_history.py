"""fluxgate.storing: one JSON file per run (LocalFolderStore), rewritten atomically after every combo; reading skips
corrupt files; a record is typed and versioned (Record, schema 1) and keeps every key on a round trip."""

import contextlib
import json
import os
from pathlib import Path

import pytest

from fluxgate.errors import HistoryError
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import PASSED, Metrics, Record
from fluxgate.storing.store import new_run_id

ENVIRONMENT = {"device": "cpu", "torch": "2.x"}
ROOT = Path(__file__).resolve().parents[1]


def _record(combo: str) -> Record:
    return Record(combo=combo, outcome=PASSED, metrics=Metrics(it_s=1.5))


def read(directory: Path) -> list[Record]:
    return LocalFolderStore(directory).load()


def test_every_append_leaves_a_valid_file_holding_all_records_so_far(tmp_path):
    history = LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT)
    combos = ["flux1-dev[bf16]", "flux1-dev[nvfp4]", "flux2-dev[bf16]"]
    for count, combo in enumerate(combos, start=1):
        history.append(_record(combo))
        document = json.loads(history.path.read_text())
        assert [record["combo"] for record in document["records"]] == combos[:count]
        assert document["run_id"] == "run-a" and document["environment"] == ENVIRONMENT


def test_appending_leaves_other_runs_files_byte_identical_and_no_temp_files(tmp_path):
    earlier = LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT)
    earlier.append(_record("flux1-dev[bf16]"))
    before = earlier.path.read_bytes()
    current = LocalFolderStore(tmp_path).open_run("run-b", ENVIRONMENT)
    for combo in ("flux1-dev[bf16]", "flux1-dev[fp8-scaled]"):
        current.append(_record(combo))
    assert earlier.path.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run-a.json", "run-b.json"]


def test_read_skips_a_truncated_file_with_a_warning_naming_it_and_keeps_the_rest(tmp_path):
    for run_id, combos in (("run-a", ["flux1-dev[bf16]"]), ("run-b", ["flux2-dev[bf16]"]),
                           ("run-c", ["z-image-turbo[bf16]", "z-image-turbo[nvfp4]"])):
        history = LocalFolderStore(tmp_path).open_run(run_id, ENVIRONMENT)
        for combo in combos:
            history.append(_record(combo))
    broken = tmp_path / "run-b.json"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.warns(UserWarning, match=str(broken)):
        records = read(tmp_path)
    assert [record.combo for record in records] == ["flux1-dev[bf16]", "z-image-turbo[bf16]",
                                                    "z-image-turbo[nvfp4]"]
    assert all(record.environment == ENVIRONMENT for record in records)


def test_read_skips_a_json_file_without_records_with_a_warning(tmp_path):
    LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT).append(_record("flux1-dev[bf16]"))
    (tmp_path / "notes.json").write_text('["not a run file"]')
    with pytest.warns(UserWarning, match="notes.json"):
        assert [record.combo for record in read(tmp_path)] == ["flux1-dev[bf16]"]


def test_run_ids_are_unique_within_one_second():
    run_ids = [new_run_id() for _ in range(20)]  # 24 random bits: a collision among 20 is a 1e-5 event
    assert len(set(run_ids)) == len(run_ids)


def test_a_record_json_cannot_hold_does_not_stop_later_records_being_stored(tmp_path):
    history = LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT)
    with contextlib.suppress(ValueError):  # refusing the NaN record is fine; losing the rest of the run is not
        history.append(Record(combo="flux1-dev[nvfp4]", metrics=Metrics(ms_ssim=float("nan"))))
    history.append(_record("flux2-dev[bf16]"))
    assert "flux2-dev[bf16]" in [record.combo for record in read(tmp_path)]


@pytest.mark.subprocess
def test_a_corrupt_history_file_is_named_in_the_run_summary(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    history = tmp_path / "history"
    history.mkdir()
    (history / "20260101T000000Z-bad000.json").write_text('{"records": [')
    done = subprocess.run([sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider", "-m", "not faults",
                           "--device", "cpu", "--models", "z-image-turbo", "--precisions", "bf16", "--history-dir",
                           str(history)], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((line for line in done.stdout.splitlines() if line.startswith("WARNING: ")), "")
    assert "20260101T000000Z-bad000.json: skipped unreadable history file" in line, done.stdout[-3000:]


def test_crashed_writers_temporary_files_are_removed_once_old_and_nothing_else_is(tmp_path):
    """Issue 27: `.tmp` leftovers of a writer killed between write and rename were never pruned. Only that name
    pattern, only once an hour old (a live writer's is seconds old), in the root, `.workers/` and image folders."""
    run = "20260101T000000Z-aaaaaa"
    (tmp_path / run).mkdir()
    (tmp_path / ".workers").mkdir()
    old = [tmp_path / f".{run}.json.a1b2c3d4.tmp", tmp_path / run / ".flux1-dev.png.x_y9z8w7.tmp",
           tmp_path / ".workers" / f".{run}-gw0.json.0f0f0f0f.tmp"]
    kept = [tmp_path / f".{run}.json.fresh123.tmp", tmp_path / f"{run}.json", tmp_path / "notes.tmp",
            tmp_path / run / "flux1-dev.png", tmp_path / ".hidden.tmp"]
    for path in old + kept:
        path.write_bytes(b"x")
    for path in old + kept[2:]:
        os.utime(path, (1_000_000_000, 1_000_000_000))  # 2001: long dead
    removed = LocalFolderStore(tmp_path).clean_leftovers()
    assert sorted(Path(p).name for p in removed) == sorted(p.name for p in old)
    assert not any(p.exists() for p in old) and all(p.exists() for p in kept)


def test_image_folders_beyond_the_newest_runs_are_pruned_and_records_stay(tmp_path):
    for run_id in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"):
        (tmp_path / f"{run_id}.json").write_text('{"records": []}')
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "flux1-dev.bf16.png").write_bytes(b"png")
    removed = LocalFolderStore(tmp_path).prune_images(keep_runs=2)
    assert [Path(path).name for path in removed] == ["20260101T000000Z-aaaaaa"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["20260102T000000Z-bbbbbb",
                                                                        "20260103T000000Z-cccccc"]
    assert len(list(tmp_path.glob("*.json"))) == 3
    assert LocalFolderStore(tmp_path).prune_images(keep_runs=0) and not any(p.is_dir() for p in tmp_path.iterdir())


def test_history_files_get_the_mode_a_plain_open_would_give(tmp_path):
    import os
    import stat

    LocalFolderStore(tmp_path).open_run(new_run_id(), ENVIRONMENT).append(_record("flux1-dev[bf16]"))
    (path,) = tmp_path.glob("*.json")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("module", ["fluxgate.merge", "fluxgate.publish", "fluxgate.card", "fluxgate.thresholds"])
def test_reading_merging_and_publishing_history_import_neither_torch_nor_diffusers(module):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy = [line for line in done.stderr.splitlines()
             if line.startswith("import time:") and line.split("|")[-1].strip() in ("torch", "diffusers", "gguf")]
    assert not heavy, heavy


def test_pruning_removes_the_image_folders_an_xdist_run_keeps_under_its_workers_run_ids(tmp_path):
    import json as _json

    old, new = "20260101T000000Z-merged", "20260102T000000Z-newest"
    (tmp_path / f"{old}.json").write_text(_json.dumps({"records": [
        {"combo": "a[bf16]", "image": "20260101T000000Z-gw0aaa/a.bf16.png"},
        {"combo": "a[nvfp4]", "image": "20260101T000000Z-gw1bbb/a.nvfp4.png"}]}))
    (tmp_path / f"{new}.json").write_text('{"records": []}')
    for folder in ("20260101T000000Z-gw0aaa", "20260101T000000Z-gw1bbb", new):
        (tmp_path / folder).mkdir()
    removed = LocalFolderStore(tmp_path).prune_images(keep_runs=1)
    assert sorted(Path(p).name for p in removed) == ["20260101T000000Z-gw0aaa", "20260101T000000Z-gw1bbb"]
    assert (tmp_path / new).is_dir()


def test_every_committed_run_file_reads_and_writes_back_with_the_same_keys_and_values():
    from fluxgate.storing.record import update_to_2
    from fluxgate.storing.store import Run

    paths = sorted((ROOT / "baselines").glob("*/runs/*.json"))
    assert paths
    for path in paths:
        document = json.loads(path.read_text())
        assert Run.from_json(document, str(path)).to_json() == update_to_2(document), path
        for record in LocalFolderStore(path.parent).load():  # measured, or saying why not (an errored combo)
            assert (record.measured and record.metrics.it_s) or (record.outcome == "error" and record.error), record


def test_an_unknown_or_missing_schema_is_one_line_naming_the_file_the_schema_and_what_is_read(tmp_path):
    with pytest.raises(HistoryError, match=r"^run\.json: history schema 'x' is not one this fluxgate reads "
                                          r"\(schema 1, 2\)$"):
        Record.from_json({"schema": "x", "combo": "flux1-dev[bf16]"}, "run.json")
    with pytest.raises(HistoryError, match=r"^run\.json: no history schema number \(this fluxgate reads schema "
                                          r"1, 2\)$"):
        Record.from_json({"combo": "flux1-dev[bf16]"}, "run.json")
    LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT).append(_record("flux1-dev[bf16]"))
    future = tmp_path / "run-b.json"
    future.write_text(json.dumps({"schema": 3, "run_id": "run-b", "layout": "whatever came next"}))
    with pytest.warns(UserWarning, match=f"{future}: skipped unreadable history file .*written by a newer fluxgate "
                                         r"\(history schema 3; this one reads schema 1, 2\)"):
        assert [record.run_id for record in read(tmp_path)] == ["run-a"]


def test_a_record_keeps_keys_it_does_not_know_and_the_keys_it_held_as_null():
    data = {"schema": 2, "combo": "flux1-dev[bf16]", "error": None, "teardown": None, "future_field": [1, 2],
            "metrics": {"it_s": 2.0, "compile_s": None, "new_metric": {"x": 1}}}
    record = Record.from_json(data, "run.json")
    assert record.extra == {"future_field": [1, 2]} and record.metrics.extra == {"new_metric": {"x": 1}}
    assert record.to_json() == data


def test_a_combo_result_names_its_error_and_teardown_and_a_remeasurement_only_what_it_has(tmp_path):
    from fluxgate.storing.record import REMEASURE, RESULT_NULLS

    run = LocalFolderStore(tmp_path).open_run("run-a", ENVIRONMENT)
    run.append(Record(combo="a[bf16]", settings={}, failures=[], outcome=PASSED, nulls=RESULT_NULLS))
    run.append(Record(combo="a[bf16]", outcome=REMEASURE, verdict="regression", metrics=Metrics(it_s=2.0)))
    result, remeasure = json.loads(run.path.read_text())["records"]
    assert sorted(result) == ["combo", "error", "failures", "metrics", "outcome", "recorded", "run_id", "schema",
                              "settings", "teardown"]
    assert result["error"] is None and result["teardown"] is None
    assert sorted(remeasure) == ["combo", "metrics", "outcome", "recorded", "run_id", "schema", "verdict"]


def test_shard_runs_stay_apart_until_merged_then_one_run_holds_each_record_once(tmp_path):
    store = LocalFolderStore(tmp_path)
    shards = [store.open_run(f"run-{n}", {"xdist_worker": f"{n}/2"}, shard=True) for n in (1, 2)]
    for shard, combo in zip(shards, ("a[bf16]", "a[nvfp4]")):
        shard.append(_record(combo))
    assert store.list_runs() == [] and store.load() == []
    merged = store.merge([shard.run_id for shard in shards], mark={"shared_gpu": True})
    assert store.list_runs() == [merged] and not any(Path(shard.location).exists() for shard in shards)
    records = store.load_run(merged)
    assert [(r.combo, r.source_run_id, r.env["xdist_worker"], r.env["shared_gpu"]) for r in records] == [
        ("a[bf16]", "run-1", "1/2", True), ("a[nvfp4]", "run-2", "2/2", True)]
