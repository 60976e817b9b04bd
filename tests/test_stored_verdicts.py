"""One truth per run: the gate's verdicts stored on the records are what publish, the PR summary and the dashboard
show, on every committed run; the history window trusts only its own branch's pushes; a run's `merged_from` hides
only runs it really holds; the dashboard writes only into a folder of its own."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fluxgate.judging import compare, window
from fluxgate.showing import dashboard, figures, publish
from fluxgate.showing.report import VERDICTS
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import PASSED, Metrics, Record
from fluxgate.storing.verdicts import NO_CHANGE, NOT_RECORDED, REGRESSION, shown
from history_support import judge_like_the_gate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_figures(monkeypatch):
    """Trend plots are not verdicts: drawn as empty files here."""
    monkeypatch.setattr(publish, "write_trend", lambda path, *args: Path(path).write_bytes(b""))
    monkeypatch.setattr(publish, "write_grid", lambda path, *args: Path(path).write_bytes(b""))
    monkeypatch.setattr(figures, "write_trend", lambda path, *args: Path(path).write_bytes(b""))


def _summary_verdicts(summary: str) -> dict[str, str]:
    rows = [line.strip("|").split(" | ") for line in summary.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): cells[-1].strip().strip("*") for cells in rows}


def _dashboard_verdicts(site: Path) -> dict[tuple[str, str], str]:
    """(run id, combo) -> the verdict cell of each combo page's table of runs."""
    shown_there = {}
    for page in site.glob("*/*.html"):
        combo = re.search(r"<h1>(.*?) on ", page.read_text()).group(1)
        for run_id, verdict in re.findall(r"<tr><td>[^<]*</td><td>([^<]+)</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*"
                                          r"</td><td class='[^']*'>([^<]+)</td>", page.read_text()):
            shown_there[(run_id, combo.replace("&#x27;", "'"))] = verdict
    return shown_there


@pytest.mark.parametrize("gpu_class", sorted(p.parent.name for p in ROOT.glob("baselines/*/runs")))
def test_dashboard_publish_and_the_pr_summary_show_the_gates_verdict_on_every_committed_run(
        tmp_path, gpu_class, no_figures):
    history = tmp_path / "history"
    shutil.copytree(ROOT / "baselines" / gpu_class / "runs", history)
    store = LocalFolderStore(history)
    records = [r for r in store.load() if r.outcome != "remeasure"]
    assert records
    dashboard.build(store, tmp_path / "site", tmp_path / "baselines")
    on_dashboard = _dashboard_verdicts(tmp_path / "site")
    for run_id in sorted({r.run_id for r in records}):
        (summary, *_) = publish.write_report(store, tmp_path / "report", tmp_path / "baselines", run_id=run_id)
        in_summary = _summary_verdicts(summary.read_text())
        run = {r.combo: r for r in records if r.run_id == run_id}
        for combo, record in run.items():
            assert on_dashboard[(run_id, combo)] == (shown(record) or NOT_RECORDED), (run_id, combo)
            assert in_summary[combo] == (shown(record) or VERDICTS[record.outcome]).upper(), (run_id, combo)
        failed = {combo for combo, r in run.items() if r.history_verdict is not None and r.history_verdict.fails_run}
        assert ("regressed against history" in summary.read_text()) == bool(failed)


def _steps(median_s: float, seed: int) -> list[float]:
    return (median_s * np.random.default_rng(seed).lognormal(0, 0.003, 28)).tolist()


def _record(combo: str, median_s: float, seed: int, environment: dict) -> Record:
    model, precision = combo.rstrip("]").split("[")
    steps = _steps(median_s, seed)
    return Record(combo, model, precision, "eager", "tiny", "cpu", settings={"steps": 28}, outcome=PASSED,
                  environment=environment, metrics=Metrics(it_s=1 / float(np.median(steps)), step_times_s=steps,
                                                           peak_mem_gib=1.0, mem_kind="process_rss_peak"))


def test_readers_never_judge_again_with_another_policy(tmp_path, no_figures):
    """A CPU run 20 % slower: the gate, at CPU's 50 % minimum effect, says no change; the default policy (2 %) would
    call it a regression. Every reader shows the gate's "no change"."""
    store = LocalFolderStore(tmp_path / "history")
    environment = {"device_type": "cpu", "device_name": "cpu", "git_commit": "a" * 40}
    cpu_policy = compare.Policy(min_speed_effect=compare.min_speed_effect_for("cpu"))
    for run, slow in enumerate([1.0, 1.0, 1.0, 1.2]):
        writer = store.open_run(f"2026120{run + 1}T000000Z-aaaaa{run}", environment)
        writer.append(_record("flux1-dev[bf16]", 0.02 * slow, run, environment))
        (verdict,) = judge_like_the_gate(writer, cpu_policy)
    assert verdict.outcome == NO_CHANGE
    records = store.load()
    again = compare.compare_run(records, writer.run_id)  # what a reader re-judging with Policy() would say
    assert again[0].outcome == REGRESSION
    (stored,) = [r for r in records if r.run_id == writer.run_id]
    assert stored.history_verdict.outcome == NO_CHANGE and stored.history_verdict.policy["min_speed_effect"] == 0.5
    assert dashboard.series(records)[("cpu", "flux1-dev[bf16]")][-1].verdict == NO_CHANGE
    (summary, *_) = publish.write_report(store, tmp_path / "report", tmp_path / "baselines")
    assert _summary_verdicts(summary.read_text()) == {"flux1-dev[bf16]": "NO CHANGE"}


