"""The models of the matrix: one `ModelSpec` per model, in `MODELS`. Adding a model is one builder module here (a class
implementing `builder.ModelBuilder`, and its instance `BUILDER`) and its entry in `MODELS`.

Importing this package is cheap: a spec names its builder through a function that imports the builder's module (and
with it torch, diffusers and transformers) the first time `ModelSpec.builder` is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from fluxgate.models.builder import ModelBuilder

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageSettings:
    """How one image is made: steps, guidance, square size in pixels, extra pipeline kwargs."""

    steps: int
    guidance_scale: float
    size_px: int
    extra: dict[str, Any] = field(default_factory=dict)
    # How many of the model's cases (fixtures/prompts.toml) a combo makes: one timed image each, steps pooled, each
    # compared with the BF16 image of its case. Several cases judge quality on more than one image, and more timed
    # steps per combo spend the run on evidence rather than on loading (README, "Where the time goes").
    cases: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """A model of the matrix and how to build, quantize and run it."""

    name: str
    import_builder: Callable[[], ModelBuilder]  # returns the model's builder, importing its module on first use
    quantized_blocks: tuple[str, ...]  # state-dict prefixes whose linear layers real quantized checkpoints quantize
    gguf_arch: str  # general.architecture written into GGUF files, as community converters do
    tiny: ImageSettings
    full: ImageSettings  # the synthetic and real profiles: the model's own defaults at 1024 px
    # Random init leaves the AdaLN gates near 0.05, so the blocks barely touch the image and even zeroed blocks
    # would pass a similarity check. Scaling the modulation linears (a power of two: exact in bf16) gives O(1)
    # gates as in a trained model: zeroing the blocks then drops MS-SSIM to ~0.65-0.9, 5 % weight noise to ~0.995.
    tiny_modulation: tuple[str, float] = ("", 1.0)  # (regex on linear module names, weight gain)
    needs_input_image: bool = False

    @property
    def marker(self) -> str:
        """The pytest marker of its combos: `flux2_dev` for `flux2-dev`."""
        return self.name.replace("-", "_").replace(".", "_")

    @property
    def builder(self) -> ModelBuilder:
        """The model's diffusers classes, configs and components (`builder.ModelBuilder`)."""
        return self.import_builder()

    @property
    def module(self) -> SimpleNamespace:
        """Kept for scripts written against the builder modules of fluxgate 0.1 (e.g. the real-layout cases): the
        builder under its old module-level names `PIPELINE_CLASS`, `TRANSFORMER_CLASS`, `TINY_TRANSFORMER_CONFIG`
        and `tiny_components(seed)`. New code uses `builder`."""
        b = self.builder
        return SimpleNamespace(PIPELINE_CLASS=b.pipeline_class, TRANSFORMER_CLASS=b.transformer_class,
                               TINY_TRANSFORMER_CONFIG=b.tiny_transformer_config, tiny_components=b.tiny_components)

    def tiny_transformer(self, seed: int) -> torch.nn.Module:
        """The tiny transformer with seeded random weights (float32, CPU), modulation gain applied. Seeds torch's global
        RNG with `seed`."""
        import torch

        torch.manual_seed(seed)
        transformer = self.builder.transformer_class(**self.builder.tiny_transformer_config)
        pattern, gain = self.tiny_modulation
        with torch.no_grad():
            for name, module in transformer.named_modules():
                if pattern and isinstance(module, torch.nn.Linear) and re.search(pattern, name):
                    module.weight.mul_(gain)
        return transformer

    def meta_transformer(self, config: dict | None = None) -> torch.nn.Module:
        """The transformer's module tree at `config` (default: the full size) on the meta device, taking no memory:
        its keys, shapes and config."""
        import torch

        with torch.device("meta"):
            return self.builder.transformer_class(**(config or self.builder.full_transformer_config))

    def quantized_linear_keys(self, transformer: torch.nn.Module, block_size: int) -> set[str]:
        """Weight keys of the `torch.nn.Linear` layers of `transformer` under `quantized_blocks` whose in_features
        `block_size` divides, as real quantized checkpoints choose them: embedders, final layers and norms stay in high
        precision."""
        import torch

        return {f"{name}.weight" for name, module in transformer.named_modules()
                if isinstance(module, torch.nn.Linear) and name.startswith(self.quantized_blocks)
                and module.in_features % block_size == 0}

    def settings(self, profile: str) -> ImageSettings:
        """The tiny profile's settings, or the full ones (synthetic and real profiles)."""
        return self.tiny if profile == "tiny" else self.full


def _flux1_dev() -> ModelBuilder:
    from fluxgate.models.flux1 import BUILDER

    return BUILDER


def _flux1_kontext_dev() -> ModelBuilder:
    from fluxgate.models.flux1_kontext import BUILDER

    return BUILDER


def _flux2_dev() -> ModelBuilder:
    from fluxgate.models.flux2 import BUILDER

    return BUILDER


def _z_image_turbo() -> ModelBuilder:
    from fluxgate.models.zimage import BUILDER

    return BUILDER


# Tiny profile: 256 px (MS-SSIM needs >= 176), 8 steps, three cases per combo.
_TINY = {"steps": 8, "size_px": 256, "cases": 3}
_FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_FLUX1_MODULATION = (r"(norm1|norm1_context|norm)\.linear$", 32.0)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="flux1-dev",
            import_builder=_flux1_dev,
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            tiny_modulation=_FLUX1_MODULATION,
            tiny=ImageSettings(**_TINY, guidance_scale=3.5, extra={"max_sequence_length": 32}),
            full=ImageSettings(steps=28, guidance_scale=3.5, size_px=1024, cases=3),
        ),
        ModelSpec(
            name="flux1-kontext-dev",
            import_builder=_flux1_kontext_dev,
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",
            tiny_modulation=_FLUX1_MODULATION,
            # Without max_area/_auto_resize the pipeline renders ~1 MP whatever height/width say.
            tiny=ImageSettings(**_TINY, guidance_scale=2.5,
                             extra={"max_sequence_length": 32, "max_area": 256 * 256, "_auto_resize": False}),
            full=ImageSettings(steps=28, guidance_scale=2.5, size_px=1024,
                             extra={"max_area": 1024 * 1024, "_auto_resize": False}),
            needs_input_image=True,
        ),
        ModelSpec(
            name="flux2-dev",
            import_builder=_flux2_dev,
            quantized_blocks=_FLUX_BLOCKS,
            gguf_arch="flux",  # city96 and ComfyUI-GGUF write FLUX.2 as arch "flux" (ComfyUI-GGUF knows no "flux2")
            tiny_modulation=(r"modulation", 32.0),  # FLUX.2 shares three modulation linears across blocks
            tiny=ImageSettings(**_TINY, guidance_scale=4.0, extra={"max_sequence_length": 64}),
            full=ImageSettings(steps=50, guidance_scale=4.0, size_px=1024, cases=1),
        ),
        ModelSpec(
            name="z-image-turbo",
            import_builder=_z_image_turbo,
            quantized_blocks=("layers.", "noise_refiner.", "context_refiner."),
            gguf_arch="lumina2",
            tiny_modulation=(r"adaLN_modulation", 4.0),
            tiny=ImageSettings(**_TINY, guidance_scale=0.0, extra={"max_sequence_length": 32}),
            full=ImageSettings(steps=9, guidance_scale=0.0, size_px=1024, cases=4),
        ),
    )
}
