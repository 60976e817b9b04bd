"""The models of the matrix: one `ModelSpec` per model. Adding a model is one entry in `MODELS`.

Each model's builder module (`flux1.py`, `flux2.py`, ...) exposes `PIPELINE_CLASS`, `TRANSFORMER_CLASS`,
`TINY_TRANSFORMER_CONFIG` and `tiny_components(seed)`: the real diffusers classes at toy size.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunSettings:
    """How one image is made: steps, guidance, square size in pixels, extra pipeline kwargs."""

    steps: int
    guidance_scale: float
    size_px: int
    extra: dict[str, Any] = field(default_factory=dict)
    # Timed images per combo: their steps are pooled. The tiny profile's steps take milliseconds, so one image
    # is too few samples for a stable it/s on a shared CPU.
    timed_images: int = 1


@dataclass(frozen=True)
class ModelSpec:
    """A model of the matrix and how to build, quantize and run it."""

    name: str
    builder: str  # module under fluxgate.models
    quantized_blocks: tuple[str, ...]  # state-dict prefixes whose linear layers real quantized checkpoints quantize
    gguf_arch: str  # general.architecture written into GGUF files, as community converters do
    tiny: RunSettings
    full: RunSettings  # the synthetic and real profiles: the model's own defaults at 1024 px
    # Random init leaves the AdaLN gates near 0.05, so the blocks barely touch the image and even zeroed blocks
    # would pass a similarity check. Scaling the modulation linears (a power of two: exact in bf16) gives O(1)
    # gates as in a trained model: zeroing the blocks then drops MS-SSIM to ~0.65-0.9, 5 % weight noise to ~0.995.
    tiny_modulation: tuple[str, float] = ("", 1.0)  # (regex on linear module names, weight gain)
    needs_input_image: bool = False

    @property
    def marker(self) -> str:
        return self.name.replace("-", "_").replace(".", "_")

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"fluxgate.models.{self.builder}")

    def tiny_transformer(self, seed: int) -> "torch.nn.Module":
        """The tiny transformer with seeded random weights (float32, CPU), modulation gain applied."""
        import torch

        torch.manual_seed(seed)
        transformer = self.module.TRANSFORMER_CLASS(**self.module.TINY_TRANSFORMER_CONFIG)
        pattern, gain = self.tiny_modulation
        with torch.no_grad():
            for name, module in transformer.named_modules():
                if pattern and isinstance(module, torch.nn.Linear) and re.search(pattern, name):
                    module.weight.mul_(gain)
        return transformer

    def settings(self, profile: str) -> RunSettings:
        return self.tiny if profile == "tiny" else self.full


# Tiny profile: 256 px (MS-SSIM needs >= 176), 8 steps, three timed images per combo.
_TINY = {"steps": 8, "size_px": 256, "timed_images": 3}
_FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_FLUX1_MODULATION = (r"(norm1|norm1_context|norm)\.linear$", 32.0)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="flux1-dev",
            builder="flux1",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            tiny_modulation=_FLUX1_MODULATION,
            tiny=RunSettings(**_TINY, guidance_scale=3.5, extra={"max_sequence_length": 32}),
            full=RunSettings(steps=28, guidance_scale=3.5, size_px=1024),
        ),
        ModelSpec(
            name="flux1-kontext-dev",
            builder="flux1_kontext",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            tiny_modulation=_FLUX1_MODULATION,
            # Without max_area/_auto_resize the pipeline renders ~1 MP whatever height/width say.
            tiny=RunSettings(**_TINY, guidance_scale=2.5,
                             extra={"max_sequence_length": 32, "max_area": 256 * 256, "_auto_resize": False}),
            full=RunSettings(steps=28, guidance_scale=2.5, size_px=1024,
                             extra={"max_area": 1024 * 1024, "_auto_resize": False}),
            needs_input_image=True,
        ),
        ModelSpec(
            name="flux2-dev",
            builder="flux2",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",  # city96 and ComfyUI-GGUF write FLUX.2 as arch "flux" (ComfyUI-GGUF knows no "flux2")
            tiny_modulation=(r"modulation", 32.0),  # FLUX.2 shares three modulation linears across blocks
            tiny=RunSettings(**_TINY, guidance_scale=4.0, extra={"max_sequence_length": 64}),
            full=RunSettings(steps=50, guidance_scale=4.0, size_px=1024),
        ),
        ModelSpec(
            name="z-image-turbo",
            builder="zimage",
            quantized_blocks=("layers.", "noise_refiner.", "context_refiner."),
            gguf_arch="lumina2",
            tiny_modulation=(r"adaLN_modulation", 4.0),
            tiny=RunSettings(**_TINY, guidance_scale=0.0, extra={"max_sequence_length": 32}),
            full=RunSettings(steps=9, guidance_scale=0.0, size_px=1024),
        ),
    )
}
