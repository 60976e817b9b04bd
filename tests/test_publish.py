"""fluxgate.showing.publish: one run from the history -> summary.md, trend plots and image grids; the CLI around it."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxgate.publish import main
from fluxgate.showing.publish import write_report
from fluxgate.storing.local import LocalFolderStore, RunHistory
from fluxgate.storing.record import ERROR, FAILED, PASSED, Metrics, Record
from fluxgate.storing.verdicts import NO_CHANGE, REGRESSION, HistoryVerdict

ENVIRONMENT = {"device_name": "AMD EPYC", "gpu_class": "cpu", "torch": "2.13.0+cpu", "diffusers": "0.42.1",
               "git_commit": "6815fe4d4b485284320fd11c42ee3ad0b975e827", "git_dirty": False}
THRESHOLDS = {"min_it_s": 8.0, "max_peak_mem_gib": 2.0, "min_ms_ssim": 0.97, "min_psnr_db": 26.0}
RUNS = ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"]


def _image(seed: int, noise: float = 0.0) -> Image.Image:
    """A 64x64 gradient; `noise` adds seeded noise so a candidate differs from its reference."""
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=2).astype(np.float64)
    base += np.random.default_rng(seed).normal(0, noise, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _record(combo: str, it_s: float, mem_gib: float, ms_ssim: float = 1.0, **extra) -> Record:
    model, precision = combo.rstrip("]").split("[")
    fallback = precision in ("nvfp4", "gguf-q8_0")
    metrics = Metrics(it_s=it_s, peak_mem_gib=mem_gib, mem_kind="process_rss_peak", ms_ssim=ms_ssim,
                      psnr_db=None if ms_ssim == 1.0 else 30.0, e2e_s=0.2, step_stats={"cv": 0.03},
                      kernel_path={"label": "dequantize -> bf16 GEMM (fallback)" if fallback else "bf16 GEMM",
                                   "fallback": fallback})
    return Record(**{"combo": combo, "model": model, "precision": precision, "profile": "tiny", "gpu_class": "cpu",
                     "outcome": PASSED, "failures": [], "metrics": metrics, "thresholds": THRESHOLDS, **extra})


def _with_metrics(record: Record, **values) -> Record:
    return replace(record, metrics=replace(record.metrics, **values))


def _write_run(directory, run_id: str, records: list[Record], noise: float = 8.0) -> RunHistory:
    run = LocalFolderStore(directory).open_run(run_id, ENVIRONMENT)
    for record in records:
        if record.measured:
            moved = record.metrics.ms_ssim < 1.0
            record = replace(record, image=run.save_image(record.combo, _image(1, noise if moved else 0.0)))
        run.append(record)
    return run


@pytest.fixture
def history_dir(tmp_path):
    """Three runs of four combos: the newest has an nvfp4 image that moved and an error record."""
    directory = tmp_path / "history"
    for run_id, (it_s, mem_gib) in zip(RUNS, [(10.0, 1.0), (14.0, 1.2), (11.0, 1.32)]):
        records = [_record("flux1-dev[bf16]", it_s, mem_gib),
                   _record("flux1-dev[nvfp4]", it_s * 2, mem_gib / 2, ms_ssim=0.9712),
                   _record("z-image-turbo[bf16]", it_s, mem_gib)]
        if run_id == RUNS[-1]:
            records.append(_record("z-image-turbo[fp8-scaled]", 0, 0, outcome=ERROR, metrics=Metrics(),
                                   error="tiny/z-image-turbo/transformer-fp8-scaled.safetensors: corrupt checkpoint"))
            records[1] = replace(records[1], outcome=FAILED,
                                 failures=["similarity: MS-SSIM 0.9712 < min 0.9800 vs baselines/cpu/flux1-dev.png"])
        _write_run(directory, run_id, records)
    return directory


@pytest.fixture
def baselines_dir(tmp_path):
    """Only flux1-dev has a stored reference: z-image-turbo falls back to the run's own bf16 image."""
    folder = tmp_path / "baselines" / "cpu"
    folder.mkdir(parents=True)
    _image(1).save(folder / "flux1-dev.png")
    return tmp_path / "baselines"


def _table(summary: str) -> dict[str, list[str]]:
    """combo -> cells of its row in summary.md."""
    rows = [line.strip("|").split(" | ") for line in summary.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): [cell.strip() for cell in cells] for cells in rows}


