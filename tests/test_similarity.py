"""fluxgate.judging.similarity.compare: MS-SSIM and PSNR of a candidate image against its reference."""

import math

import numpy as np
import pytest
from PIL import Image

from fluxgate.judging.similarity import MIN_SIDE_PX, compare

SIDE_PX = 176  # the smallest side torchmetrics scores with 5 scales of an 11 px window


def _reference() -> Image.Image:
    """A structured RGB image: gradients plus seeded texture, so structure and noise are distinguishable."""
    y, x = np.mgrid[0:SIDE_PX, 0:SIDE_PX]
    texture = np.random.default_rng(0).integers(0, 40, (SIDE_PX, SIDE_PX))
    rgb = np.stack([x * 255 / SIDE_PX, y * 255 / SIDE_PX, (x + y) % 64 * 3 + texture], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _noisy(image: Image.Image, sigma: float) -> Image.Image:
    noise = np.random.default_rng(1).normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def test_identical_images_score_ms_ssim_one_and_infinite_psnr_stored_as_null():
    reference = _reference()
    similarity = compare(reference.copy(), reference)
    assert similarity.ms_ssim == 1.0
    assert math.isinf(similarity.psnr_db)
    assert similarity.to_json() == {"ms_ssim": 1.0, "psnr_db": None}


def test_more_noise_scores_strictly_lower_on_both_metrics():
    reference = _reference()
    scores = [compare(_noisy(reference, sigma), reference) for sigma in (2, 10, 40)]
    assert scores[0].ms_ssim > scores[1].ms_ssim > scores[2].ms_ssim
    assert scores[0].psnr_db > scores[1].psnr_db > scores[2].psnr_db
    assert scores[0].to_json()["psnr_db"] == scores[0].psnr_db  # finite PSNR is stored as is


def test_slightly_perturbed_image_scores_above_a_clearly_different_one():
    reference = _reference()
    perturbed = compare(_noisy(reference, 3), reference)
    different = compare(reference.transpose(Image.Transpose.ROTATE_90), reference)
    assert perturbed.ms_ssim > 0.95 > different.ms_ssim
    assert perturbed.psnr_db > different.psnr_db


def test_size_mismatch_raises_naming_both_sizes():
    reference = _reference()
    with pytest.raises(ValueError, match=r"candidate \(200, 176\), reference \(176, 176\)"):
        compare(Image.new("RGB", (200, 176)), reference)


def test_image_too_small_for_ms_ssim_raises_naming_its_size_and_the_minimum():
    small = Image.new("RGB", (MIN_SIDE_PX - 1, 300))
    with pytest.raises(ValueError, match=rf"at least {MIN_SIDE_PX} px.*\({MIN_SIDE_PX - 1}, 300\)"):
        compare(small, small.copy())


def test_smallest_image_that_passes_the_size_check_is_scored():
    image = _reference().crop((0, 0, MIN_SIDE_PX, MIN_SIDE_PX))
    assert compare(image, image.copy()).ms_ssim == 1.0