def _lane(branch: str | None, event: str | None) -> dict:
    return {"device_type": "cpu", "device_name": "cpu", "branch": branch, "event": event}


def _series(lanes: list[dict], slow_from: int) -> list[Record]:
    records = []
    for run, environment in enumerate(lanes):
        record = _record("flux1-dev[bf16]", 0.02 * (2.0 if run >= slow_from else 1.0), run, environment)
        records.append(Record(**{**record.__dict__, "run_id": f"2026120{run}T000000Z-run{run:03d}",
                                 "recorded": f"2026-12-0{run}T00:00:00"}))
    return records


def test_a_pull_request_run_never_enters_a_window_and_main_is_judged_against_mains_pushes_only():
    """Five fake slow runs from a pull request and from another branch cannot move main's window."""
    main, pr, other = _lane("main", "push"), _lane("main", "pull_request"), _lane("feature", "push")
    records = _series([main, main, pr, pr, other, other, other, main], slow_from=2)
    candidate = records[-1]
    chosen = window.select_window(records, candidate)
    assert [r.run_id for r in chosen] == [records[0].run_id, records[1].run_id]
    assert window.unfit_for_window(records[2]).startswith("pull request run")
    assert "branch feature" in window.lane_mismatch(records[4], candidate)
    assert compare.compare_record(records, candidate, policy=compare.Policy(min_speed_effect=0.5)).outcome == REGRESSION
    pull_request = Record(**{**records[2].__dict__, "run_id": "20261209T000000Z-prnext", "recorded": "2026-12-09"})
    assert [r.run_id for r in window.select_window(records, pull_request)] == [
        records[0].run_id, records[1].run_id, records[7].run_id]  # a PR is judged against its target's pushes
    local = Record(**{**records[2].__dict__, "environment": _lane("feature", "local"), "run_id": "20261209T0Z-l",
                      "recorded": "2026-12-09"})
    assert records[2].run_id not in {r.run_id for r in window.select_window(records, local)}


def _run_document(run_id: str, combos: list[str], **extra) -> dict:
    records = [{"schema": 2, "combo": combo, "run_id": run_id, "outcome": "passed", "metrics": {"it_s": 1.0},
                **extra} for combo in combos]
    return {"schema": 2, "run_id": run_id, "started": "", "environment": {}, "records": records}


def test_merged_from_hides_only_runs_the_merged_run_really_holds(tmp_path):
    folder = tmp_path / "history"
    folder.mkdir()
    old = [_run_document(f"20261201T00000{i}Z-aaaaa{i}", ["a[bf16]", "a[nvfp4]"]) for i in range(3)]
    liar = {**_run_document("20261202T000000Z-bbbbbb", []), "merged_from": [run["run_id"] for run in old]}
    honest = _run_document("20261203T000000Z-cccccc", ["a[bf16]", "a[nvfp4]"], source_run_id=old[0]["run_id"])
    honest["merged_from"] = [old[0]["run_id"]]
    newer_liar = {**_run_document("20261130T000000Z-dddddd", ["a[bf16]", "a[nvfp4]"],
                                  source_run_id=old[1]["run_id"]), "merged_from": [old[1]["run_id"]]}
    for document in (*old, liar, honest, newer_liar):
        (folder / f"{document['run_id']}.json").write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="does not hold its records"):
        runs = {r.run_id for r in LocalFolderStore(folder).load()}
    assert runs == {old[1]["run_id"], old[2]["run_id"], honest["run_id"], newer_liar["run_id"]}


def test_a_run_file_whose_run_id_is_not_its_name_is_skipped(tmp_path):
    (tmp_path / "20261201T000000Z-aaaaaa.json").write_text(json.dumps(_run_document("20261201T000000Z-zzzzzz",
                                                                                    ["a[bf16]"])))
    with pytest.warns(UserWarning, match="its run id 20261201T000000Z-zzzzzz is not its file name"):
        assert LocalFolderStore(tmp_path).load() == []