def _assert_png(path, min_side_px: int = 300) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side_px, (path, image.size)


def test_report_writes_summary_a_trend_per_measured_combo_and_grids_where_similarity_moved(history_dir, baselines_dir,
                                                                                          tmp_path):
    out = tmp_path / "report"
    written = write_report(history_dir, out, baselines_dir)
    assert written[0] == out / "summary.md"
    assert sorted(p.relative_to(out).as_posix() for p in written[1:]) == [
        "grids/flux1-dev.nvfp4.png", "trends/flux1-dev.bf16.png", "trends/flux1-dev.nvfp4.png",
        "trends/z-image-turbo.bf16.png"]
    for path in written[1:]:
        _assert_png(path)
    summary = (out / "summary.md").read_text()
    assert RUNS[-1] in summary and "AMD EPYC" in summary and "6815fe4d4b" in summary and "profile tiny" in summary


def test_summary_has_one_row_per_combo_with_delta_against_the_median_of_earlier_runs(history_dir, baselines_dir,
                                                                                  tmp_path):
    write_report(history_dir, tmp_path / "report", baselines_dir)
    table = _table((tmp_path / "report" / "summary.md").read_text())
    assert list(table) == ["flux1-dev[bf16]", "flux1-dev[nvfp4]", "z-image-turbo[bf16]", "z-image-turbo[fp8-scaled]"]
    # it/s 10, 14 earlier -> base 12; this run 11 -> -8.3 %. Memory 1.0, 1.2 -> 1.1; this run 1.32 -> +20.0 %.
    assert table["flux1-dev[bf16]"][1:5] == ["11.000", "-8.3%", "1.320", "+20.0%"]
    assert table["flux1-dev[nvfp4]"][1:3] == ["22.000", "-8.3%"] and table["flux1-dev[nvfp4]"][-1] == "**FAIL**"
    assert table["flux1-dev[bf16]"][6] == "inf" and table["flux1-dev[bf16]"][-1] == "PASS"
    assert "⚠️ dequantize -> bf16 GEMM (fallback)" in table["flux1-dev[nvfp4]"]


def test_error_records_are_listed_with_their_message_and_get_no_plot(history_dir, baselines_dir, tmp_path):
    written = write_report(history_dir, tmp_path / "report", baselines_dir)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert _table(summary)["z-image-turbo[fp8-scaled]"][1:] == ["—"] * 9 + ["**ERROR**"]
    assert "`z-image-turbo[fp8-scaled]` error: tiny/z-image-turbo/transformer-fp8-scaled.safetensors" in summary
    assert "`flux1-dev[nvfp4]` similarity: MS-SSIM 0.9712 < min 0.9800" in summary
    assert not any("fp8-scaled" in path.name for path in written)


def test_a_corrupt_history_file_is_warned_about_and_the_other_runs_still_reported(history_dir, baselines_dir,
                                                                                 tmp_path):
    corrupt = history_dir / f"{RUNS[0]}.json"
    corrupt.write_text(corrupt.read_text()[:50])
    with pytest.warns(UserWarning, match=corrupt.name):
        write_report(history_dir, tmp_path / "report", baselines_dir)
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert len(_table(summary)) == 4 and corrupt.name in summary
    # the base is now the one readable earlier run (14 it/s): 11 -> -21.4 %
    assert _table(summary)["flux1-dev[bf16]"][2] == "-21.4%"


def test_a_single_run_has_no_delta(tmp_path, baselines_dir):
    _write_run(tmp_path / "history", RUNS[0], [_record("flux1-dev[bf16]", 10.0, 1.0)])
    write_report(tmp_path / "history", tmp_path / "report", baselines_dir)
    row = _table((tmp_path / "report" / "summary.md").read_text())["flux1-dev[bf16]"]
    assert row[2] == "—" and row[4] == "—"


def test_an_older_run_can_be_published_and_later_runs_do_not_count_as_its_history(history_dir, baselines_dir,
                                                                                tmp_path):
    write_report(history_dir, tmp_path / "report", baselines_dir, run_id=RUNS[1])
    table = _table((tmp_path / "report" / "summary.md").read_text())
    assert table["flux1-dev[bf16]"][1:3] == ["14.000", "+40.0%"] and "z-image-turbo[fp8-scaled]" not in table


