"""The broken-image tripwire calibrated through the real pipelines: the tiny models on the CPU, every combo healthy and
broken on purpose by tests/injectors/broken_weights.py (the same code `pytest perf -p broken_weights` runs). Every
healthy image passes; every broken one trips with its own kind's line, not merely a low similarity.

Measured here (tiny profile, 256 px, 8 steps, weight seed 0, torch 2.13 CPU; healthy: every case, broken: the first
case; r: the tripwire's per-channel Pearson r against the case's BF16 image, averaged; MS-SSIM / PSNR: fluxgate's):

| images                                         | MS-SSIM     | PSNR dB   | r           | tripwire lines                     |
|------------------------------------------------|-------------|-----------|-------------|------------------------------------|
| healthy fp8-scaled / gguf-q8_0, 4 models x 3   | 0.998-1.000 | 39.9-48.5 | 0.998-1.000 | none                               |
| healthy nvfp4, 4 models x 3 cases              | 0.984-0.995 | 29.9-35.4 | 0.981-0.994 | none                               |
| (GPU baselines' worst: z-image-turbo[nvfp4])   | 0.9155      | 23.6      | ~0.90 est.  | -                                  |
| nan, 7 combos (every precision)                | 0.037-0.042 | 5.5-5.7   | 0.0         | non-finite latents, constant, noise|
| zeroed-blocks, FLUX.1 / Kontext / FLUX.2       | 0.632-0.693 | 16.8-17.5 | 0.581-0.665 | structure lost                     |
| swapped-nibbles, FLUX.1 / Kontext / FLUX.2     | 0.680-0.739 | 17.3-17.9 | 0.626-0.698 | structure lost                     |
| scale-layout gguf-q8_0 (scale after codes)     | 0.037-0.039 | 5.5-5.6   | 0.0         | non-finite latents, constant, noise|
| half-black, 4 models                           | 0.458-0.465 | 8.5-8.7   | 0.260-0.294 | half-black (50 %), structure, noise|
| channel-noise (R plane uniform noise), 4       | 0.680-0.693 | 14.1-14.4 | 0.654-0.662 | channel noise (R r=0.00, G/B>=0.98), structure lost |
| zeroed-blocks, z-image-turbo                   | 0.912       | 22.8      | 0.894       | quality collapsed (vs 0.995)       |
| swapped-nibbles, z-image-turbo[nvfp4]          | 0.901       | 22.4      | 0.882       | quality collapsed (vs 0.995)       |
| latent-noise (one latent channel noise)        | 0.835       | 20.2      | 0.820       | quality collapsed (vs 0.989)       |
| KNOWN GAPS (xfail, strict):                    |             |           |             |                                    |
| scale-layout fp8-scaled (rows' scales rotated) | 0.998       | 39.6      | 0.998       | none: the image is not broken      |
| scale-layout nvfp4 (block scales transposed)   | 0.989       | 31.5      | 0.987       | none: the image is not broken      |

The gaps: seeded random tiny weights have rows and blocks of one magnitude, so a permutation of their scales changes
next to nothing (the fp8 one passes even the similarity limit). On the H200's synthetic weights the same two
breakages fall to MS-SSIM 0.80-0.88 and are named `quality collapsed` (README, "Image quality"). The tiny
z-image-turbo's blocks make only ~10 % of its image (zeroing them all leaves r 0.905): under STRUCTURE_MIN_R, but far
beyond its own MS-SSIM at baseline.
"""

from __future__ import annotations

import os
import re
import tomllib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults_support import INPUTS, ROOT, SHARED_CACHE, copy_baselines
from PIL import Image

from fluxgate.judging import similarity, tripwire
from fluxgate.matrix import Combo
from fluxgate.measuring.runner import Runner
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights.tiny import TinySource

INJECTORS = Path(__file__).resolve().parent / "injectors"
sys.path.insert(0, str(INJECTORS))
import broken_weights

