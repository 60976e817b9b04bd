"""fluxgate.judging.noise: the BF16 noise floor per model and the similarity limits derived from it and the tier."""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxgate.judging import noise
from fluxgate.judging.baselines import DEFAULT_SIMILARITY
from fluxgate.storing.local import load_paths
from fluxgate.storing.record import ERROR, FAILED, PASSED, Metrics, Record

H200 = Path(__file__).resolve().parents[1] / "baselines" / "nvidia-h200"
TABLE = {"margins": {"ms_ssim": 0.005, "psnr_db": 1.0}, "similarity": DEFAULT_SIMILARITY}


def record(combo: str, run: str = "r1", gpu: str = "GPU-1", ms_ssim: float = 1.0, psnr_db: float | None = None,
           cases: list | None = None, outcome: str = PASSED, gpu_class: str = "nvidia-h200", **env) -> Record:
    from fluxgate.matrix import Combo

    c = Combo.parse(combo)
    extra = {"cases": cases} if cases is not None else {}
    return Record(combo=combo, model=c.model, precision=c.precision, runtime=c.runtime, profile="synthetic",
                  gpu_class=gpu_class, settings={"seed": 0, "steps": 28}, run_id=run, outcome=outcome,
                  environment={"gpu": {"uuid": gpu}, **env},
                  metrics=Metrics(ms_ssim=ms_ssim, psnr_db=psnr_db, broken_image=[], extra=extra))


def case(name: str, ms_ssim: float, psnr_db: float | None, seed: int = 0, broken=()) -> dict:
    return {"case": name, "seed": seed, "ms_ssim": ms_ssim, "psnr_db": psnr_db, "broken_image": list(broken)}


def test_cases_come_from_the_cases_list_the_extra_key_or_the_single_image():
    single = record("flux1-dev[bf16]", ms_ssim=0.9991, psnr_db=50.0)
    (only,) = noise.cases(single)
    assert (only.case, only.seed, only.ms_ssim, only.psnr_db) == (noise.DEFAULT_CASE, 0, 0.9991, 50.0)
    listed = record("flux1-dev[bf16]", cases=[case("fox", 1.0, None), case("city", 0.998, 44.0, seed=7)])
    assert [(c.case, c.seed, c.psnr_db) for c in noise.cases(listed)] == [("fox", 0, None), ("city", 7, 44.0)]
    as_attribute = replace(single, metrics=SimpleNamespace(cases=[SimpleNamespace(**case("a", 0.99, 30.0))],
                                                           extra={}, ms_ssim=0.99, psnr_db=30.0))
    assert noise.cases(as_attribute)[0].ms_ssim == 0.99
    assert noise.cases(replace(single, metrics=Metrics())) == []
    if "cases" in {f.name for f in fields(Metrics)}:  # the field, once record.py has it
        field = replace(single, metrics=Metrics(ms_ssim=0.99, cases=[case("a", 0.995, 40.0), case("b", 0.99, 30.0)]))
        assert [c.case for c in noise.cases(field)] == ["a", "b"]
        assert [c.case for c in noise.judged(field)] == ["a", "b", noise.SUMMARY_CASE]
    identical = noise.Case("x", 0, 1.0, None)
    assert identical.mse == 0 and identical.dissimilarity == 0
    assert noise.Case("x", 0, 0.99, 30.0).mse == pytest.approx(1e-3)


def test_identical_bf16_images_leave_the_tier_floors_as_they_are():
    runs = [record("flux1-dev[bf16]", run=r, gpu=g) for r, g in (("a", "GPU-1"), ("b", "GPU-2"))]
    runs += [record("flux1-dev[fp8-scaled]", run="a", ms_ssim=0.998, psnr_db=40.0)]
    floors = noise.derive_floors(runs, "nvidia-h200")
    assert floors["flux1-dev"].d_noise == 0 and floors["flux1-dev"].mse_noise == 0
    assert "every case identical" in floors["flux1-dev"].derivation
    limits = noise.derive_limits(floors, TABLE, runs, "nvidia-h200")
    assert (limits["flux1-dev[bf16]"].min_ms_ssim, limits["flux1-dev[bf16]"].min_psnr_db) == (0.999, 45.0)
    assert (limits["flux1-dev[fp8-scaled]"].min_ms_ssim, limits["flux1-dev[fp8-scaled]"].min_psnr_db) == (0.995, 36.0)
    assert not limits["flux1-dev[fp8-scaled]"].below_tier


