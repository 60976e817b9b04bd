"""Broken-image tripwire: cheap checks that name a broken image before any similarity number is read.

A similarity score says "0.31 MS-SSIM"; these say why: the denoising loop ended with non-finite latents (NaN weights,
an overflow: the VAE then draws black or garbage), the image is constant or near-black, a channel is saturated, or
the image is no closer to its BF16 reference than seeded uniform noise is (a misread checkpoint: swapped nibbles, scales in the
wrong layout). Each check's limit is far from any image a working combo makes: calibrated in tests/test_tripwire.py
on the tiny models' real images and on images broken on purpose, none of which may pass.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CONSTANT_STD = 2.0  # per-channel standard deviation (0..255) under which an image is one flat colour
NEAR_BLACK_MEAN, NEAR_BLACK_P99 = 12.0, 32.0  # mean and 99th percentile (0..255) of a black frame with specks
SATURATED_SHARE = 0.5  # share of a channel's pixels stuck at 0 or 255
NOISE_SEED = 0
NOISE_MARGIN_DB = 1.0  # an image this close to uniform noise's PSNR against the reference carries nothing of it


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check(image: Image.Image, reference: Image.Image | None = None, nonfinite_latents: int = 0) -> list[str]:
    """One line per tripped check of `image` (RGB, any size), [] for an image that looks like an image.

    `reference`: the BF16 image of the same model and size, for the noise check: the image's PSNR against it must
    beat uniform noise's by NOISE_MARGIN_DB (a committed reference image beats it by 2.6-9.5 dB even against another
    model's reference, a working quantized combo by 10 dB or more). `nonfinite_latents`: how many NaN/Inf values the
    final latents held."""
    problems = []
    if nonfinite_latents:
        problems.append(f"non-finite latents: {nonfinite_latents} NaN/Inf values after the last step")
    pixels = _rgb(image)
    std = pixels.reshape(-1, 3).std(axis=0)
    if float(std.max()) < CONSTANT_STD:
        mean = pixels.reshape(-1, 3).mean(axis=0)
        problems.append(f"constant image: every pixel ≈ RGB({mean[0]:.0f}, {mean[1]:.0f}, {mean[2]:.0f})")
    elif float(pixels.mean()) < NEAR_BLACK_MEAN and float(np.percentile(pixels, 99)) < NEAR_BLACK_P99:
        problems.append(f"near-black image: mean {pixels.mean():.1f}/255, 99th percentile "
                        f"{np.percentile(pixels, 99):.0f}/255")
    stuck = ((pixels == 0) | (pixels == 255)).reshape(-1, 3).mean(axis=0)
    for channel, share in zip("RGB", stuck):
        if share > SATURATED_SHARE:
            problems.append(f"saturated {channel} channel: {share:.0%} of pixels at 0 or 255")
    if reference is not None and reference.size == image.size:
        ref = _rgb(reference)
        noise = np.random.default_rng(NOISE_SEED).integers(0, 256, pixels.shape).astype(np.float64)
        to_reference, noise_to_reference = _psnr_db(pixels, ref), _psnr_db(noise, ref)
        if to_reference <= noise_to_reference + NOISE_MARGIN_DB:
            problems.append(f"no closer to the BF16 reference than uniform noise is (PSNR {to_reference:.1f} dB, "
                            f"noise {noise_to_reference:.1f} dB): a misread checkpoint or a broken kernel")
    return problems