NAN = "non-finite latents"
STRUCTURE = "structure lost"
COLLAPSED = "quality collapsed"
THRESHOLDS = tomllib.loads((ROOT / "baselines" / "cpu" / "thresholds.toml").read_text())
# (combo, kind) -> the line the tripwire must give. Weight kinds on every precision they apply to for one model and on
# nvfp4 (or gguf) for the others; image kinds on nvfp4 (the healthy image farthest from its reference) of every model.
BROKEN = [
    *[(f"flux1-dev[{p}]", "nan", NAN) for p in PRECISIONS],
    *[(f"{m}[nvfp4]", "nan", NAN) for m in ("flux1-kontext-dev", "flux2-dev", "z-image-turbo")],
    *[(f"{m}[{p}]", "zeroed-blocks", STRUCTURE) for m in ("flux1-dev", "flux1-kontext-dev", "flux2-dev")
      for p in ("bf16", "nvfp4")],
    *[(f"{m}[nvfp4]", "swapped-nibbles", STRUCTURE) for m in ("flux1-dev", "flux1-kontext-dev", "flux2-dev")],
    *[(f"{m}[gguf-q8_0]", "scale-layout", NAN) for m in ("flux1-dev", "z-image-turbo")],
    *[(f"{m}[nvfp4]", "half-black", "half-black image") for m in MODELS],
    *[(f"{m}[nvfp4]", "channel-noise", "channel noise") for m in MODELS],
    # Under STRUCTURE_MIN_R's radar, named by the quality-collapsed check (against the combo's MS-SSIM at baseline)
    ("z-image-turbo[nvfp4]", "zeroed-blocks", COLLAPSED),
    ("z-image-turbo[nvfp4]", "swapped-nibbles", COLLAPSED),
    ("flux1-dev[nvfp4]", "latent-noise", COLLAPSED),
]
GAP = "on seeded random tiny weights this breakage stays within a healthy GPU combo's distance (module docstring)"
KNOWN_GAPS = [
    ("flux1-dev[fp8-scaled]", "scale-layout", STRUCTURE),
    ("flux1-dev[nvfp4]", "scale-layout", STRUCTURE),
]


def gate_check(combo_id: str, image: Image.Image, reference: Image.Image, nonfinite: int) -> list[str]:
    """The tripwire as the gate calls it: the case's BF16 reference image, the case's MS-SSIM against it and the
    combo's MS-SSIM when the cpu baseline was made."""
    combo = Combo.parse(combo_id)
    baseline = THRESHOLDS[combo.model][combo.variant].get("measured_ms_ssim")
    return tripwire.check(image, reference, nonfinite,
                          ms_ssim=similarity.compare(image, reference).ms_ssim, baseline_ms_ssim=baseline)


class Images:
    """Each (combo, kind)'s timed images through `Runner.loaded`, made once per module (no warm-up, no timing
    repeats): a healthy combo's one per case of the tiny profile (`cases`), as the gate makes them; a broken combo's
    of the first case only (time: every breakage hits every case alike). Each as (case name, image, non-finite
    latent values)."""

    def __init__(self, runner: Runner):
        self.runner, self.made = runner, {}

    def get(self, combo_id: str, kind: str | None = None) -> list[tuple[str, Image.Image, int]]:
        if (combo_id, kind) not in self.made:
            combo = Combo.parse(combo_id)
            held = self.runner.loaded(combo)
            with broken_weights._Broken(held, combo, kind) if kind else held as entered:
                result = entered.images(1 if kind else len(entered.cases))
            self.made[combo_id, kind] = list(zip(result.case_names, result.case_images, result.case_nonfinite))
        return self.made[combo_id, kind]

    def reference(self, model: str, case: str) -> Image.Image:
        return {name: image for name, image, _ in self.get(f"{model}[bf16]")}[case]


@pytest.fixture(scope="module")
def images():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is as fast and leaves the other core alone
    try:
        yield Images(Runner("tiny", torch.device("cpu"), TinySource(SHARED_CACHE, INPUTS.seed), INPUTS,
                            warmup_steps=0))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("combo_id", [Combo(m, p).id for m in MODELS for p in PRECISIONS])
