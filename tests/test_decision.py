"""The 'which precision to ship' decision: the rule on synthetic records, the markdown, the plots, the settings file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from PIL import Image

from fluxgate.errors import FixtureError
from fluxgate.showing import decision, publish
from fluxgate.storing.record import ERROR, FAILED, PASSED, Metrics, Record
from fluxgate.storing.verdicts import ABVerdict, HistoryVerdict
from fluxgate.storing.store import Run

GPU = "nvidia-h100-80gb-hbm3"
SETTINGS = decision.Settings({"default": 3.0, GPU: 3.0}, {"default": {"min_ms_ssim": 0.97, "min_psnr_db": 26.0}})


def record(variant: str, it_s: float, peak: float, ms_ssim: float, psnr: float | None, outcome: str = PASSED,
           fallback: bool = False, model: str = "flux1-dev", energy_j: float = 600.0, **extra) -> Record:
    runtime = "compile" if variant.endswith("-compile") else "eager"
    precision = variant.removesuffix("-compile")
    steps = 28
    return Record(combo=f"{model}[{variant}]", model=model, precision=precision, runtime=runtime,
                  gpu_class=GPU, profile="synthetic", outcome=outcome, run_id="r2",
                  settings={"steps": steps}, failures=["speed: ..."] if outcome == FAILED else [],
                  metrics=Metrics(it_s=it_s, peak_mem_gib=peak, ms_ssim=ms_ssim, psnr_db=psnr,
                                  e2e_s=steps / it_s + 0.5, images=1, telemetry={"energy_j": energy_j},
                                  kernel_path={"fallback": fallback}, compile_s=20.0 if runtime == "compile" else None,
                                  **extra))


# FLUX.1-dev on the H100 (DESIGN.md's numbers): eager fp8 is slower than bf16, compiled fp8 the fastest.
H100_FLUX1 = [
    record("bf16", 5.5, 22.7, 1.0, None),
    record("fp8-scaled", 3.5, 12.3, 0.998, 39.5),
    record("gguf-q8_0", 3.9, 12.4, 0.9996, 46.0),
    record("nvfp4", 2.3, 7.3, 0.985, 31.0, fallback=True),
    record("bf16-compile", 7.6, 22.9, 0.9995, 44.0),
    record("fp8-scaled-compile", 9.7, 12.3, 0.998, 39.4),
]


def only(decisions: list[decision.Decision]) -> decision.Decision:
    assert len(decisions) == 1
    return decisions[0]


def test_the_fastest_passing_combo_above_the_quality_floor_is_recommended_with_its_saving():
    d = only(decision.decide(H100_FLUX1, SETTINGS))

    assert d.recommended.combo == "flux1-dev[fp8-scaled-compile]"
    assert d.reference.combo == "flux1-dev[bf16]"
    assert d.recommended.speedup == pytest.approx(9.7 / 7.6)  # against BF16 of its own runtime
    assert d.recommended.speedup_against == "bf16-compile"
    assert "1.76× BF16 eager's speed (1.28× `bf16-compile`, the same runtime)" in d.text
    assert "-10.4 GiB" in d.text and "less per 1000 images" in d.text
    # $/1000 images = seconds per image x $/hour / 3.6
    assert d.recommended.usd_per_1000 == pytest.approx((28 / 9.7 + 0.5) * 3.0 / 3.6)


def test_a_combo_that_failed_its_asserts_is_never_recommended_however_fast():
    records = [*H100_FLUX1[:-1], record("fp8-scaled-compile", 9.7, 12.5, 0.998, 39.4, outcome=FAILED)]

    d = only(decision.decide(records, SETTINGS))

    assert d.recommended.combo == "flux1-dev[bf16-compile]"
    assert not any(r.frontier for r in d.rows if not r.passed)


def test_errored_and_skipped_combos_are_left_out():
    records = [*H100_FLUX1, Record(combo="flux1-dev[nvfp4-compile]", model="flux1-dev", precision="nvfp4",
                                   runtime="compile", gpu_class=GPU, outcome=ERROR)]

    assert "flux1-dev[nvfp4-compile]" not in [r.combo for r in only(decision.decide(records, SETTINGS)).rows]


def test_the_quality_floor_of_the_model_decides_between_fast_and_close():
    strict = decision.Settings(SETTINGS.gpu_hour_usd, {**SETTINGS.quality_floor,
                                                       "flux1-dev": {"min_ms_ssim": 0.9995}})

    d = only(decision.decide(H100_FLUX1, strict))

    assert d.recommended.combo == "flux1-dev[bf16-compile]"  # fp8 (0.998) is below this model's floor
    assert {r.combo for r in d.rows if not r.quality_ok} == {"flux1-dev[fp8-scaled]", "flux1-dev[nvfp4]",
                                                             "flux1-dev[fp8-scaled-compile]"}


def test_a_vram_budget_picks_the_fastest_combo_that_fits():
    budget = decision.Settings(SETTINGS.gpu_hour_usd, SETTINGS.quality_floor, vram_budget_gib=10)

    d = only(decision.decide(H100_FLUX1, budget))

    assert d.recommended.combo == "flux1-dev[nvfp4]"
    assert "dequantize fallback" in d.text  # its speed is not what FP4 promises on a GPU with FP4 tensor cores


def test_a_budget_below_every_peak_says_nothing_fits_and_why():
    budget = decision.Settings(SETTINGS.gpu_hour_usd, SETTINGS.quality_floor, vram_budget_gib=5)

    d = only(decision.decide(H100_FLUX1, budget))

    assert d.recommended is None
    assert d.text == "nothing fits the 5 GiB VRAM budget: the smallest peak is 7.3 GiB (`flux1-dev[nvfp4]`)."


def test_when_nothing_qualifies_the_reasons_are_counted():
    records = [record("bf16", 5.5, 22.7, 1.0, None, outcome=FAILED), record("nvfp4", 2.3, 7.3, 0.9, 20.0)]

    d = only(decision.decide(records, SETTINGS))

    assert d.recommended is None
    assert d.text == ("no combo qualifies: 1 failed an assert or did not run; 1 below the quality floor "
                      "(MS-SSIM 0.97, PSNR 26 dB).")


def test_the_frontier_holds_the_combos_no_other_beats_on_speed_quality_and_vram_at_once():
    d = only(decision.decide(H100_FLUX1, SETTINGS))

    # Eager fp8 is slower than compiled fp8, no closer to BF16 and no smaller: dominated. Eager bf16 stays (nothing
    # is as close to the reference), nvfp4 too (the smallest), gguf (closer than anything faster).
    assert {r.combo for r in d.rows if not r.frontier} == {"flux1-dev[fp8-scaled]"}


def test_models_and_gpu_classes_are_decided_apart():
    other = [record("bf16", 6.6, 14.0, 1.0, None, model="z-image-turbo"),
             record("gguf-q8_0", 5.3, 8.0, 0.999, 45.0, model="z-image-turbo")]

    decisions = decision.decide([*H100_FLUX1, *other], SETTINGS)

    assert [(d.model, d.recommended.combo) for d in decisions] == [
        ("flux1-dev", "flux1-dev[fp8-scaled-compile]"), ("z-image-turbo", "z-image-turbo[bf16]")]
    assert "BF16 eager itself is the best qualifying combo" in decisions[1].text


def test_the_markdown_states_the_rule_and_marks_recommended_fallback_and_failed_rows():
    records = [*H100_FLUX1, record("gguf-q8_0-compile", 6.0, 12.6, 0.9996, 46.0, outcome=FAILED)]
    decisions = decision.decide(records, SETTINGS)

    text = decision.markdown(decisions, SETTINGS)

    assert decision.RULE in text
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "recommended" in row["**`flux1-dev[fp8-scaled-compile]`**"]
    assert "fallback GEMM" in row["`flux1-dev[nvfp4]`"]
    assert "failed asserts" in row["`flux1-dev[gguf-q8_0-compile]`"]
    assert "| 20.0 |" in row["**`flux1-dev[fp8-scaled-compile]`**"]  # compile seconds


def test_the_scatter_plot_is_a_png(tmp_path):
    d = only(decision.decide(H100_FLUX1, SETTINGS))

    decision.scatter(tmp_path / "plot.png", d, SETTINGS)

    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG" and image.width > 600


def test_the_settings_file_in_fixtures_loads_and_bad_ones_name_the_file(tmp_path):
    settings = decision.Settings.from_file(decision.DEFAULT_FILE, vram_budget_gib=24)
    assert settings.price(GPU) > 0 and settings.price("some-new-gpu") == settings.gpu_hour_usd["default"]
    assert settings.floor("flux1-dev")["min_ms_ssim"] > 0

    bad = tmp_path / "decision.toml"
    bad.write_text("[gpu_hour_usd]\ndefault = 'cheap'\n")
    with pytest.raises(FixtureError, match=rf"^{bad}: needs \[gpu_hour_usd\]"):
        decision.Settings.from_file(bad)
    bad.write_text("[gpu_hour_usd\n")
    with pytest.raises(FixtureError, match="malformed TOML"):
        decision.Settings.from_file(bad)
    with pytest.raises(FixtureError, match="--vram-budget-gib -1"):
        decision.Settings.from_file(decision.DEFAULT_FILE, vram_budget_gib=-1)


def test_the_report_from_history_alone_has_the_decision_and_takes_bf16_from_an_earlier_run(tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    earlier = replace(H100_FLUX1[0], run_id="r1")
    compiled = [r for r in H100_FLUX1 if r.runtime == "compile"]
    for run_id, records in (("r1", [earlier]), ("r2", compiled)):
        (history / f"{run_id}.json").write_text(json.dumps(Run(run_id, {}, tuple(records)).to_json()))

    written = publish.write_report(history, tmp_path / "report", tmp_path / "baselines", decision_settings=SETTINGS)

    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "### Which precision to ship" in summary
    assert "BF16 eager reference from an earlier run: 5.500 it/s" in summary
    assert "**`flux1-dev[fp8-scaled-compile]`** at 9.70 it/s" in summary
    assert tmp_path / "report" / "decision" / f"{GPU}.flux1-dev.png" in written


def test_a_repository_without_its_own_settings_file_uses_the_packaged_one(tmp_path, monkeypatch):
    from fluxgate import defaults

    monkeypatch.chdir(tmp_path)  # no fixtures/decision.toml here
    assert defaults.input_file("decision", tmp_path) == decision.DEFAULT_FILE
    assert decision.load(defaults.input_file("decision", tmp_path), missing_ok=True).gpu_hour_usd["default"] > 0
    own = tmp_path / "fixtures" / "decision.toml"
    own.parent.mkdir()
    own.write_text(decision.DEFAULT_FILE.read_text())
    assert defaults.input_file("decision", tmp_path) == own  # the repository's own file wins
    with pytest.warns(UserWarning, match="no 'which precision to ship' section"):
        assert decision.load(tmp_path / "absent.toml", missing_ok=True) is None
    with pytest.raises(FixtureError, match="decision settings not found"):
        decision.load(tmp_path / "mine.toml")


def test_a_combo_that_regressed_against_history_in_this_run_is_never_recommended():
    d = only(decision.decide(H100_FLUX1, SETTINGS, regressed={"flux1-dev[fp8-scaled-compile]"}))
    assert d.recommended.combo == "flux1-dev[bf16-compile]"
    regressed = next(r for r in d.rows if r.combo == "flux1-dev[fp8-scaled-compile]")
    assert not regressed.passed and "regression against history in this run" in regressed.failures


def test_the_summary_headline_says_whether_the_run_passed_the_gate():
    run = [record("bf16", 5.5, 22.7, 1.0, None), record("nvfp4", 2.3, 7.3, 0.985, 31.0)]
    assert publish.gate_headline(run, set()) == "**Gate: passed**"
    # every combo inside its limits, yet a confirmed regression against history: the gate failed
    assert publish.gate_headline(run, {"flux1-dev[nvfp4]"}) == "**Gate: FAILED** (1 regressed against history)"
    judged = Record(combo="flux1-dev[nvfp4]", run_id="r2", outcome=PASSED,
                    history_verdict=HistoryVerdict("regression", remeasured=True, gating=True))
    advisory = replace(judged, combo="flux1-dev[bf16]", history_verdict=HistoryVerdict("regression", gating=False))
    assert publish.regressions([*run, judged, advisory], "r2") == {"flux1-dev[nvfp4]"}
    failed = [record("bf16", 5.5, 22.7, 1.0, None, outcome=FAILED)]
    assert publish.gate_headline(failed, set()) == "**Gate: FAILED** (1 missed a limit)"
    assert publish.gate_headline([], set()) == "**Gate: FAILED** (nothing was measured)"
    # an A/B candidate: SLOW against the base is said as such, apart from a fixed limit it missed
    slow = ABVerdict("SLOW", 1.05, message="SLOW: ...", image_outcome="SAME")
    ab_slow = replace(failed[0], ab=slow, failures=["SLOW: ..."])
    assert publish.gate_headline([ab_slow], set()) == "**Gate: FAILED** (1 SLOW against the base (A/B))"
    both = replace(ab_slow, failures=["SLOW: ...", "speed 1.2 it/s < min_it_s 1.5"])
    assert publish.gate_headline([both], set()) == "**Gate: FAILED** (1 SLOW against the base (A/B), 1 missed a limit)"


def test_each_precisions_fastest_path_is_named_against_bf16_of_its_own_runtime():
    d = only(decision.decide(H100_FLUX1, SETTINGS))
    table = "\n".join(decision.served_paths(d))
    assert "| fp8-scaled | 8bit | `flux1-dev[fp8-scaled-compile]` (compile, diffusers) | 9.700 | 1.28 |" in table
    assert "| nvfp4 | 4bit | `flux1-dev[nvfp4]` (eager, diffusers) | 2.300 | 0.42 |" in table
    assert "| bf16 | reference | `flux1-dev[bf16-compile]` (compile, diffusers) | 7.600 | 1.00 |" in table


def test_a_compiled_combo_without_a_compiled_bf16_says_what_it_is_compared_with():
    records = [r for r in H100_FLUX1 if r.combo != "flux1-dev[bf16-compile]"]
    d = only(decision.decide(records, SETTINGS))
    fp8 = next(r for r in d.rows if r.combo == "flux1-dev[fp8-scaled-compile]")
    assert decision._speedup_text(fp8) == "1.76 (vs `bf16`: no compile BF16)"
    assert "(vs `bf16`: no compile BF16)" in decision.markdown([d], SETTINGS)
