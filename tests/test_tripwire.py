"""The broken-image tripwire: every real image of the committed baselines passes it; images broken on purpose trip
it with a line that names the failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxgate.judging import tripwire

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
REAL = sorted(BASELINES.glob("*/*.png"))


@pytest.mark.parametrize("path", REAL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_committed_reference_image_passes_against_itself_and_its_neighbours(path):
    image = Image.open(path).convert("RGB")
    assert tripwire.check(image, image) == []
    for other in path.parent.glob("*.png"):
        assert tripwire.check(image, Image.open(other).convert("RGB")) == [], other


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
    reference = Image.open(BASELINES / "cpu" / "z-image-turbo.png").convert("RGB")
    problems = tripwire.check(broken(kind), reference)
    assert any(problem.startswith(names) for problem in problems), problems


def test_non_finite_latents_are_named_first():
    image = Image.open(BASELINES / "cpu" / "flux1-dev.png").convert("RGB")
    assert tripwire.check(image, None, nonfinite_latents=12) == [
        "non-finite latents: 12 NaN/Inf values after the last step"]
