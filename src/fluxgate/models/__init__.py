"""The models of the matrix: `MODELS`, one `ModelSpec` per model, from the `fluxgate.models` entry-point group
(`fluxgate.registry`; fluxgate's own four are declared in `fluxgate.models.builtin`).

A model is a builder (a class implementing `builder.ModelBuilder`: its diffusers pipeline and denoiser classes, tiny
and full configs) and a light spec naming it. Importing this package is cheap: a spec names its builder as
`module:attribute` (or a function returning it), imported with torch, diffusers and transformers the first time
`ModelSpec.builder` is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from fluxgate.models.builder import ModelBuilder
from fluxgate.registry import MODELS_GROUP, Registry, load_target, marker_name

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


OUTPUT_KINDS = ("image",)


@dataclass(frozen=True)
class MemberFacts:
    """How a model's checkpoints are told from its relatives' (`fluxgate.weights.members`): its `family` (as
    `weights.identify.family_of` names it), whether its files hold a guidance embedder (None: not a FLUX fact),
    `pipelines`: model_index.json `_class_name`s of its pipeline, `path_words`: its published name's words (the
    documented tie-break, lower case)."""

    family: str
    guidance_embedder: bool | None
    pipelines: tuple[str, ...]
    path_words: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model of the matrix and how to build, quantize and run it."""

    name: str
    # The model's builder: `module:attribute`, or a function returning it; imported on first use
    import_builder: str | Callable[[], ModelBuilder]
    quantized_blocks: tuple[str, ...]  # state-dict prefixes whose linear layers real quantized checkpoints quantize
    gguf_arch: str  # general.architecture written into GGUF files, as community converters do
    tiny: ImageSettings
    full: ImageSettings  # the synthetic and real profiles: the model's own defaults at 1024 px
    # Random init leaves the AdaLN gates near 0.05, so the blocks barely touch the image and even zeroed blocks
    # would pass a similarity check. Scaling the modulation linears (a power of two: exact in bf16) gives O(1)
    # gates as in a trained model: zeroing the blocks then drops MS-SSIM to ~0.65-0.9, 5 % weight noise to ~0.995.
    tiny_modulation: tuple[str, float] = ("", 1.0)  # (regex on linear module names, weight gain)
    needs_input_image: bool = False
    # The pipeline's denoiser: its keyword and attribute (`pipeline_class(**{denoiser: module})`, `pipe.<denoiser>`),
    # "transformer" for DiT pipelines, "unet" for UNet ones (SDXL). Timing, FLOPs and the kernel path follow it.
    denoiser: str = "transformer"
    # What the pipeline returns: "image" (`.images[0]`, a PIL image). Only image models are measured today.
    output: str = "image"
    # The precisions it runs in (None: every registered one); others are not items of the matrix.
    precisions: tuple[str, ...] | None = None
    # How the real profile's identification and scan tell its files from its relatives' (None: scan places none)
    member: MemberFacts | None = None
    description: str = ""

    def __post_init__(self):
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"model {self.name}: output {self.output!r} is not one of {', '.join(OUTPUT_KINDS)}")

    @property
    def marker(self) -> str:
        """The pytest marker of its combos: `flux2_dev` for `flux2-dev`."""
        return marker_name(self.name)

    @property
    def builder(self) -> ModelBuilder:
        """The model's diffusers classes, configs and components (`builder.ModelBuilder`). Raises RegistryError when
        its module cannot be imported."""
        if isinstance(self.import_builder, str):
            return load_target(self.import_builder)
        return self.import_builder()

    def runs(self, precision: str) -> bool:
        """Whether `precision` is one of this model's (`precisions`; None: every one)."""
        return self.precisions is None or precision in self.precisions



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


MODELS: Registry[ModelSpec] = Registry(MODELS_GROUP, ModelSpec, "model")

DENOISER_ATTR = "fluxgate_denoiser"  # set on a pipeline by `pipeline`: the attribute naming its denoiser


def pipeline(model: ModelSpec, denoiser: torch.nn.Module, components: dict[str, Any]):
    """The model's diffusers pipeline around `denoiser` (passed as the model's `denoiser` keyword) and the other
    `components`; it remembers which attribute is its denoiser (`denoiser_of`)."""
    pipe = model.builder.pipeline_class(**{model.denoiser: denoiser}, **components)
    setattr(pipe, DENOISER_ATTR, model.denoiser)
    return pipe


def denoiser_of(pipe) -> torch.nn.Module:
    """The denoiser module of a pipeline made by `pipeline` (`pipe.unet` for a UNet model); `pipe.transformer` for any
    other pipeline."""
    return getattr(pipe, getattr(pipe, DENOISER_ATTR, "transformer"))
