"""fluxgate.showing.dashboard: a static site from a history of 12 runs over 2 GPU classes, checked in headless
Chromium (no console error, every chart drawn, a regression two clicks from the overview)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fluxgate.showing import dashboard
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import Metrics, Record
from history_support import judge_like_the_gate

CLASSES = {"nvidia-h200": ("NVIDIA H200", 0.175), "nvidia-h100-80gb-hbm3": ("NVIDIA H100 80GB HBM3", 0.205)}
COMBOS = ("flux1-dev[bf16]", "flux1-dev[nvfp4]")
REGRESSED_AT = 4  # the H200's flux1-dev[nvfp4] is 25 % slower from its fifth run on


def _environment(device_name: str, gpu_class: str, run: int) -> dict:
    return {"torch": "2.11.0+cu130", "diffusers": "0.42.1", "cuda": "13.0", "device_name": device_name,
            "compute_capability": "9.0", "gpu_class": gpu_class, "git_commit": f"{run:02d}" + "c" * 38,
            "git_dirty": False, "gpu": {"uuid": f"GPU-{run % 2}abc", "driver_version": "580", "power_limit_w": 700.0}}


def _history(directory):
    """6 runs per class (12 runs), two combos each; one regression."""
    rng = np.random.default_rng(0)
    store = LocalFolderStore(directory)
    for gpu_class, (device_name, median_s) in CLASSES.items():
        for run in range(6):
            writer = store.open_run(f"2026112{run}T0{len(gpu_class) % 10}0000Z-{gpu_class[7:11]}{run}",
                                    _environment(device_name, gpu_class, run))
            for combo in COMBOS:
                slow = 1.25 if gpu_class == "nvidia-h200" and combo.endswith("[nvfp4]") and run >= REGRESSED_AT else 1
                steps = (median_s * slow * rng.lognormal(0, 0.005, 27)).tolist()
                model, precision = combo.rstrip("]").split("[")
                writer.append(Record(combo, model=model, precision=precision, runtime="eager", profile="synthetic",
                                     gpu_class=gpu_class, settings={"seed": 0, "steps": 28}, outcome="passed",
                                     metrics=Metrics(it_s=1 / float(np.median(steps)), step_times_s=steps,
                                                     peak_mem_gib=24.7 if precision == "bf16" else 8.9,
                                                     mem_kind="cuda_max_allocated", ms_ssim=1.0 - 0.02 * (
                                                         precision == "nvfp4"))))
            judge_like_the_gate(writer)
    return store


def test_every_regression_is_listed_with_its_first_bad_commit(tmp_path):
    store = _history(tmp_path / "history")
    points = dashboard.series(store.load())[("nvidia-h200", "flux1-dev[nvfp4]")]
    ((bad, good),) = dashboard.regressions(points)
    assert bad.commit.startswith(f"{REGRESSED_AT:02d}cc") and good.commit.startswith(f"{REGRESSED_AT - 1:02d}cc")
    assert not dashboard.regressions(dashboard.series(store.load())[("nvidia-h100-80gb-hbm3", "flux1-dev[nvfp4]")])


def test_an_empty_history_is_one_clear_error(tmp_path):
    from fluxgate.showing.publish import PublishError

    with pytest.raises(PublishError, match="no readable history records"):
        dashboard.build(LocalFolderStore(tmp_path / "none"), tmp_path / "site", tmp_path / "baselines")


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("no Chromium on this machine (nox -s tests installs it where it can: apt-get install chromium)")
    return found


def test_the_site_renders_in_headless_chromium_and_a_regression_is_two_clicks_away(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    store = _history(tmp_path / "history")
    index = dashboard.build(store, tmp_path / "site", tmp_path / "baselines")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(index.as_uri())
        assert page.locator("#regressions li").count() == 1
        assert page.locator("table tr").count() == 1 + 2 * len(COMBOS) + 1  # two class tables, headers included
        page.locator("#regressions a").first.click()  # click 1: the regression on the overview
        page.wait_for_selector(".js-plotly-plot .main-svg")
        assert page.locator(".js-plotly-plot").count() == len(dashboard.CHARTS)
        assert page.locator(".js-plotly-plot .scatterlayer .trace").count() == len(dashboard.CHARTS)  # drawn
        first_bad = page.locator("#regression-0")  # the anchor the click lands on: the first bad commit
        assert f"first bad commit {REGRESSED_AT:02d}cc" in first_bad.inner_text()
        page.goto(index.as_uri())
        page.locator("a", has_text="flux1-dev[bf16]").first.click()
        page.wait_for_selector(".js-plotly-plot .main-svg")
        browser.close()
    assert errors == []


PAYLOADS = ("<script>window.__pwned = 1</script>", "<img src=x onerror=\"window.__pwned = 1\">",
            "\"><svg onload=window.__pwned=1>", "[click](javascript:window.__pwned=1)", "</td><script>alert(1)</script>")


def test_hostile_records_run_no_script_on_any_page_of_the_site(tmp_path):
    """Issue 27: every value a record or run file carries (environment, failures, errors, verdict messages, prompts)
    is escaped on every page the dashboard writes, its report included: loaded in headless Chromium, no page runs a
    payload (no dialog, no `window.__pwned`, no script error from one)."""
    from fluxgate.storing.verdicts import HistoryVerdict

    playwright = pytest.importorskip("playwright.sync_api")
    store = _history(tmp_path / "history")
    payload = " ".join(PAYLOADS)
    for run, outcome in ((0, "failed"), (1, "error")):
        environment = {**_environment(payload, "nvidia-h200", 9), "branch": payload, "hostile": payload}
        writer = store.open_run(f"2026113{run}T000000Z-evil0{run}", environment)
        writer.append(Record("flux1-dev[bf16]", model="flux1-dev", precision="bf16", runtime="eager",
                             profile="synthetic", gpu_class="nvidia-h200", outcome=outcome,
                             settings={"seed": 0, "steps": 28, "cases": [{"name": "fox", "prompt": payload,
                                                                          "seed": 0}]},
                             metrics=Metrics(it_s=5.0, step_times_s=[0.2] * 27, peak_mem_gib=24.7, ms_ssim=0.99),
                             failures=[payload], error=payload if outcome == "error" else None,
                             history_verdict=HistoryVerdict("regression", payload)))
    index = dashboard.build(store, tmp_path / "site", tmp_path / "baselines")
    pages = sorted(index.parent.rglob("*.html"))
    assert len(pages) > 3 and any("__pwned" in page.read_text() for page in pages)  # the payloads reached pages
    fired: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.on("dialog", lambda dialog: (fired.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.on("pageerror", lambda error: fired.append(f"page error: {error}"))
        for path in pages:
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            if page.evaluate("() => window.__pwned === 1"):
                fired.append(f"payload ran on {path.relative_to(index.parent)}")
        browser.close()
    assert fired == []