def test_every_healthy_tiny_combo_passes(images, combo_id):
    combo = Combo.parse(combo_id)
    for case, image, nonfinite in images.get(combo_id):
        assert gate_check(combo_id, image, images.reference(combo.model, case), nonfinite) == [], case


def _trips(images, combo_id: str, kind: str, name: str) -> list[str]:
    ((case, image, nonfinite),) = images.get(combo_id, kind)
    problems = gate_check(combo_id, image, images.reference(Combo.parse(combo_id).model, case), nonfinite)
    assert any(problem.startswith(name) for problem in problems), problems
    return problems


@pytest.mark.parametrize("combo_id, kind, name", BROKEN, ids=[f"{c}-{k}" for c, k, _ in BROKEN])
def test_every_broken_image_trips_with_its_own_line(images, combo_id, kind, name):
    problems = _trips(images, combo_id, kind, name)
    assert all(problem.startswith(tripwire.NAMES) for problem in problems), problems


@pytest.mark.xfail(strict=True, reason=GAP)
@pytest.mark.parametrize("combo_id, kind, name", KNOWN_GAPS, ids=[f"{c}-{k}" for c, k, _ in KNOWN_GAPS])
def test_known_gaps_of_the_tiny_fixtures(images, combo_id, kind, name):
    _trips(images, combo_id, kind, name)


def test_the_injector_refuses_what_a_format_cannot_have():
    assert "only nvfp4 has nibbles" in broken_weights.refusal(Combo("flux1-dev", "gguf-q8_0"), "swapped-nibbles")
    assert "stores no scales" in broken_weights.refusal(Combo("flux1-dev", "bf16"), "scale-layout")
    assert "choose one of" in broken_weights.refusal(Combo("flux1-dev", "bf16"), "bitflip")
    assert broken_weights.refusal(Combo("flux2-dev", "nvfp4"), "swapped-nibbles") is None


def _perf(tmp_path: Path, combo: str, kind: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLUXGATE_BREAK_COMBO": combo, "FLUXGATE_BREAK_KIND": kind,
           "PYTHONPATH": os.pathsep.join([str(INJECTORS), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "perf", "-q", "-p", "broken_weights", "-p", "no:warnings",
               "--device", "cpu", "--cpu-threads", "1", "--history-dir", str(tmp_path / "history"),
               "--fixture-cache", str(SHARED_CACHE), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.subprocess
def test_a_whole_perf_run_breaks_exactly_the_named_combo(tmp_path):
    done = _perf(tmp_path, "flux1-dev[nvfp4]", "swapped-nibbles", "--baselines-dir", str(copy_baselines(tmp_path)),
                 "--models", "flux1-dev", "--precisions", "bf16,nvfp4", "--history-gate", "off")
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert [line.split(" ")[1] for line in failed] == ["perf/test_matrix.py::flux1-dev[nvfp4]"], done.stdout[-3000:]
    assert "broken image: case fox: structure lost: pixels correlate" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("combo, kind, says", [
    ("flux1-dev[fp8-scaled]", "swapped-nibbles", "only nvfp4 has nibbles to swap"),
    ("flux1-dev[nvfp4", "nan", "not a combo id like flux1-dev[nvfp4]"),
    ("flux1-dev[nvfp4]", "", "needs FLUXGATE_BREAK_COMBO=<combo id> and FLUXGATE_BREAK_KIND="),
])
def test_a_breakage_the_combo_cannot_have_is_a_usage_error(monkeypatch, combo, kind, says):
    monkeypatch.setenv("FLUXGATE_BREAK_COMBO", combo)
    monkeypatch.setenv("FLUXGATE_BREAK_KIND", kind)
    with pytest.raises(pytest.UsageError, match=re.escape(says)):  # pytest's exit code 4, before any combo runs
        broken_weights.pytest_configure(None)
