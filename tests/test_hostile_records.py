"""Records others can write: a record of the wrong shape is skipped in one line naming the file and field (never a
traceback in the gate, report or dashboard), record text never runs as HTML in the dashboard, and names from records
never lead a reader outside its folders. The fuzz feeds mutated copies of a committed run to every reader."""

from __future__ import annotations

import copy
import json
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxgate.errors import FluxgateError, HistoryError
from fluxgate.judging import compare
from fluxgate.showing import ab_card, card, dashboard, decision, figures, publish
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.names import contained

pytestmark = pytest.mark.slow  # hypothesis through every reader: ~50 s

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "baselines" / "cpu" / "runs" / "20261130T104623Z-568428.json"
PAYLOAD = "<img src=x onerror=alert(1)>"


def _run(run_id: str, records: int = 2) -> dict:
    """A committed CPU run, cut to `records` records, as run `run_id`."""
    document = json.loads(COMMITTED.read_text())
    document["records"] = [{**record, "run_id": run_id} for record in document["records"][:records]]
    return {**document, "run_id": run_id}


def _write(folder: Path, document: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{document['run_id']}.json").write_text(json.dumps(document))


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    """Trend plots and grids are matplotlib's, not what is fuzzed: drawn as empty files, so the fuzz stays quick."""
    monkeypatch.setattr(publish, "write_trend", lambda path, *args: Path(path).write_bytes(b""))
    monkeypatch.setattr(publish, "write_grid", lambda path, *args: Path(path).write_bytes(b""))
    monkeypatch.setattr(figures, "write_trend", lambda path, *args: Path(path).write_bytes(b""))


def _paths(value, prefix=()) -> list[tuple]:
    """Every key path inside a JSON value (lists: their first item)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += [(*prefix, key), *_paths(item, (*prefix, key))]
    elif isinstance(value, list) and value:
        found += [(*prefix, 0), *_paths(value[0], (*prefix, 0))]
    return found


RECORD_PATHS = sorted(set(_paths(_run("x")["records"][0])) | {("history_verdict",), ("ab",), ("history_verdict", "x"),
                                                              ("environment",), ("source_run_id",)}, key=str)
RUN_PATHS = [("run_id",), ("merged_from",), ("environment",), ("schema",), ("records",), ("environment", "gpu"),
             ("environment", "git_commit"), ("environment", "device_name"), ("environment", "branch")]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=12)
                    | st.sampled_from(["..", "../../x", "a/../../b", PAYLOAD, "regression", "passed"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


def _set(document, path, value) -> None:
    """Set `path` in `document` to `value`, where an earlier mutation left the path there."""
    def holds(container, key) -> bool:  # an index into a list, a key of a dict (an earlier mutation may swap them)
        if isinstance(container, list):
            return isinstance(key, int) and key < len(container)
        return isinstance(container, dict) and isinstance(key, str)

    target = document
    for key in path[:-1]:
        if not holds(target, key) or (isinstance(target, dict) and key not in target):
            return
        target = target[key]
    if holds(target, path[-1]):
        target[path[-1]] = value


def _one_line(error: BaseException) -> None:
    assert isinstance(error, FluxgateError), f"{type(error).__name__}: {error}"
    assert "\n" not in str(error) and "Traceback" not in str(error)


AB_RUN = ROOT / "baselines" / "nvidia-h200" / "runs" / "20261130T111747Z-fe443e-{side}.json"  # one combo, SLOW
AB_PATHS = sorted(set(_paths(json.loads(Path(str(AB_RUN).format(side="candidate")).read_text())["records"][0])),
                  key=str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(RECORD_PATHS + [("run",) + p for p in RUN_PATHS]
                                                    + [("ab-run",) + p for p in AB_PATHS]), JSON),
                          min_size=1, max_size=3))
@example(mutations=[(("precision",), None)])  # found by this test: the decision report's chart label
def test_mutated_records_never_crash_load_gate_report_card_or_dashboard(tmp_path_factory, mutations):
    folder = tmp_path_factory.mktemp("fuzz")
    history = folder / "history"
    _write(history, _run("20261130T100000Z-aaaaaa"))
    candidate = _run("20261130T110000Z-bbbbbb")
    sides = {side: json.loads(Path(str(AB_RUN).format(side=side)).read_text()) for side in ("base", "candidate")}
    for path, value in mutations:
        if path[0] == "run":
            _set(candidate, path[1:], value)
        elif path[0] == "ab-run":
            _set(sides["candidate"]["records"][0], path[1:], copy.deepcopy(value))
        else:
            _set(candidate["records"][1], path, copy.deepcopy(value))
    for document in sides.values():
        _write(history, document)
    _write(history, {**candidate, "run_id": "20261130T110000Z-bbbbbb"})  # the file keeps its name
    store = LocalFolderStore(history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = store.load()
        for run_id in sorted({r.run_id for r in records}):  # what the gate does with them at the end of a run
            compare.compare_run(records, run_id, policy=compare.Policy(min_speed_effect=0.5))
        for gpu_class in {str(r.gpu_class) for r in records}:  # the detection card's readers
            card.build(records, gpu_class, effects=(0.02,))
            ab_card.build(records, gpu_class, effects=(0.02,), simulations=5)
            ab_card.injected_runs(records, gpu_class)
        prices = decision.load(decision.DEFAULT_FILE, None, missing_ok=True)
        for step in (lambda: publish.write_report(store, folder / "report", folder / "baselines",
                                                  decision_settings=prices),
                     lambda: dashboard.build(store, folder / "site", folder / "baselines", prices)):
            try:
                step()
            except Exception as error:  # noqa: BLE001 - only the documented one-line errors may leave a reader
                _one_line(error)
    for warning in caught:
        assert "\n" not in str(warning.message), warning.message


@pytest.mark.parametrize("field, value, named", [
    (("metrics", "step_times_s"), [0.1, None, 0.1],
     "field metrics.step_times_s: expected a list of finite numbers > 0"),
    (("metrics", "it_s"), "fast", "field metrics.it_s: expected a finite number >= 0, got 'fast'"),
    (("failures",), "one string", "field failures: expected a list of strings"),
    (("gpu_class",), "../../etc", "field gpu_class: expected a safe name"),
    (("image",), "../../../etc/passwd.png", "field image: expected an image name"),
    (("metrics", "cases"), [{"case": "../x"}], "field metrics.cases[0].case: expected a safe name"),
    (("history_verdict",), {"outcome": "no change", "policy": {"min_speed_effect": "x"}},
     "field history_verdict.policy: expected a JSON object of finite numbers"),
])
def test_a_record_of_the_wrong_shape_is_skipped_in_one_line_naming_file_combo_and_field(tmp_path, field, value,
                                                                                        named):
    run = _run("20261130T110000Z-bbbbbb")
    _set(run["records"][1], field, value)
    _write(tmp_path, run)
    with pytest.warns(UserWarning) as caught:
        records = LocalFolderStore(tmp_path).load()
    assert [r.combo for r in records] == [run["records"][0]["combo"]]  # the other record stays
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"{tmp_path / (run['run_id'] + '.json')}: record {run['records'][1]['combo']}: {named}")
    assert message.endswith("; record skipped") and "\n" not in message


@pytest.mark.parametrize("merged_from", [5, "x", [1], ["../x"]])
def test_a_malformed_merged_from_skips_that_run_file_only(tmp_path, merged_from):
    _write(tmp_path, _run("20261130T100000Z-aaaaaa"))
    _write(tmp_path, {**_run("20261130T110000Z-bbbbbb"), "merged_from": merged_from})
    with pytest.warns(UserWarning, match="field merged_from: expected a list of run ids"):
        assert {r.run_id for r in LocalFolderStore(tmp_path).load()} == {"20261130T100000Z-aaaaaa"}


class _Tags(HTMLParser):
    """Every start tag of a page with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_hostile_record_text_is_never_a_live_tag_on_any_dashboard_page(tmp_path):
    run = _run("20261130T110000Z-bbbbbb")
    run["environment"].update(device_name=PAYLOAD, git_commit=PAYLOAD, torch=PAYLOAD)
    first, second = run["records"]
    first.update(profile=PAYLOAD, failures=[PAYLOAD], outcome="failed",
                 history_verdict={"outcome": "regression", "message": PAYLOAD, "gating": True})
    second.update(outcome="error", error=f"broken: {PAYLOAD}", metrics={})
    hidden = {**copy.deepcopy(first), "combo": f"a[{PAYLOAD}]"}  # a name that is no name: the record is skipped
    run["records"].append(hidden)
    _write(tmp_path / "history", run)
    with pytest.warns(UserWarning, match="field combo: expected a combo id"):
        dashboard.build(LocalFolderStore(tmp_path / "history"), tmp_path / "site", tmp_path / "baselines")
    pages = sorted((tmp_path / "site").rglob("*.html"))
    assert len(pages) >= 4  # index, the class's report, two combo pages
    for page in pages:
        text = page.read_text()
        assert PAYLOAD not in text, page
        parser = _Tags()
        parser.feed(text)
        for tag, attrs in parser.tags:
            assert not any(name.startswith("on") for name in attrs), (page, tag, attrs)
            assert tag != "img" or attrs.get("alt") == "grid", (page, attrs)
            assert tag != "script" or attrs.get("src", "").endswith("plotly.min.js") or "src" not in attrs
    report = (tmp_path / "site" / "cpu" / "report.html").read_text()
    assert "&lt;img src=x onerror=alert(1)&gt;" in report  # shown as text


def test_a_pr_summary_shows_record_text_without_a_tag(tmp_path):
    run = _run("20261130T110000Z-bbbbbb")
    run["environment"]["device_name"] = PAYLOAD
    run["records"][0].update(error=PAYLOAD, outcome="error", metrics={})
    _write(tmp_path / "history", run)
    (summary, *_) = publish.write_report(LocalFolderStore(tmp_path / "history"), tmp_path / "r", tmp_path / "b")
    text = summary.read_text()
    assert "<img" not in text and text.count("&lt;img src=x onerror=alert(1)>") == 2


def test_names_from_records_never_write_or_read_outside_their_folders(tmp_path):
    run = _run("20261130T110000Z-bbbbbb")
    run["records"][0].update(gpu_class="../../escaped")
    run["records"][1].update(image="../../outside.png")
    (tmp_path / "outside.png").write_bytes(b"not yours")
    _write(tmp_path / "history", run)
    before = {p for p in tmp_path.rglob("*")}
    with pytest.warns(UserWarning, match="record skipped"):
        with pytest.raises(publish.PublishError):
            dashboard.build(LocalFolderStore(tmp_path / "history"), tmp_path / "site", tmp_path / "baselines")
    assert {p for p in tmp_path.rglob("*") if p not in before} <= {tmp_path / "site"}
    assert LocalFolderStore(tmp_path / "history").read_image("../../outside.png") is None
    with pytest.raises(HistoryError, match="outside"):
        contained(tmp_path / "site", tmp_path / "site" / ".." / "x")


def test_merge_refuses_a_run_id_that_leaves_the_history_folder(tmp_path, capsys):
    from fluxgate import merge

    _write(tmp_path / "shards", _run("20261130T100000Z-aaaaaa"))
    assert merge.main([str(tmp_path / "shards" / "20261130T100000Z-aaaaaa.json"), "--history-dir",
                       str(tmp_path / "history"), "--run-id", "../../x"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--run-id '../../x': not a run id" in error
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.glob("**/x.json"))