def test_a_noisy_bf16_record_widens_the_floor_and_every_limit_of_its_model():
    quiet = [record("flux1-dev[bf16]", run=r, gpu=g) for r, g in (("a", "GPU-1"), ("b", "GPU-2"))]
    noisy = quiet + [record("flux1-dev[bf16-compile]", run="b", gpu="GPU-2",
                            cases=[case("fox", 1.0, None), case("city", 0.998, 42.0)], ms_ssim=0.998, psnr_db=42.0)]
    floor = noise.derive_floors(noisy, "nvidia-h200")["flux1-dev"]
    assert floor.d_noise == pytest.approx(0.002) and floor.mse_noise == pytest.approx(10 ** -4.2)
    assert floor.runtimes == ("compile", "eager") and floor.cases == 4 and "case city" in floor.worst
    limits = noise.derive_limits({"flux1-dev": floor}, TABLE, noisy, "nvidia-h200")
    fp8 = noise.derive_limits({"flux1-dev": floor}, {**TABLE, "flux1-dev": {"fp8-scaled": {}}}, noisy,
                              "nvidia-h200")["flux1-dev[fp8-scaled]"]
    assert fp8.min_ms_ssim == pytest.approx(1 - (0.005 + noise.K * 0.002))  # 0.989
    assert fp8.min_psnr_db == pytest.approx(-10 * math.log10(10 ** -3.6 + noise.K * 10 ** -4.2), abs=1e-3)
    assert limits["flux1-dev[bf16]"].min_ms_ssim == pytest.approx(0.993)
    assert limits["flux1-dev[bf16-compile]"].min_ms_ssim == pytest.approx(0.993)
    quiet_limit = noise.derive_limits(noise.derive_floors(quiet, "nvidia-h200"), TABLE, quiet, "nvidia-h200")
    assert quiet_limit["flux1-dev[bf16]"].min_ms_ssim > limits["flux1-dev[bf16]"].min_ms_ssim
    assert "3 x d_noise 0.002000" in limits["flux1-dev[bf16]"].derivation


def test_every_bf16_record_the_floor_came_from_meets_its_combos_limit():
    rng = random.Random(19)
    runs = []
    for i in range(40):
        combo = rng.choice(["flux2-dev[bf16]", "flux2-dev[bf16-compile]"])
        cases = [case(f"c{j}", 1 - rng.uniform(0, 0.004), rng.choice([None, rng.uniform(38, 60)])) for j in range(3)]
        runs.append(record(combo, run=f"r{i % 7}", gpu=f"GPU-{i % 5}", cases=cases,
                           ms_ssim=min(c["ms_ssim"] for c in cases)))
    floors = noise.derive_floors(runs, "nvidia-h200")
    limits = noise.derive_limits(floors, TABLE, runs, "nvidia-h200")
    for r in runs:
        for c in noise.cases(r):
            assert c.ms_ssim >= limits[r.combo].min_ms_ssim, (r.combo, c)
            assert (math.inf if c.psnr_db is None else c.psnr_db) >= limits[r.combo].min_psnr_db, (r.combo, c)


