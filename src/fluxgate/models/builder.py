"""`ModelBuilder`: what each model's builder gives the rest of fluxgate, as real diffusers classes.

Each model's module (`flux1`, `flux1_kontext`, `flux2`, `zimage`) has one class implementing this protocol and one
instance of it, `BUILDER`, which its `ModelSpec` in `fluxgate.models.MODELS` names. Nothing here imports torch or
diffusers: the builders do, when a spec first asks for its builder; `ModelBuilder.load_transformer`'s default imports
`fluxgate.models.loading` when a combo first loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from PIL import Image


class ModelBuilder(Protocol):
    """A model's diffusers classes and how to build them: at toy size on the CPU (the tiny profile) and at the real
    checkpoint's size with seeded random weights (the synthetic profile). Builders subclass it to state that they
    implement it (and inherit `input_image` and `load_transformer`)."""

    pipeline_class: type  # the diffusers pipeline: `pipeline_class(transformer=..., **components)`, `.from_pretrained`
    transformer_class: type  # the diffusers denoiser: `transformer_class(**config)`, loaded by `load_transformer`
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

    def load_transformer(self, checkpoint: Path | dict[str, torch.Tensor], config: Path | str, *,
                         device: torch.device, dtype: torch.dtype, quantization_config: object | None = None,
                         subfolder: str | None = None) -> torch.nn.Module:
        """The denoiser loaded from `checkpoint` (a file, or an in-memory state dict in diffusers' key names) with the
        model config in `config` (a folder holding config.json, or a cached Hub id, its `subfolder`), on `device` in
        `dtype`, in eval mode; `quantization_config` is the file format's (`PrecisionFormat.quantization_config`,
        None for bf16 and for the bf16 file a load-then-transform backend loads). Every profile loads through it.

        This default (`fluxgate.models.loading.load_default`) uses diffusers' `from_single_file` where
        `transformer_class` has one, else builds the class from its config with empty weights and assigns the state
        dict (`load_state_dict(strict=True, assign=True)`); a quantization config on a class without a single-file
        loader raises `fluxgate.errors.SkipCombo` naming why. Override it to load another way (a team's own loader,
        its own quantized layers). Raise SkipCombo for what cannot load here, FixtureError (one line) for a file that
        is wrong; either is shown whole with the file named, anything else as its type, message and root cause."""
        from fluxgate.models.loading import load_default

        return load_default(self.transformer_class, checkpoint, config, device=device, dtype=dtype,
                            quantization_config=quantization_config, subfolder=subfolder)

    def input_image(self, size_px: int, seed: int) -> Image.Image | None:
        """The `size_px` square RGB image an editing pipeline edits, the same for the same arguments; None (this
        default) for a text-to-image model."""
        return None
