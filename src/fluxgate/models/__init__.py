"""The models of the matrix: one `ModelSpec` per model. Adding a model is one entry in `MODELS`.

Each model's builder module (`flux1.py`, `flux2.py`, ...) exposes `PIPELINE_CLASS`, `TRANSFORMER_CLASS`,
`TINY_TRANSFORMER_CONFIG` and `tiny_components(seed)`: the real diffusers classes at toy size.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """How one image is made: steps, guidance, square size in pixels, extra pipeline kwargs."""

    steps: int
    guidance_scale: float
    size_px: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A model of the matrix and how to build, quantize and run it."""

    name: str
    builder: str  # module under fluxgate.models
    quantized_blocks: tuple[str, ...]  # state-dict prefixes whose linear layers real quantized checkpoints quantize
    gguf_arch: str  # general.architecture written into GGUF files, as community converters do
    tiny: RunSettings
    needs_input_image: bool = False

    @property
    def marker(self) -> str:
        return self.name.replace("-", "_").replace(".", "_")

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"fluxgate.models.{self.builder}")

    def settings(self, profile: str) -> RunSettings:
        if profile == "tiny":
            return self.tiny
        raise ValueError(f"--profile {profile}: not available for {self.name} yet (only 'tiny')")


_FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="flux1-dev",
            builder="flux1",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            tiny=RunSettings(steps=4, guidance_scale=3.5, size_px=256, extra={"max_sequence_length": 32}),
        ),
        ModelSpec(
            name="flux1-kontext-dev",
            builder="flux1_kontext",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            # Without max_area/_auto_resize the pipeline renders ~1 MP whatever height/width say.
            tiny=RunSettings(steps=4, guidance_scale=2.5, size_px=256,
                             extra={"max_sequence_length": 32, "max_area": 256 * 256, "_auto_resize": False}),
            needs_input_image=True,
        ),
        ModelSpec(
            name="flux2-dev",
            builder="flux2",
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux2",
            tiny=RunSettings(steps=4, guidance_scale=4.0, size_px=256, extra={"max_sequence_length": 32}),
        ),
        ModelSpec(
            name="z-image-turbo",
            builder="zimage",
            quantized_blocks=("layers.", "noise_refiner.", "context_refiner."),
            gguf_arch="lumina2",
            tiny=RunSettings(steps=4, guidance_scale=0.0, size_px=256, extra={"max_sequence_length": 32}),
        ),
    )
}