def test_the_committed_h200_runs_give_a_floor_per_model_that_their_bf16_records_meet():
    records = load_paths([H200 / "runs"])
    table = tomllib.loads((H200 / "thresholds.toml").read_text())
    floors = noise.derive_floors(records, "nvidia-h200")
    assert sorted(floors) == ["flux1-dev", "flux1-kontext-dev", "flux2-dev", "z-image-turbo"]
    for model in ("flux1-dev", "flux1-kontext-dev"):  # the baseline run and a gate run on another host: identical
        assert floors[model].records == 2 and floors[model].machines == 2 and floors[model].d_noise == 0.0
    zimage = floors["z-image-turbo"]  # eager on two hosts, compiled on one: compile is the noise
    assert "compile" in zimage.runtimes and 0 < zimage.d_noise < 0.001
    limits = noise.derive_limits(floors, table, records, "nvidia-h200")
    for r in noise.bf16_records(records, "nvidia-h200"):
        if r.combo in limits and r.settings and "cases" in r.settings:
            for c in noise.cases(r):
                assert c.ms_ssim >= limits[r.combo].min_ms_ssim, (r.run_id, r.combo, c)
    assert limits["z-image-turbo[nvfp4]"].below_tier  # synthetic weights: a regression gate, as before
    assert limits["flux1-dev[nvfp4]"].min_ms_ssim == 0.97 and not limits["flux1-dev[nvfp4]"].below_tier
    limits = {c: limit for c, limit in limits.items() if c != "z-image-turbo[bf16-compile]"}  # no entry in the file
    text = noise.apply_text((H200 / "thresholds.toml").read_text(), floors, limits)
    written = tomllib.loads(text)
    assert written["noise_floor"]["flux2-dev"]["psnr_noise_db"] == math.inf
    assert "similarity_derivation" in written["flux2-dev"]["nvfp4"] and written["flux2-dev"]["nvfp4"]["min_it_s"]
    assert text.startswith("# fluxgate thresholds") and text.count("# Similarity limits with") == 1
    assert noise.apply_text(text, floors, limits) == text  # rederiving the same runs changes nothing


def test_below_tier_limits_widen_by_the_noise_floor_when_it_exceeds_the_margin():
    bf16 = [record("z-image-turbo[bf16]", run="a"), record("z-image-turbo[bf16-compile]", run="a", ms_ssim=0.997,
                                                            psnr_db=32.0)]
    nvfp4 = [record("z-image-turbo[nvfp4]", run="a", ms_ssim=0.92, psnr_db=24.0),
             record("z-image-turbo[nvfp4]", run="b", gpu="GPU-2", ms_ssim=0.915, psnr_db=23.5)]
    floors = noise.derive_floors(bf16 + nvfp4, "nvidia-h200")
    limit = noise.derive_limits(floors, TABLE, bf16 + nvfp4, "nvidia-h200")["z-image-turbo[nvfp4]"]
    assert limit.below_tier and limit.min_ms_ssim == pytest.approx(0.915 - noise.K * 0.003)  # K*d_noise > margin
    # 23.5 dB is below the tier's 26 dB widened by the noise (23.56 dB); its MSE plus K x the noise's is below 22.5
    assert limit.min_psnr_db == pytest.approx(-10 * math.log10(10 ** -2.35 + noise.K * 10 ** -3.2), abs=1e-3)
    assert "measured worst 0.915000" in limit.derivation
    # No records of the combo: the measured value in the thresholds file decides
    table = {**TABLE, "z-image-turbo": {"fp8-scaled": {"measured_ms_ssim": 0.98, "measured_psnr_db": 30.0}}}
    stored = noise.derive_limits(floors, table, bf16, "nvidia-h200")["z-image-turbo[fp8-scaled]"]
    assert stored.below_tier and stored.min_ms_ssim == pytest.approx(0.98 - noise.K * 0.003)


def test_refusals_name_the_model_in_one_line():
    only_quantized = [record("flux1-dev[bf16]"), record("flux2-dev[nvfp4]", ms_ssim=0.98, psnr_db=30.0),
                      record("flux2-dev[bf16]", outcome=ERROR)]
    with pytest.raises(ValueError, match=r"^flux2-dev: no bf16 record with similarity on nvidia-h200") as error:
        noise.derive_floors(only_quantized, "nvidia-h200")
    assert "\n" not in str(error.value)
    broken = [record("flux1-dev[bf16]", cases=[case("fox", 0.2, 5.0, broken=["near-black image"])], ms_ssim=0.2)]
    with pytest.raises(ValueError, match=r"flux1-dev: bf16 record of run r1 .*broken image \(near-black image\)"):
        noise.derive_floors(broken, "nvidia-h200")
    other_profile = [record("flux1-dev[bf16]", run="a"), replace(record("flux1-dev[bf16]", run="b"), profile="tiny")]
    with pytest.raises(ValueError, match="flux1-dev: bf16 records of other profiles mixed in"):
        noise.derive_floors(other_profile, "nvidia-h200")
    with pytest.raises(ValueError, match="cpu: no measured records"):
        noise.derive_floors(only_quantized, "cpu")


