"""Broken-image tripwire: cheap checks that name a broken image before any similarity number is read.

A similarity score says "MS-SSIM 0.31"; these say why: the denoising loop ended with non-finite latents (NaN weights,
an overflow: the VAE then draws black or garbage), the image is constant, near-black or half black, a channel is
saturated or is noise while the others still match the BF16 reference, or the image has lost the reference's structure
(zeroed blocks, swapped nibbles: it correlates with its reference far less than any working precision does), down to
being no closer to it than seeded uniform noise is.

Each limit is a file-level constant, calibrated on the tiny models' real images, on the committed reference images,
and on images broken on purpose through the real pipelines (tests/injectors/broken_weights.py); the measured values
are in tests/test_tripwire_calibration.py. Every check is numpy on one image: ~0.1 s for 1024x1024 on one CPU core.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

# constant image: per-channel standard deviation (0..255) under which an image is one flat colour. Broken: NaN latents
# decode to all-zero pixels (std 0.0). Healthy: the committed references and tiny images have a channel std >= 39.
CONSTANT_STD = 2.0
# near-black image: mean and 99th percentile (0..255) of a black frame with specks. Healthy images: mean >= 125.
NEAR_BLACK_MEAN, NEAR_BLACK_P99 = 12.0, 32.0
# half-black image: the image cut into TILES x TILES tiles; a tile whose every value is <= BLACK_TILE_MAX is flat black
# (what a kernel that wrote only part of its output, or a zeroed image buffer, leaves). Broken (half-black kind): 50 %
# of tiles. Healthy: 0 % on every committed reference and tiny image (their darkest tile's max is >= 147).
TILES = 32
BLACK_TILE_MAX = 4.0
HALF_BLACK_SHARE = 0.25
# saturated channel: share of a channel's non-black pixels stuck at 0 or 255. Healthy: <= 4 % on every committed
# reference and tiny image (a red channel blown out in tests/test_tripwire.py: 100 %).
SATURATED_SHARE = 0.5
# channel noise: Pearson r of one channel against the reference's same channel under CHANNEL_NOISE_MAX_R while the
# other two keep r >= STRUCTURE_MIN_R. Broken (channel-noise kind, one plane uniform noise): r 0.00 vs 0.98-1.00 for
# the others. Healthy: every channel r >= 0.975 (tiny), >= ~0.90 estimated for the worst GPU combo (see below).
CHANNEL_NOISE_MAX_R = 0.3
# structure lost: Pearson r against the BF16 reference per channel (a colour cast alone makes no structure), averaged.
# Healthy, tiny models, every case: nvfp4 0.981-0.994, 8-bit >= 0.998. Healthy on the GPU classes
# (baselines/*/thresholds.toml, PSNR only): the worst combo, z-image-turbo[nvfp4] at 23.6 dB with the references'
# pixel std of 36-38, is r ~= 0.90. Broken, tiny: zeroed blocks 0.58-0.67 (FLUX.1, Kontext, FLUX.2), swapped nibbles
# 0.63-0.70, one plane noise 0.65-0.66, half black 0.26-0.29, NaN 0.0. 0.75 leaves 0.15 under the worst healthy GPU
# combo. Not caught (r 0.82-0.89, too near it): the tiny z-image-turbo's zeroed blocks or swapped nibbles, noise in
# one latent channel.
STRUCTURE_MIN_R = 0.75
# quality collapsed: the image's dissimilarity to its BF16 reference (1 - MS-SSIM) against the same combo's when its
# baseline was made (thresholds.toml measured_ms_ssim). Healthy runs repeat it (the GPU images are deterministic:
# 1.00x on every H200 run of this matrix; a software upgrade that moves quantization error by a fifth is 1.2x).
# Healthy cases of run 20261130T110309Z-27e08d (another H200 than the baseline's): 0.39-1.14x. Broken on purpose on the
# H200 (tests/injectors/broken_weights.py, 2026-11-30), where STRUCTURE_MIN_R does not see it: z-image-turbo
# fp8-scaled with its per-row scales rotated 0.80-0.88 vs 0.975 at baseline (4.9-7.9x), one latent channel of noise
# 0.85-0.87 (5.3-5.8x); nvfp4 with transposed block scales 0.80-0.83 vs 0.877 (1.4-1.6x: 3 of its 4 cases trip).
# Both limits must be passed: the ratio alone would flag an 8-bit combo at 0.999 that moved to 0.9985.
COLLAPSE_RATIO = 1.5
COLLAPSE_MARGIN = 0.05
# no closer than noise: PSNR against the reference must beat uniform noise's (seeded) by this much. A committed
# reference beats it by 2.6-9.5 dB even against another model's reference, a working quantized combo by 10 dB or more.
NOISE_SEED = 0
NOISE_MARGIN_DB = 1.0

NAMES = ("non-finite latents", "non-finite pixels", "constant image", "near-black image", "half-black image",
         "saturated", "channel noise", "structure lost", "quality collapsed",
         "no closer to the BF16 reference than uniform noise is")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@functools.lru_cache(maxsize=2)
def _noise(shape: tuple[int, ...]) -> np.ndarray:
    """Seeded uniform noise of `shape` (0..255), made once per shape: what no image of the model looks like."""
    noise = np.random.default_rng(NOISE_SEED).integers(0, 256, shape).astype(np.float64)
    noise.flags.writeable = False
    return noise


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two same-shape arrays; 0.0 where either is flat (a flat image carries no structure)."""
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / scale) if scale > 0 else 0.0


