"""`ModelBuilder`: what each model's builder gives the rest of fluxgate, as real diffusers classes.

Each model's module (`flux1`, `flux1_kontext`, `flux2`, `zimage`) has one class implementing this protocol and one
instance of it, `BUILDER`, which its `ModelSpec` in `fluxgate.models.MODELS` names. Nothing here imports torch or
diffusers: the builders do, when a spec first asks for its builder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ModelBuilder(Protocol):
    """A model's diffusers classes and how to build them: at toy size on the CPU (the tiny profile) and at the real
    checkpoint's size with seeded random weights (the synthetic profile). Builders subclass it to state that they
    implement it (and inherit `input_image`)."""

    pipeline_class: type  # the diffusers pipeline: `pipeline_class(transformer=..., **components)`, `.from_pretrained`
    transformer_class: type  # the diffusers transformer: `transformer_class(**config)`, `.from_single_file`
    tiny_transformer_config: dict[str, Any]  # the tiny profile's transformer (every block linear quantizable)
    full_transformer_config: dict[str, Any]  # the released checkpoint's transformer/config.json (the source named)

    def tiny_components(self, seed: int) -> dict[str, Any]:
        """Every pipeline component but the transformer at toy size (scheduler, VAE, text encoders, tokenizers),
        float32 on the CPU in eval mode, with random weights from `seed`; nothing is downloaded."""
        ...

    def full_components(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
        """Every pipeline component but the transformer at full size: the real scheduler, the real-config VAE with
        weights from `seed` made on `device` in `dtype`, and no text encoders (the prompt comes as `prompt_inputs`)."""
        ...

    def prompt_inputs(self, seed: int, device: torch.device | str, dtype: torch.dtype, config: dict | None = None,
                      sequence_length: int = ...) -> dict[str, Any]:
        """Pipeline kwargs that stand for the prompt: the text encoders' outputs at their real shapes (for the
        transformer `config`, default the full one; `sequence_length` tokens, default the real pipeline's), standard
        normal, drawn on the CPU from `seed` so every device gets the same values, then moved to `device`, `dtype`."""
        ...

    def input_image(self, size_px: int, seed: int) -> Image.Image | None:
        """The `size_px` square RGB image an editing pipeline edits, the same for the same arguments; None (this
        default) for a text-to-image model."""
        return None
