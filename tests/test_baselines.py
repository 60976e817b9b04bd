"""fluxgate.judging.baselines: thresholds, reference images and provenance written by `nox -s baselines`, loaded by the gate;
every broken or stale input is a BaselineError naming the file."""

import numpy as np
import pytest
from PIL import Image

from fluxgate.errors import BaselineError
from fluxgate.judging import baselines
from fluxgate.judging.baselines import Measured, Thresholds
from fluxgate.matrix import Combo

SETTINGS = {"profile": "tiny", "seed": 0, "steps": 4, "size_px": 256, "guidance_scale": 3.5,
            "cases": [{"name": "fox", "prompt": "a red fox", "seed": 0}]}
BF16, NVFP4 = Combo("flux1-dev", "bf16"), Combo("flux1-dev", "nvfp4")
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _write(root, measured=(Measured(BF16, 2.0, 1.0, 1.0, None), Measured(NVFP4, 4.0, 0.5, 0.99, 30.0))):
    folder, _ = baselines.write(root, "cpu", list(measured), {"flux1-dev": {"fox": IMAGE}}, {"models": {"flux1-dev": SETTINGS}})
    return folder


def test_written_baseline_loads_back_as_margin_and_tier_limits(tmp_path):
    _write(tmp_path)
    speed, memory = baselines.DEFAULT_MARGINS["cpu"]["speed"], baselines.DEFAULT_MARGINS["cpu"]["memory"]
    for combo, it_s, mem_gib, tier, ms_ssim in ((BF16, 2.0, 1.0, "reference", 1.0), (NVFP4, 4.0, 0.5, "4bit", 0.99)):
        floors = baselines.DEFAULT_SIMILARITY[tier]
        assert baselines.load(tmp_path, "cpu", combo, SETTINGS).thresholds == Thresholds(
            it_s * (1 - speed), mem_gib * (1 + memory), floors["min_ms_ssim"], floors["min_psnr_db"],
            measured_ms_ssim=ms_ssim)


def test_the_thresholds_file_names_the_command_that_wrote_it_in_any_repository(tmp_path):
    first_line = (_write(tmp_path) / "thresholds.toml").read_text().splitlines()[0]
    assert first_line == "# fluxgate thresholds for GPU class 'cpu', written by `pytest --write-baselines`."


def test_written_reference_image_loads_back_pixel_identical(tmp_path):
    _write(tmp_path)
    reference = baselines.load(tmp_path, "cpu", BF16, SETTINGS).reference("fox")
    assert np.array_equal(np.asarray(reference), np.asarray(IMAGE))


def test_rewriting_one_combo_keeps_the_other_combos_limits(tmp_path):
    _write(tmp_path)
    _write(tmp_path, [Measured(BF16, 10.0, 1.0, 1.0, None)])
    keep = 1 - baselines.DEFAULT_MARGINS["cpu"]["speed"]
    assert baselines.load(tmp_path, "cpu", BF16, SETTINGS).thresholds.min_it_s == pytest.approx(10.0 * keep)
    assert baselines.load(tmp_path, "cpu", NVFP4, SETTINGS).thresholds.min_it_s == pytest.approx(4.0 * keep)


def test_baseline_made_with_another_seed_is_stale_naming_provenance_and_the_change(tmp_path):
    folder = _write(tmp_path)
    with pytest.raises(BaselineError, match=r"seed 0 -> 1") as error:
        baselines.load(tmp_path, "cpu", BF16, {**SETTINGS, "seed": 1})
    assert str(folder / baselines.PROVENANCE_FILE) in str(error.value)


