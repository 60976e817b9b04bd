"""Image similarity against the BF16 reference: MS-SSIM (primary) and PSNR (secondary), from torchmetrics.

Images are compared as RGB uint8 arrays on the 0..255 scale. MS-SSIM needs at least 176 px on the short side
(five scales of an 11 px window: torchmetrics requires side // 16 > 10); PSNR is in dB and infinite for identical images, stored as None in JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure, peak_signal_noise_ratio

MIN_SIDE_PX = 176


@dataclass(frozen=True)
class Similarity:
    """How close a candidate image is to its reference."""

    ms_ssim: float  # 1.0 = identical
    psnr_db: float  # math.inf = identical

    def to_json(self) -> dict:
        return {"ms_ssim": self.ms_ssim, "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db}


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """`[1, 3, H, W]` float64 on the 0..255 scale (float64 so identical images score exactly 1)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def compare(candidate: Image.Image, reference: Image.Image) -> Similarity:
    """MS-SSIM and PSNR of `candidate` against `reference`; both must have the same size."""
    if candidate.size != reference.size:
        raise ValueError(f"image sizes differ: candidate {candidate.size}, reference {reference.size}")
    if min(candidate.size) < MIN_SIDE_PX:
        raise ValueError(f"MS-SSIM needs images of at least {MIN_SIDE_PX} px on the short side, got {candidate.size}")
    cand, ref = _as_tensor(candidate), _as_tensor(reference)
    ms_ssim = multiscale_structural_similarity_index_measure(cand, ref, data_range=255.0)
    psnr = peak_signal_noise_ratio(cand, ref, data_range=255.0)
    return Similarity(ms_ssim=float(ms_ssim), psnr_db=float(psnr))
