"""fluxgate.history: one JSON file per run, rewritten atomically after every combo; reading skips corrupt files."""

import contextlib
import json

import pytest

from fluxgate.history import RunHistory, new_run_id, read

ENVIRONMENT = {"device": "cpu", "torch": "2.x"}


def _record(combo: str) -> dict:
    return {"combo": combo, "outcome": "passed", "metrics": {"it_s": 1.5}}


def test_every_append_leaves_a_valid_file_holding_all_records_so_far(tmp_path):
    history = RunHistory(tmp_path, "run-a", ENVIRONMENT)
    combos = ["flux1-dev[bf16]", "flux1-dev[nvfp4]", "flux2-dev[bf16]"]
    for count, combo in enumerate(combos, start=1):
        history.append(_record(combo))
        document = json.loads(history.path.read_text())
        assert [record["combo"] for record in document["records"]] == combos[:count]
        assert document["run_id"] == "run-a" and document["environment"] == ENVIRONMENT


def test_appending_leaves_other_runs_files_byte_identical_and_no_temp_files(tmp_path):
    earlier = RunHistory(tmp_path, "run-a", ENVIRONMENT)
    earlier.append(_record("flux1-dev[bf16]"))
    before = earlier.path.read_bytes()
    current = RunHistory(tmp_path, "run-b", ENVIRONMENT)
    for combo in ("flux1-dev[bf16]", "flux1-dev[fp8-scaled]"):
        current.append(_record(combo))
    assert earlier.path.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run-a.json", "run-b.json"]


def test_read_skips_a_truncated_file_with_a_warning_naming_it_and_keeps_the_rest(tmp_path):
    for run_id, combos in (("run-a", ["flux1-dev[bf16]"]), ("run-b", ["flux2-dev[bf16]"]),
                           ("run-c", ["z-image-turbo[bf16]", "z-image-turbo[nvfp4]"])):
        history = RunHistory(tmp_path, run_id, ENVIRONMENT)
        for combo in combos:
            history.append(_record(combo))
    broken = tmp_path / "run-b.json"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.warns(UserWarning, match=str(broken)):
        records = read(tmp_path)
    assert [record["combo"] for record in records] == ["flux1-dev[bf16]", "z-image-turbo[bf16]",
                                                       "z-image-turbo[nvfp4]"]
    assert all(record["environment"] == ENVIRONMENT for record in records)


def test_read_skips_a_json_file_without_records_with_a_warning(tmp_path):
    RunHistory(tmp_path, "run-a", ENVIRONMENT).append(_record("flux1-dev[bf16]"))
    (tmp_path / "notes.json").write_text('["not a run file"]')
    with pytest.warns(UserWarning, match="notes.json"):
        assert [record["combo"] for record in read(tmp_path)] == ["flux1-dev[bf16]"]


def test_run_ids_are_unique_within_one_second():
    run_ids = [new_run_id() for _ in range(20)]  # 24 random bits: a collision among 20 is a 1e-5 event
    assert len(set(run_ids)) == len(run_ids)


def test_a_record_json_cannot_hold_does_not_stop_later_records_being_stored(tmp_path):
    history = RunHistory(tmp_path, "run-a", ENVIRONMENT)
    with contextlib.suppress(ValueError):  # refusing the NaN record is fine; losing the rest of the run is not
        history.append({"combo": "flux1-dev[nvfp4]", "metrics": {"ms_ssim": float("nan")}})
    history.append(_record("flux2-dev[bf16]"))
    assert "flux2-dev[bf16]" in [record["combo"] for record in read(tmp_path)]