def test_malformed_thresholds_toml_names_the_file(tmp_path):
    folder = _write(tmp_path)
    (folder / baselines.THRESHOLDS_FILE).write_text('["flux1-dev".bf16\nmin_it_s = ')
    with pytest.raises(BaselineError, match="malformed TOML") as error:
        baselines.load(tmp_path, "cpu", BF16, SETTINGS)
    assert str(folder / baselines.THRESHOLDS_FILE) in str(error.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", '"fast"', "true"])
def test_a_limit_that_is_not_a_finite_number_is_refused_naming_it(tmp_path, value):
    """Issue 27: `min_it_s = nan` made every speed comparison false, switching the check off; now the file and key."""
    import re

    folder = _write(tmp_path)
    path = folder / baselines.THRESHOLDS_FILE
    path.write_text(re.sub(r"^min_it_s = .+$", f"min_it_s = {value}", path.read_text(), count=1, flags=re.M))
    with pytest.raises(BaselineError, match=r'\["flux1-dev"\."bf16"\] needs finite numeric .*min_it_s = ') as error:
        baselines.load(tmp_path, "cpu", BF16, SETTINGS)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_missing_combo_entry_names_the_file_and_the_key(tmp_path):
    folder = _write(tmp_path)
    with pytest.raises(BaselineError, match=r'no entry \["flux1-dev"\."gguf-q8_0"\]') as error:
        baselines.load(tmp_path, "cpu", Combo("flux1-dev", "gguf-q8_0"), SETTINGS)
    assert str(folder / baselines.THRESHOLDS_FILE) in str(error.value)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda path: path.unlink(), "missing"),
    (lambda path: path.write_bytes(b"not a png"), "unreadable"),
    (lambda path: path.write_bytes(path.read_bytes()[:200]), "unreadable"),  # truncated PNG
], ids=["missing", "garbage", "truncated"])
def test_missing_or_broken_reference_image_names_the_image(tmp_path, damage, says):
    _write(tmp_path)
    baseline = baselines.load(tmp_path, "cpu", BF16, SETTINGS)
    path = baselines.reference_path(baseline.folder, "flux1-dev", "fox")
    damage(path)
    with pytest.raises(BaselineError, match=says) as error:
        baseline.reference("fox")
    assert str(path) in str(error.value)


def test_similarity_already_below_its_tier_is_floored_at_the_measurement_less_the_margin(tmp_path):
    _, below = baselines.write(tmp_path, "cpu", [Measured(NVFP4, 4.0, 0.5, 0.9, 20.0)], {"flux1-dev": {"fox": IMAGE}},
                               {"models": {"flux1-dev": SETTINGS}})

    margins = baselines.DEFAULT_MARGINS["cpu"]
    thresholds = baselines.load(tmp_path, "cpu", NVFP4, SETTINGS).thresholds
    assert below == ["flux1-dev[nvfp4]"]
    assert thresholds.min_ms_ssim == pytest.approx(0.9 - margins["ms_ssim"])
    assert thresholds.min_psnr_db == pytest.approx(20.0 - margins["psnr_db"])


def test_writing_compiled_combos_against_the_stored_image_keeps_the_run_that_made_the_image(tmp_path):
    import json
    from types import SimpleNamespace

    from fluxgate.gate import Gate
    from fluxgate.storing.local import LocalFolderStore

    baselines.write(tmp_path, "cpu", [Measured(BF16, 2.0, 1.0, 1.0, None)], {"flux1-dev": {"fox": IMAGE}},
                    {"runs": {"run1": {}}, "models": {"flux1-dev": {**SETTINGS, "run_id": "run1"}}})
    compiled = Combo("flux1-dev", "bf16", "compile")
    gate = Gate(SimpleNamespace(settings=lambda spec: SETTINGS), tmp_path, "cpu",
                LocalFolderStore(tmp_path / "history").open_run("run2", {}), write=True)
    gate.measured = {compiled: Measured(compiled, 3.0, 1.0, 0.9999, 50.0)}

    gate.write_baselines()

    provenance = json.loads((tmp_path / "cpu" / baselines.PROVENANCE_FILE).read_text())
    assert provenance["models"]["flux1-dev"]["run_id"] == "run1"  # the image is still run1's
    assert provenance["runs"]["run2"]["combos"] == ["flux1-dev[bf16-compile]"]
    assert baselines.load(tmp_path, "cpu", compiled, SETTINGS).thresholds.min_it_s == pytest.approx(
        3.0 * (1 - baselines.DEFAULT_MARGINS["cpu"]["speed"]))