def test_a_merge_whose_shard_or_own_run_id_names_another_run_is_refused(tmp_path, capsys):
    from fluxgate import merge

    history, shards = tmp_path / "history", tmp_path / "shards"
    history.mkdir(), shards.mkdir()
    existing = _run_document("20261201T000000Z-aaaaaa", ["a[bf16]"])
    (history / "20261201T000000Z-aaaaaa.json").write_text(json.dumps(existing))
    shard = _run_document("20261201T000000Z-aaaaaa", ["a[nvfp4]"])  # the same id as a run already there
    (shards / "s.json").write_text(json.dumps(shard))
    assert merge.main([str(shards / "s.json"), "--history-dir", str(history)]) == 2
    assert "a shard's run id 20261201T000000Z-aaaaaa: a run with this id is already in" in capsys.readouterr().err
    (shards / "t.json").write_text(json.dumps(_run_document("20261202T000000Z-bbbbbb", ["a[nvfp4]"])))
    assert merge.main([str(shards / "t.json"), "--history-dir", str(history), "--run-id",
                       "20261201T000000Z-aaaaaa"]) == 2
    assert "--run-id 20261201T000000Z-aaaaaa: a run with this id is already in" in capsys.readouterr().err
    assert json.loads((history / "20261201T000000Z-aaaaaa.json").read_text()) == existing


def _small_history(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "20261201T000000Z-aaaaaa.json").write_text(json.dumps(_run_document("20261201T000000Z-aaaaaa",
                                                                                  ["a[bf16]"])))


@pytest.mark.parametrize("out", ["history", ".", "foreign"])
def test_dashboard_refuses_the_history_folder_its_parent_or_a_folder_of_other_files_exit_4(tmp_path, capsys, out,
                                                                                           no_figures):
    from fluxgate.dashboard import main

    _small_history(tmp_path / "history")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["--history-dir", str(tmp_path / "history"), "--out", str(tmp_path / out),
                 "--baselines-dir", str(tmp_path / "b")]) == 4
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"--out {tmp_path / out}" in error
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing written


def test_dashboard_rebuilds_over_its_own_site_and_removes_only_what_it_wrote(tmp_path, capsys, no_figures):
    from fluxgate.dashboard import main

    _small_history(tmp_path / "history")
    args = ["--history-dir", str(tmp_path / "history"), "--out", str(tmp_path / "site"), "--baselines-dir",
            str(tmp_path / "b")]
    assert main(args) == 0
    stale = tmp_path / "site" / "cpu-old"
    marker = json.loads((tmp_path / "site" / ".fluxgate-dashboard").read_text())
    stale.mkdir()
    (stale / "page.html").write_text("an older build's page")
    listed = {"files": marker["files"] + ["cpu-old/page.html"]}  # as an earlier build with another class wrote it
    (tmp_path / "site" / ".fluxgate-dashboard").write_text(json.dumps(listed))
    assert main(args) == 0 and not stale.exists() and (tmp_path / "site" / "index.html").is_file()
    (tmp_path / "site" / "mine.txt").write_text("a user's file")
    assert main(args) == 4 and (tmp_path / "site" / "mine.txt").read_text() == "a user's file"


def test_the_gate_writes_its_verdicts_once_onto_the_runs_records(tmp_path):
    """`Gate.verdicts` at the end of a run: a CPU regression confirmed by a re-measurement is stored on the combo's
    record with the 50 % policy, the re-measurement beside it; the unchanged combo's verdict is stored too."""
    from types import SimpleNamespace

    from fluxgate.gate import Gate

    store = LocalFolderStore(tmp_path / "history")
    environment = {"device_type": "cpu", "device_name": "cpu", "history_gate": "on"}
    for run in range(2):
        writer = store.open_run(f"2026120{run + 1}T000000Z-aaaaa{run}", environment)
        for combo in ("flux1-dev[bf16]", "flux1-dev[nvfp4]"):
            writer.append(_record(combo, 0.02, run, environment))
    slow = _steps(0.06, 9)
    runner = SimpleNamespace(device=SimpleNamespace(type="cpu"), profile="tiny",
                             measure=lambda combo: (SimpleNamespace(step_times_s=slow, it_s=1 / 0.06, run_wait_s=None, e2e_s=None), None))
    gate = Gate(runner, tmp_path / "baselines", "cpu", store.open_run("20261205T000000Z-bbbbbb", environment),
                write=False)
    gate.history.append(_record("flux1-dev[bf16]", 0.02, 7, environment))
    gate.history.append(_record("flux1-dev[nvfp4]", 0.06, 8, environment))
    judged = gate.verdicts(confirm=True)
    assert {v.combo: v.outcome for v in judged} == {"flux1-dev[bf16]": NO_CHANGE, "flux1-dev[nvfp4]": REGRESSION}
    stored = {r.combo: r for r in store.load_run(gate.history.run_id) if r.outcome != "remeasure"}
    nvfp4 = stored["flux1-dev[nvfp4]"].history_verdict
    assert nvfp4.fails_run and nvfp4.remeasured and nvfp4.policy["min_speed_effect"] == 0.5
    assert nvfp4.window_run_ids == ("20261201T000000Z-aaaaa0", "20261202T000000Z-aaaaa1")
    assert stored["flux1-dev[bf16]"].history_verdict.outcome == NO_CHANGE
    assert publish.regressions(store.load(), gate.history.run_id) == {"flux1-dev[nvfp4]"}
