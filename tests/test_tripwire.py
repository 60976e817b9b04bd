"""The broken-image tripwire: every real image of the committed baselines passes it; images broken on purpose trip
it with a line that names the failure."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxgate.judging import tripwire

pytestmark = pytest.mark.slow  # every committed reference image against noise: ~40 s

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
REAL = sorted([*BASELINES.glob("*/*.png"), *BASELINES.glob("*/*/*.png")])  # flat, or one folder per model


def committed(model: str, gpu_class: str = "cpu") -> Image.Image:
    """A committed reference image of `model` (its first case's, where the baseline has a folder per model)."""
    folder = BASELINES / gpu_class
    path = folder / f"{model}.png" if (folder / f"{model}.png").is_file() else min((folder / model).glob("*.png"))
    return Image.open(path).convert("RGB")


@functools.lru_cache(maxsize=None)
def decoded(path: Path) -> Image.Image:
    """A committed PNG decoded once for the whole module (each is compared with every other of its class)."""
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("path", REAL, ids=lambda p: str(p.relative_to(BASELINES).with_suffix("")))
def test_every_committed_reference_image_passes_and_is_closer_to_any_reference_than_noise(path):
    image = decoded(path)
    assert tripwire.check(image) == []
    assert tripwire.check(image, image) == []
    # Against another model's reference the structure is lost (r ~ 0), but the noise check's limit holds even there:
    # an image the tiny or synthetic models make is closer to any of their references than uniform noise is.
    for other in (p for p in REAL if p.parts[len(BASELINES.parts)] == path.parts[len(BASELINES.parts)]):
        problems = tripwire.check(image, decoded(other))
        assert not [p for p in problems if p.startswith("no closer")], (other, problems)


def broken(kind: str, size=(256, 256)) -> Image.Image:
    rng = np.random.default_rng(1)
    h, w = size
    if kind == "black":  # what a VAE draws from NaN latents
        pixels = np.zeros((h, w, 3))
    elif kind == "specks":
        pixels = np.where(rng.random((h, w, 3)) < 0.005, 200, 3)
    elif kind == "gray":
        pixels = np.full((h, w, 3), 127)
    elif kind == "red":  # one channel blown out
        pixels = rng.integers(60, 200, (h, w, 3))
        pixels[..., 0] = 255
    elif kind == "noise":  # a misread checkpoint's output, as far from the model as it gets
        pixels = rng.integers(0, 256, (h, w, 3))
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("kind, names", [
    ("black", "constant image"), ("specks", "near-black image"), ("gray", "constant image"),
    ("red", "saturated R channel"), ("noise", "no closer to the BF16 reference than uniform noise is"),
])
def test_an_image_broken_on_purpose_trips_with_its_name(kind, names):
    problems = tripwire.check(broken(kind), committed("z-image-turbo"))
    assert any(problem.startswith(names) for problem in problems), problems


def damaged(reference: Image.Image, kind: str) -> Image.Image:
    pixels = np.asarray(reference).copy()
    h = pixels.shape[0]
    if kind == "half-black":
        pixels[h // 2:] = 0
    elif kind == "green-noise":
        pixels[..., 1] = np.random.default_rng(2).integers(0, 256, pixels.shape[:2])
    elif kind == "shuffled":  # every pixel of the reference, none in its place: the structure is gone
        pixels = np.random.default_rng(3).permutation(pixels.reshape(-1, 3)).reshape(pixels.shape)
    elif kind == "a quarter black":
        pixels[: h // 2, : h // 2] = 0
    return Image.fromarray(pixels)


@pytest.mark.parametrize("gpu_class", ["cpu", "nvidia-h200"])
@pytest.mark.parametrize("kind, name, rows", [
    ("half-black", "half-black image: 50% of the image is flat black", "rows {half}-{last} of {h}"),
    ("a quarter black", "half-black image: 25% of the image is flat black", "rows 0-{before} of {h}"),
    ("green-noise", "channel noise: the G channel is uncorrelated with the BF16 reference's", ""),
    ("shuffled", "structure lost: pixels correlate r=0.0", ""),
])
def test_a_damaged_reference_trips_with_its_name(gpu_class, kind, name, rows):
    reference = committed("flux1-dev", gpu_class)
    h = reference.size[1]
    problems = tripwire.check(damaged(reference, kind), reference)
    line = next((problem for problem in problems if problem.startswith(name)), None)
    assert line is not None, problems
    assert rows.format(half=h // 2, last=h - 1, before=h // 2 - 1, h=h) in line
    assert not [problem for problem in problems if problem.startswith("saturated")], problems  # black is no saturation


def test_non_finite_latents_and_pixels_are_named_first():
    image = committed("flux1-dev")
    assert tripwire.check(image, None, nonfinite_latents=12) == [
        "non-finite latents: 12 NaN/Inf values after the last step"]
    assert tripwire.check(image, image, 3, nonfinite_pixels=7) == [
        "non-finite latents: 3 NaN/Inf values after the last step",
        "non-finite pixels: 7 NaN/Inf values in the decoded image"]


def test_every_line_starts_with_a_stable_name():
    reference = committed("flux1-dev")
    lines = [line for kind in ("black", "specks", "red", "noise") for line in tripwire.check(broken(kind), reference)]
    lines += [line for kind in ("half-black", "green-noise", "shuffled")
              for line in tripwire.check(damaged(reference, kind), reference)]
    assert all(line.startswith(tripwire.NAMES) for line in lines), lines
    assert {line.split(":")[0].split(" channel")[0] for line in lines} >= {
        "constant image", "near-black image", "half-black image", "saturated R", "channel noise", "structure lost"}


def test_the_checks_are_cheap_on_a_1024_px_image():
    reference = committed("flux1-dev", "nvidia-h200")
    assert reference.size == (1024, 1024)
    image = damaged(reference, "green-noise")
    started = time.perf_counter()
    for _ in range(3):
        tripwire.check(image, reference, 0)
    assert (time.perf_counter() - started) / 3 < 0.5  # ~0.1 s alone; a loaded shared 2-core machine gets the margin


# Per case on the H200 (MS-SSIM against the case's BF16 image, and the combo's measured_ms_ssim at baseline):
# injected breakages the pixel checks do not see, and healthy cases of a run on another H200.
@pytest.mark.parametrize(("ms_ssim", "baseline", "collapsed"), [
    (0.7991, 0.974559, True),   # z-image-turbo[fp8-scaled], per-row scales rotated (scale-layout), case sign
    (0.8661, 0.974559, True),   # z-image-turbo[fp8-scaled], noise in one latent channel, case harbour
    (0.8026, 0.876965, True),   # z-image-turbo[nvfp4], block scales transposed, case fox
    (0.8277, 0.876965, False),  # the same breakage, case portrait: 1.4x, under the limit (its other cases trip)
    (0.9716, 0.974559, False),  # z-image-turbo[fp8-scaled] healthy, worst case (1.14x)
    (0.9998, 0.999655, False),  # an 8-bit combo whose tiny error doubled: the margin keeps it out
    (0.9400, 1.0, True),        # a BF16 image 0.06 from its own reference
])
def test_quality_collapsed_compares_a_case_with_its_combo_at_baseline(ms_ssim, baseline, collapsed):
    image = Image.open(BASELINES / "cpu" / "z-image-turbo" / "fox.png").convert("RGB")
    problems = tripwire.check(image, image, ms_ssim=ms_ssim, baseline_ms_ssim=baseline)
    assert any(p.startswith("quality collapsed: ") for p in problems) is collapsed, problems
    assert tripwire.check(image, image, ms_ssim=ms_ssim) == []  # no baseline value: no collapse check