def test_a_failed_bf16_record_counts_and_a_single_run_says_it_cannot_hold_another_machine():
    one_run = [record("flux1-dev[bf16]", run="a", outcome=FAILED, ms_ssim=0.9995, psnr_db=55.0)]
    floor = noise.derive_floors(one_run, "nvidia-h200")["flux1-dev"]
    assert floor.d_noise == pytest.approx(0.0005) and floor.single_run
    assert "ONE run on one machine: this floor cannot hold another machine of the class" in floor.derivation
    limit = noise.derive_limits({"flux1-dev": floor}, TABLE, one_run, "nvidia-h200")["flux1-dev[bf16]"]
    assert "ONE run" in limit.derivation
    same_host = [record("flux1-dev[bf16]", run="a", gpu="GPU-1"), record("flux1-dev[bf16]", run="b", gpu="GPU-2"),
                 record("flux1-dev[nvfp4]", run="b", gpu="GPU-1", ms_ssim=0.98, psnr_db=30.0)]
    floor = noise.derive_floors(same_host, "nvidia-h200")["flux1-dev"]
    assert floor.machines == 1 and "one machine: this floor cannot hold" in floor.derivation
    cpu = [record("flux1-dev[bf16]", run=r, gpu="", gpu_class="cpu", device_type="cpu", cpu_threads=t)
           for r, t in (("a", 1), ("b", 2))]
    floor = noise.derive_floors(cpu, "cpu")["flux1-dev"]
    assert floor.machines is None and floor.cpu_threads == (1, 2) and "cpu threads 1, 2" in floor.derivation


def test_a_summary_below_its_worst_case_counts_so_the_gate_passes_the_records_the_floor_came_from():
    # Two cases: the summary (the bound over the cases that the gate compares) lies below both of them
    bf16 = [record("flux1-dev[bf16]", run="a"),
            record("flux1-dev[bf16-compile]", run="a", cases=[case("fox", 1.0, None), case("city", 0.999, 50.0)],
                   ms_ssim=0.9975, psnr_db=46.0)]
    floor = noise.derive_floors(bf16, "nvidia-h200")["flux1-dev"]
    assert floor.d_noise == pytest.approx(0.0025) and floor.mse_noise == pytest.approx(10 ** -4.6)
    assert floor.cases == 3 and "case summary" in floor.worst  # two cases + the eager record's one image
    limit = noise.derive_limits({"flux1-dev": floor}, TABLE, bf16, "nvidia-h200")["flux1-dev[bf16-compile]"]
    assert 0.9975 >= limit.min_ms_ssim and 46.0 >= limit.min_psnr_db


def test_a_run_of_fewer_cases_than_the_baseline_counts_toward_its_floor():
    two = [{"name": "fox", "prompt": "p", "seed": 0}, {"name": "harbour", "prompt": "q", "seed": 1}]
    baseline_run = replace(record("flux2-dev[bf16]", run="a"), settings={"steps": 50, "cases": two})
    gate_run = replace(record("flux2-dev[bf16]", run="b", gpu="GPU-2"), settings={"steps": 50, "cases": two[:1]})
    other = replace(record("flux2-dev[bf16]", run="c", gpu="GPU-3", ms_ssim=0.5),
                    settings={"steps": 50, "cases": [{"name": "fox", "prompt": "p", "seed": 9}]})  # another image
    floor = noise.derive_floors([baseline_run, gate_run, other], "nvidia-h200")["flux2-dev"]
    assert floor.records == 1 and floor.run_ids == ("c",)  # the newest (c) made other images: a and b left out
    floor = noise.derive_floors([baseline_run, gate_run], "nvidia-h200")["flux2-dev"]
    assert floor.records == 2 and floor.machines == 2  # b's one case is a's first: the same reference image
