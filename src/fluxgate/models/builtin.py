"""fluxgate's own models, registered through `fluxgate.registry` like any team's (`fluxgate.models` group).

The member facts' sources are in `fluxgate.weights.members`."""

from __future__ import annotations

from fluxgate.models import ImageSettings, MemberFacts, ModelSpec

# Tiny profile: 256 px (MS-SSIM needs >= 176), 8 steps, three cases per combo.
_TINY = {"steps": 8, "size_px": 256, "cases": 3}
_FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
_FLUX1_MODULATION = (r"(norm1|norm1_context|norm)\.linear$", 32.0)

MODELS = (
    ModelSpec(
        name="flux1-dev",
        member=MemberFacts("flux1", True, ("FluxPipeline",), ("flux1-dev", "flux.1-dev")),
        import_builder="fluxgate.models.flux1:BUILDER",
        quantized_blocks=_FLUX_BLOCKS,
        gguf_arch="flux",
        tiny_modulation=_FLUX1_MODULATION,
        tiny=ImageSettings(**_TINY, guidance_scale=3.5, extra={"max_sequence_length": 32}),
        full=ImageSettings(steps=28, guidance_scale=3.5, size_px=1024, cases=3),
    ),
    ModelSpec(
        name="flux1-kontext-dev",
        member=MemberFacts("flux1", True, ("FluxKontextPipeline",), ("kontext",)),
        import_builder="fluxgate.models.flux1_kontext:BUILDER",
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
        member=MemberFacts("flux2", True, ("Flux2Pipeline",), ("flux2-dev", "flux.2-dev")),
        import_builder="fluxgate.models.flux2:BUILDER",
        quantized_blocks=_FLUX_BLOCKS,
        gguf_arch="flux",  # city96 and ComfyUI-GGUF write FLUX.2 as arch "flux" (ComfyUI-GGUF knows no "flux2")
        tiny_modulation=(r"modulation", 32.0),  # FLUX.2 shares three modulation linears across blocks
        tiny=ImageSettings(**_TINY, guidance_scale=4.0, extra={"max_sequence_length": 64}),
        full=ImageSettings(steps=50, guidance_scale=4.0, size_px=1024, cases=1),
    ),
    ModelSpec(
        name="z-image-turbo",
        member=MemberFacts("z-image", None, ("ZImagePipeline",), ("turbo",)),
        import_builder="fluxgate.models.zimage:BUILDER",
        quantized_blocks=("layers.", "noise_refiner.", "context_refiner."),
        gguf_arch="lumina2",
        tiny_modulation=(r"adaLN_modulation", 4.0),
        tiny=ImageSettings(**_TINY, guidance_scale=0.0, extra={"max_sequence_length": 32}),
        full=ImageSettings(steps=9, guidance_scale=0.0, size_px=1024, cases=4),
    ),
)