def test_a_missing_image_skips_its_grid_with_a_note_in_the_summary(history_dir, baselines_dir, tmp_path):
    (name,) = [r.image for r in LocalFolderStore(history_dir).load_run(RUNS[-1]) if r.combo == "flux1-dev[nvfp4]"]
    (history_dir / name).unlink()  # content-addressed: images/<hash>.png, this run's alone (its noise is its own)
    written = write_report(history_dir, tmp_path / "report", baselines_dir)
    assert not any(path.parent.name == "grids" for path in written)
    assert f"{name} missing" in (tmp_path / "report" / "summary.md").read_text()


def test_without_a_stored_reference_the_grid_uses_the_runs_own_bf16_image(tmp_path):
    records = [_record("z-image-turbo[bf16]", 10.0, 1.0), _record("z-image-turbo[nvfp4]", 20.0, 0.5, ms_ssim=0.98)]
    _write_run(tmp_path / "history", RUNS[0], records)
    written = write_report(tmp_path / "history", tmp_path / "report", tmp_path / "no-baselines")
    assert tmp_path / "report" / "grids" / "z-image-turbo.nvfp4.png" in written


def test_the_verdicts_stored_on_the_records_replace_outcome_base_and_add_their_message(history_dir, baselines_dir,
                                                                                        tmp_path):
    run = LocalFolderStore(history_dir).open_run(RUNS[-1], ENVIRONMENT)
    run.records[:] = LocalFolderStore(history_dir).load_run(RUNS[-1])
    run.record_verdicts({
        "flux1-dev[bf16]": HistoryVerdict(REGRESSION, "flux1-dev[bf16]: regression - speed: 11.0 it/s is 12 % below "
                                          "12.5", {"min_speed_effect": 0.5}, window_it_s=12.5),
        "flux1-dev[nvfp4]": HistoryVerdict(NO_CHANGE, "flux1-dev[nvfp4]: no change - ...")})
    write_report(history_dir, tmp_path / "report", baselines_dir)
    summary = (tmp_path / "report" / "summary.md").read_text()
    row = _table(summary)["flux1-dev[bf16]"]
    assert row[2] == "-12.0%" and row[4] == "—" and row[-1] == "**REGRESSION**"
    assert "`flux1-dev[bf16]` regression - speed: 11.0 it/s is 12 % below 12.5" in summary
    assert "Gate: FAILED** (1 missed a limit, 1 errors, 1 regressed against history)" in summary
    assert _table(summary)["flux1-dev[nvfp4]"][-1] == "NO CHANGE" and _table(summary)["flux1-dev[nvfp4]"][2] == "—"
    assert _table(summary)["z-image-turbo[bf16]"][-1] == "PASS"  # no stored verdict: its own outcome


