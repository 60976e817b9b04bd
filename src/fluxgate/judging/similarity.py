"""Image similarity against the BF16 reference: MS-SSIM (primary) and PSNR (secondary), from torchmetrics.

Images are compared as RGB uint8 arrays on the 0..255 scale. MS-SSIM needs at least 176 px on the short side
(five scales of an 11 px window: torchmetrics requires side // 16 > 10); PSNR is in dB and infinite for identical images, stored as None in JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


def _as_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 3, H, W]` on the 0..255 scale."""
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def compare(candidate: Image.Image, reference: Image.Image, device: torch.device | str | None = None) -> Similarity:
    """MS-SSIM and PSNR of `candidate` against `reference`; both must have the same size. Raises ValueError for
    sizes that differ or a side under MIN_SIDE_PX.

    On a CUDA `device` the arithmetic is float64 there (milliseconds at 1024 px); elsewhere float32 on the CPU
    (float64 convolutions take ~20 s per 1024 px pair on a 2-core CPU, float32 ~3 s; the two agree to ~1e-7 MS-SSIM).
    Identical images score exactly 1 (and PSNR infinity) either way."""
    if candidate.size != reference.size:
        raise ValueError(f"image sizes differ: candidate {candidate.size}, reference {reference.size}")
    if min(candidate.size) < MIN_SIDE_PX:
        raise ValueError(f"MS-SSIM needs images of at least {MIN_SIDE_PX} px on the short side, got {candidate.size}")
    device = torch.device(device or "cpu")
    dtype = torch.float64 if device.type == "cuda" else torch.float32
    cand, ref = _as_tensor(candidate, device, dtype), _as_tensor(reference, device, dtype)
    with torch.inference_mode():
        ms_ssim = multiscale_structural_similarity_index_measure(cand, ref, data_range=255.0)
        psnr = peak_signal_noise_ratio(cand, ref, data_range=255.0)
    return Similarity(ms_ssim=float(ms_ssim), psnr_db=float(psnr))


CONFIDENCE = 0.90  # one-sided confidence of the bound a combo's cases are summarised with


@dataclass(frozen=True)
class Summary:
    """A combo's similarity over its cases: the lower confidence bounds it is judged on, and its worst case."""

    ms_ssim: float  # one-sided CONFIDENCE lower bound of the mean MS-SSIM over the cases
    psnr_db: float  # PSNR at the upper bound of the mean squared error (math.inf: every case identical)
    cases: int
    worst_case: str  # the case with the lowest MS-SSIM
    worst_ms_ssim: float
    worst_psnr_db: float = math.inf  # the lowest PSNR of any case
    worst_psnr_case: str = ""  # its case
    judged_by_worst: bool = False  # ms_ssim / psnr_db are the worst case's, not the bound (`worst`)

    def to_json(self) -> dict:
        return {"ms_ssim": self.ms_ssim, "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,
                "ms_ssim_worst": self.worst_ms_ssim, "worst_case": self.worst_case}

    def worst(self) -> "Summary":
        """This summary judged by its worst case instead of the bound: for a run that makes fewer cases than its
        baseline's limits were derived over (the bound of fewer cases is wider, and would fail unchanged images)."""
        return replace(self, ms_ssim=self.worst_ms_ssim, psnr_db=self.worst_psnr_db, judged_by_worst=True)

    @property
    def how(self) -> str:
        """How the MS-SSIM was summarised, for a failure line."""
        return self._how(self.worst_case, f"{self.worst_ms_ssim:.4f}")

    @property
    def how_psnr(self) -> str:
        """How the PSNR was summarised, for a failure line (the worst case by MS-SSIM, with its PSNR)."""
        return self._how(self.worst_psnr_case or self.worst_case, f"{self.worst_psnr_db:.2f} dB")

    def _how(self, case: str, value: str) -> str:
        if self.cases == 1:
            return f"1 case: {case}"
        if self.judged_by_worst:
            return f"worst of {self.cases} cases: {case}, fewer than the baseline's"
        return f"{CONFIDENCE:.0%} lower bound over {self.cases} cases; worst {case} {value}"


def _upper_mean(values: np.ndarray, confidence: float) -> float:
    """One-sided upper confidence bound of the mean of `values` (Student's t; the value itself for one)."""
    from scipy import stats

    if len(values) < 2 or float(values.std()) == 0.0:
        return float(values.mean())
    return float(values.mean() + stats.t.ppf(confidence, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def summarise(pairs: dict[str, Similarity], confidence: float = CONFIDENCE) -> Summary:
    """The cases of one combo (case name -> its Similarity against that case's reference) as one Summary.

    MS-SSIM: the mean's one-sided lower bound (1 - the upper bound of the mean dissimilarity), so one case cannot
    carry a combo by luck and a spread of cases costs margin. PSNR: from the upper bound of the mean squared error
    (MSE / 255^2 = 10^(-PSNR/10); identical images add 0), so PSNR's dB scale is averaged where errors add.
    Raises ValueError for no cases."""
    if not pairs:
        raise ValueError("summarise: no cases")
    names = list(pairs)
    dissimilarity = np.array([1.0 - pairs[name].ms_ssim for name in names])
    mse = np.array([0.0 if math.isinf(pairs[name].psnr_db) else 10 ** (-pairs[name].psnr_db / 10) for name in names])
    worst = min(names, key=lambda name: pairs[name].ms_ssim)
    low = min(names, key=lambda name: pairs[name].psnr_db)
    mse_bound = _upper_mean(mse, confidence)
    return Summary(ms_ssim=1.0 - _upper_mean(dissimilarity, confidence),
                   psnr_db=math.inf if mse_bound <= 0 else -10 * math.log10(mse_bound), cases=len(names),
                   worst_case=worst, worst_ms_ssim=pairs[worst].ms_ssim,
                   worst_psnr_db=pairs[low].psnr_db, worst_psnr_case=low)