def test_a_models_reference_images_are_replaced_as_a_set(tmp_path):
    folder = _write(tmp_path)
    (folder / "flux1-dev.png").write_bytes(b"the one image of fluxgate 0.1")
    baselines.write(tmp_path, "cpu", [Measured(BF16, 2.0, 1.0, 1.0, None)],
                    {"flux1-dev": {"harbour": IMAGE, "sign": IMAGE}}, {"models": {"flux1-dev": SETTINGS}})
    assert sorted(p.name for p in (folder / "flux1-dev").iterdir()) == ["harbour.png", "sign.png"]
    assert not (folder / "flux1-dev.png").exists()


def test_a_baseline_made_with_other_cases_is_stale_naming_the_change(tmp_path):
    _write(tmp_path)
    other = {**SETTINGS, "cases": [{"name": "fox", "prompt": "a red fox", "seed": 7}]}
    with pytest.raises(BaselineError, match=r"stale baseline for flux1-dev .*cases"):
        baselines.load(tmp_path, "cpu", BF16, other)


def test_a_baseline_made_with_more_cases_serves_a_run_that_makes_the_first_of_them(tmp_path):
    more = {**SETTINGS, "cases": SETTINGS["cases"] + [{"name": "harbour", "prompt": "a harbour", "seed": 1}]}
    baselines.write(tmp_path, "cpu", [Measured(BF16, 2.0, 1.0, 1.0, None)], {"flux1-dev": {"fox": IMAGE}},
                    {"models": {"flux1-dev": more}})
    baselines.load(tmp_path, "cpu", BF16, SETTINGS)  # fox is the stored set's first case: fresh
    with pytest.raises(BaselineError, match=r"cases fox, harbour -> harbour"):
        baselines.load(tmp_path, "cpu", BF16, {**SETTINGS, "cases": more["cases"][1:]})


def test_references_at_other_steps_keep_their_similarity_limits_and_take_the_class_speed_and_memory(tmp_path):
    """The PR pass: references made at the blocks' steps (their own folder, one run's limits) judged with the
    class's speed and memory limits, and a missed one names the class's file."""
    from fluxgate import gate
    from fluxgate.judging import similarity
    from fluxgate.measuring.measure import Measurement

    short = {**SETTINGS, "steps": 2}
    baselines.write(tmp_path / "class", "cpu", [Measured(NVFP4, 4.0, 0.5, 0.99, 30.0)], {}, {"models": {}})
    baselines.write(tmp_path / "pr", "cpu", [Measured(NVFP4, 40.0, 5.0, 0.95, 20.0)], {"flux1-dev": {"fox": IMAGE}},
                    {"models": {"flux1-dev": short}})
    own = baselines.load(tmp_path / "pr", "cpu", NVFP4, short)
    judged = baselines.with_class_limits(own, tmp_path / "class", "cpu", NVFP4)
    limits = baselines.read_thresholds(tmp_path / "class", "cpu", NVFP4)  # no references there: not needed
    assert (judged.thresholds.min_it_s, judged.thresholds.max_peak_mem_gib) == (limits.min_it_s, limits.max_peak_mem_gib)
    assert (judged.thresholds.min_ms_ssim, judged.thresholds.measured_ms_ssim) == (own.thresholds.min_ms_ssim, 0.95)
    assert judged.reference_dir == own.reference_dir and judged.limits_file == tmp_path / "class/cpu/thresholds.toml"
    slow = Measurement(step_times_s=[2.0] * 4, e2e_s=5.0, peak_mem_gib=9.0, mem_kind="rss", peak_reserved_gib=None,
                       image=IMAGE)
    failures = gate.limit_failures(slow, similarity.Summary(1.0, 60.0, 1, "fox", 1.0), judged, "[x]")
    assert len(failures) == 2 and all(str(judged.limits_file) in line for line in failures)
