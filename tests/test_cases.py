"""Cases: each model's fixed set of images (fixtures/prompts.toml), read with one-line errors, summarised by a bound,
and judged by their worst case when a run makes fewer cases than its baseline's limits were derived over."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fluxgate import defaults
from fluxgate.errors import FixtureError
from fluxgate.judging.baselines import Baseline, Thresholds
from fluxgate.gate import limit_failures
from fluxgate.judging.similarity import Similarity, summarise
from fluxgate.measuring.measure import Measurement
from fluxgate.measuring.runner import Inputs

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_prompts_file_gives_every_model_its_cases():
    inputs = Inputs.from_file(defaults.PACKAGED["prompts"])
    assert [c.name for c in inputs.cases("flux1-dev")] == ["fox", "harbour", "portrait", "sign"]
    kontext = inputs.cases("flux1-kontext-dev", 2)
    assert [c.name for c in kontext] == ["moon", "snow"] and all(c.image.is_file() for c in kontext)
    assert kontext[0].input_image(64).size == (64, 64)
    assert len(kontext[0].settings()["image_sha256"]) == 16  # the content, not the path, decides staleness
    with pytest.raises(FixtureError, match=r"flux1-kontext-dev has 3 case\(s\), its profile makes 5"):
        inputs.cases("flux1-kontext-dev", 5)


@pytest.mark.parametrize(("text", "says"), [
    ('seed = 0\n[prompts]\ndefault = "a fox"\n', r"the \[prompts\] table of fluxgate 0.1 is replaced by cases"),
    ('seed = 0\n[["flux1-dev"]]\nname = "a"\nprompt = "p"\nseed = 0\n', r"needs \[\[default\]\] cases"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\n[["flux1-kontext"]]\nname = "b"\nprompt = "p"\n'
     'seed = 0\n', r"\[\[flux1-kontext\]\] names no model"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\n', r"case 1 of \[\[default\]\] needs name, prompt and an integer seed"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\n[[default]]\nname = "a"\nprompt = "q"\nseed = 1\n',
     r"\[\[default\]\] names a case twice"),
    ('seed = 0\n[[default]\nname = "a"\n', r"not valid TOML \(.*line 2"),
    ('seed = 0\n[[default]]\nname = "../a"\nprompt = "p"\nseed = 0\n',
     r"case 1 of \[\[default\]\]: name '\.\./a' is not a safe file name"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\nimage = "nowhere.png"\n', "input image .* not found"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\nimage = "bad.png"\n', "is not a readable image"),
    ('seed = inf\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\n', r"needs `seed = <int>`.*seed inf is not an integer"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = 1.5\n', r"integer seed .*seed 1\.5 is not an integer"),
    ('seed = 0\n[[default]]\nname = "a"\nprompt = "p"\nseed = -1\n', r"seed -1 is outside 0 to 2\*\*64 - 1"),
    ('seed = true\n[[default]]\nname = "a"\nprompt = "p"\nseed = 0\n', r"seed True is not an integer"),
])
def test_a_bad_prompts_file_is_one_line_naming_it(tmp_path, text, says):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = tmp_path / "prompts.toml"
    path.write_text(text)
    with pytest.raises(FixtureError, match=says) as error:
        Inputs.from_file(path).check(["flux1-dev"])  # images: checked for the models a run makes
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


@pytest.mark.subprocess
def test_a_bad_prompts_file_stops_the_run_before_any_combo_with_one_line(tmp_path):
    import subprocess
    import sys

    good = (defaults.PACKAGED["prompts"]).read_text()
    typo = tmp_path / "typo.toml"
    typo.write_text(good.replace('[["flux1-kontext-dev"]]', '[["flux1-kontex-dev"]]'))
    missing = tmp_path / "missing.toml"
    missing.write_text(good.replace("inputs/kontext-shapes-1.png", str(defaults.DATA / "inputs" / "nope.png"))
                       .replace('image = "inputs/', f'image = "{defaults.DATA}/inputs/'))
    for prompts, models, says, code in (
            (typo, "z-image-turbo", "[[flux1-kontex-dev]] names no model", 4),
            (missing, "flux1-kontext-dev", "input image", 4),
            (missing, "z-image-turbo", None, 0)):  # a model whose cases need no image runs
        done = subprocess.run([sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider", "--device",
                               "cpu", "--models", models, "--precisions", "bf16", "--prompts", str(prompts),
                               "--history-dir", str(tmp_path / "h"), "--collect-only"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
        if says:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
            assert len(errors) == 1 and says in errors[0] and str(prompts) in errors[0], done.stderr[-2000:]


def test_the_summary_is_a_lower_bound_that_a_spread_of_cases_costs():
    even = summarise({"a": Similarity(0.99, 40.0), "b": Similarity(0.99, 40.0)})
    spread = summarise({"a": Similarity(0.999, 50.0), "b": Similarity(0.981, 30.0)})
    assert even.ms_ssim == pytest.approx(0.99) and even.psnr_db == pytest.approx(40.0)
    assert spread.ms_ssim < 0.981 < even.ms_ssim  # same mean, wider: a lower bound below the worst case
    assert (spread.worst_case, spread.worst_ms_ssim) == ("b", 0.981)
    identical = summarise({"a": Similarity(1.0, math.inf)})
    assert identical.ms_ssim == 1.0 and math.isinf(identical.psnr_db) and identical.how == "1 case: a"


def test_a_run_with_fewer_cases_than_its_baseline_is_judged_by_its_worst_case(tmp_path):
    # z-image-turbo[nvfp4] on the H200 (run 20261130T105458Z-b726a9): its limit came from four cases' bound
    cases = {"fox": Similarity(0.9145, 22.5), "harbour": Similarity(0.8744, 21.8)}
    result = Measurement([0.1] * 8, 1.0, 1.0, "cuda_max_allocated", 1.0, None)
    limits = Thresholds(1.0, 10.0, 0.8694, 21.069)
    two_of_four = Baseline(tmp_path, limits, tmp_path / "z-image-turbo", cases=4)
    assert limit_failures(result, summarise(cases), two_of_four, "e") == []  # unchanged images pass
    assert summarise(cases).ms_ssim < limits.min_ms_ssim  # the two-case bound alone would fail them
    worse = {**cases, "harbour": Similarity(0.86, 21.8)}
    (line,) = limit_failures(result, summarise(worse), two_of_four, "e")
    assert "MS-SSIM 0.8600 (worst of 2 cases: harbour, fewer than the baseline's)" in line
    all_four = Baseline(tmp_path, limits, tmp_path / "z-image-turbo", cases=2)  # as many cases: the bound
    assert "90% lower bound over 2 cases" in limit_failures(result, summarise(cases), all_four, "e")[0]