def black_tile_share(pixels: np.ndarray) -> tuple[float, tuple[int, int] | None]:
    """The share of the image in flat black tiles (TILES x TILES grid, every value <= BLACK_TILE_MAX), and the pixel
    rows those tiles span (None when there are none)."""
    h, w = pixels.shape[:2]
    th, tw = max(h // TILES, 1), max(w // TILES, 1)
    rows, cols = h // th, w // tw
    tiles = pixels[:rows * th, :cols * tw].reshape(rows, th, cols, tw, 3).max(axis=(1, 3, 4))
    black = tiles <= BLACK_TILE_MAX
    if not black.any():
        return 0.0, None
    tile_rows = np.nonzero(black.any(axis=1))[0]
    return float(black.mean()), (int(tile_rows[0]) * th, int(tile_rows[-1] + 1) * th - 1)


def check(image: Image.Image, reference: Image.Image | None = None, nonfinite_latents: int = 0, *,
          nonfinite_pixels: int = 0, ms_ssim: float | None = None,
          baseline_ms_ssim: float | None = None) -> list[str]:
    """One line per tripped check of `image` (RGB, any size), [] for an image that looks like an image. Each line
    starts with its check's name (NAMES) and a colon, except the last check's, which is its name.

    `reference`: the BF16 image of the same model, prompt, seed and size (None for the reference itself): for the
    checks against it (channel noise, structure lost, no closer than noise). `nonfinite_latents`: how many NaN/Inf
    values the final latents held; `nonfinite_pixels`: how many the decoded image held before it became 8-bit (a PIL
    image cannot hold them: NaN turns into 0, so black). `ms_ssim`: the image's MS-SSIM against `reference`, and
    `baseline_ms_ssim` the combo's when its baseline was made: with both, the quality-collapsed check (COLLAPSE_RATIO,
    COLLAPSE_MARGIN)."""
    problems = []
    if nonfinite_latents:
        problems.append(f"non-finite latents: {nonfinite_latents} NaN/Inf values after the last step")
    if nonfinite_pixels:
        problems.append(f"non-finite pixels: {nonfinite_pixels} NaN/Inf values in the decoded image")
    pixels = _rgb(image)
    flat = pixels.reshape(-1, 3)
    std = flat.std(axis=0)
    whole_image = True
    if float(std.max()) < CONSTANT_STD:
        mean = flat.mean(axis=0)
        problems.append(f"constant image: every pixel ≈ RGB({mean[0]:.0f}, {mean[1]:.0f}, {mean[2]:.0f})")
    elif float(flat.mean()) < NEAR_BLACK_MEAN and float(np.percentile(flat, 99)) < NEAR_BLACK_P99:
        problems.append(f"near-black image: mean {flat.mean():.1f}/255, 99th percentile "
                        f"{np.percentile(flat, 99):.0f}/255")
    else:
        whole_image = False
        share, rows = black_tile_share(pixels)
        if share >= HALF_BLACK_SHARE:
            problems.append(f"half-black image: {share:.0%} of the image is flat black (every value <= "
                            f"{BLACK_TILE_MAX:.0f}/255), in rows {rows[0]}-{rows[1]} of {pixels.shape[0]}")
    if not whole_image:  # a black or flat frame is named above; black pixels are no channel's saturation
        lit = flat[flat.max(axis=1) > BLACK_TILE_MAX]
        stuck = ((lit == 0) | (lit == 255)).mean(axis=0) if len(lit) else np.zeros(3)
        for channel, share in zip("RGB", stuck):
            if share > SATURATED_SHARE:
                problems.append(f"saturated {channel} channel: {share:.0%} of its non-black pixels at 0 or 255")
    if reference is None or reference.size != image.size:
        return problems
    ref = _rgb(reference)
    if not whole_image:
        per_channel = [_pearson(pixels[..., c], ref[..., c]) for c in range(3)]
        noisy = [c for c in range(3) if per_channel[c] < CHANNEL_NOISE_MAX_R]
        if len(noisy) == 1 and min(r for c, r in enumerate(per_channel) if c not in noisy) >= STRUCTURE_MIN_R:
            shown = ", ".join(f"{'RGB'[c]} r={r:.2f}" for c, r in enumerate(per_channel))
            problems.append(f"channel noise: the {'RGB'[noisy[0]]} channel is uncorrelated with the BF16 reference's "
                            f"while the others match ({shown})")
        r = float(np.mean(per_channel))
        if r < STRUCTURE_MIN_R:
            problems.append(f"structure lost: pixels correlate r={r:.2f} with the BF16 reference (< {STRUCTURE_MIN_R}; "
                            "working precisions >= 0.90): zeroed or misread weights, or a broken kernel")
    if ms_ssim is not None and baseline_ms_ssim is not None and not any(p.startswith("structure lost") for p in problems):
        now, then = 1.0 - ms_ssim, max(0.0, 1.0 - baseline_ms_ssim)
        if now > max(COLLAPSE_RATIO * then, then + COLLAPSE_MARGIN):
            times = f"{now / then:.1f}x" if then > 0 else "from identical"
            problems.append(f"quality collapsed: MS-SSIM {ms_ssim:.4f} against the BF16 reference, {baseline_ms_ssim:.4f} "
                            f"when this combo's baseline was made (1 - MS-SSIM {times}, limit {COLLAPSE_RATIO}x and "
                            f"+{COLLAPSE_MARGIN}): misread weights or scales, or a broken kernel")
    noise = _noise(pixels.shape)
    to_reference, noise_to_reference = _psnr_db(pixels, ref), _psnr_db(noise, ref)
    if to_reference <= noise_to_reference + NOISE_MARGIN_DB:
        problems.append(f"no closer to the BF16 reference than uniform noise is (PSNR {to_reference:.1f} dB, "
                        f"noise {noise_to_reference:.1f} dB): a misread checkpoint or a broken kernel")
    return problems