def test_cli_prints_each_file_written(history_dir, baselines_dir, tmp_path, capsys):
    assert main(["--history-dir", str(history_dir), "--out", str(tmp_path / "report"),
                 "--baselines-dir", str(baselines_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = sorted(path for path in (tmp_path / "report").rglob("*") if path.is_file())
    assert sorted(Path(line.removeprefix("wrote ")) for line in lines) == written
    assert tmp_path / "report" / "decision.md" in written


@pytest.mark.parametrize("make", [lambda d: d.mkdir(), lambda d: None], ids=["empty", "missing"])
def test_cli_exits_2_with_one_line_for_an_empty_or_missing_history_dir(tmp_path, capsys, make):
    make(tmp_path / "history")
    assert main(["--history-dir", str(tmp_path / "history"), "--out", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "history") in error and "Traceback" not in error


def test_cli_exits_2_for_an_unknown_run_id(history_dir, tmp_path, capsys):
    assert main(["--history-dir", str(history_dir), "--out", str(tmp_path / "r"), "--run-id", "nope"]) == 2
    assert "--run-id nope: no such run" in capsys.readouterr().err
    # an A/B run's id names its two sides
    _write_run(history_dir, "20261207T130000Z-abcdef-candidate", [_record("flux1-dev[bf16]", 10.0, 1.0)])
    assert main(["--history-dir", str(history_dir), "--out", str(tmp_path / "r"), "--run-id",
                 "20261207T130000Z-abcdef"]) == 2
    assert "an A/B run's sides are 20261207T130000Z-abcdef-candidate" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--history-dir", "--out", "--baselines-dir", "--run-id"):
        assert option in help_text


def test_step_spikes_with_host_bound_flags_get_a_section_naming_the_cause(tmp_path, baselines_dir):
    from fluxgate.stats import spikes

    times = [0.28] * 26 + [0.40, 0.36]
    spiked = _with_metrics(_record("flux1-dev[fp8-scaled]", 3.5, 12.3),
                           spikes=spikes(times, [0.001] * 28, [False] * 26 + [True, True]).to_json())
    steady = _with_metrics(_record("flux1-dev[bf16]", 5.5, 22.7),
                           spikes=spikes([0.18] * 28, [0.001] * 28, [False] * 28).to_json())
    _write_run(tmp_path / "history", RUNS[0], [steady, spiked])

    summary = write_report(tmp_path / "history", tmp_path / "report", baselines_dir)[0].read_text()

    section = summary.split("**Step spikes**")[1]
    assert "- `flux1-dev[fp8-scaled]` 2 of 28 steps ≥10% over the median (slowest +43%): 2 host-bound" in section
    assert "flux1-dev[bf16]" not in section
    assert "Host-synchronous" not in summary  # no combo's profiled step waited for the GPU


def test_host_synchronous_combos_are_named_with_their_syncs_per_step(tmp_path, baselines_dir):
    nvfp4 = _with_metrics(_record("flux1-dev[nvfp4]", 2.2, 8.9), kernel_path={"host_syncs_per_step": 495})
    bf16 = _with_metrics(_record("flux1-dev[bf16]", 5.5, 22.7), kernel_path={"host_syncs_per_step": 1})
    _write_run(tmp_path / "history", RUNS[0], [bf16, nvfp4])

    summary = write_report(tmp_path / "history", tmp_path / "report", baselines_dir)[0].read_text()

    (line,) = [line for line in summary.splitlines() if line.startswith("**Host-synchronous combos**")]
    assert line.endswith(": flux1-dev[nvfp4] 495") and "host CPU" in line


def test_the_report_folder_holds_only_the_run_it_describes(history_dir, baselines_dir, tmp_path):
    out = tmp_path / "report"
    for folder in ("trends", "grids", "decision"):
        (out / folder).mkdir(parents=True)
        (out / folder / "z-image-turbo.gone.png").write_bytes(b"an earlier run's plot")
    (out / "notes.txt").write_text("the user's own file")
    written = write_report(history_dir, out, baselines_dir)
    assert not list(out.rglob("*.gone.png"))
    assert (out / "notes.txt").is_file() and all(path.is_file() for path in written)


def test_the_delta_uses_the_window_the_gate_judges_against_leaving_out_a_gate_off_run(history_dir, baselines_dir,
                                                                                    tmp_path):
    # A run made with the history gate off (a CI `tests` run) stands in no window: the Δ beside a verdict must not
    # use it either (it/s 10 earlier, 14 in the gate-off run; this run 11 -> +10.0 % against 10 alone).
    path = history_dir / f"{RUNS[1]}.json"
    document = json.loads(path.read_text())
    document["environment"] = {**document["environment"], "history_gate": "off"}
    path.write_text(json.dumps(document))
    write_report(history_dir, tmp_path / "report", baselines_dir)
    table = _table((tmp_path / "report" / "summary.md").read_text())
    assert table["flux1-dev[bf16]"][1:3] == ["11.000", "+10.0%"]


def test_a_missed_trade_off_against_bf16_fails_the_headline_and_is_listed(history_dir, baselines_dir, tmp_path):
    # The newest run's flux1-dev[nvfp4] holds half of bf16's RSS; a limit of 0.4x makes that a missed trade-off.
    (baselines_dir / "cpu" / "thresholds.toml").write_text(
        '[tradeoffs.flux1-dev.nvfp4]\nmax_mem_ratio = 0.4\nmem_kind = "process_rss_peak"\n')
    summary = write_report(history_dir, tmp_path / "report", baselines_dir)[0].read_text()
    assert "trade-offs against bf16 missed" in summary.splitlines()[3]
    assert "**Trade-offs against bf16**" in summary and "FAIL flux1-dev[nvfp4] memory: peak RSS 0.5000x" in summary
