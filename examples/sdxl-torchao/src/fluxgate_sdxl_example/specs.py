"""The light declarations the entry points name: read by fluxgate when pytest starts (`--help`, marks, items), so
this module imports fluxgate's spec classes only, no torch. The implementations are named as `module:attribute`."""

from __future__ import annotations

from fluxgate.models import ImageSettings, ModelSpec
from fluxgate.precisions import PrecisionSpec

TORCHAO_FP8_ROW = "torchao-fp8-row"

MODELS = (
    ModelSpec(
        name="sdxl-base",
        import_builder="fluxgate_sdxl_example.sdxl:BUILDER",
        denoiser="unet",  # StableDiffusionXLPipeline(unet=...), pipe.unet
        # The UNet's transformer blocks (self/cross attention, feed-forward) hold its linears, as in SDXL's
        # quantized community checkpoints; time/text embeddings, convolutions and norms stay bf16.
        quantized_blocks=("down_blocks.", "mid_block.", "up_blocks."),
        gguf_arch="sdxl",
        # A UNet has no AdaLN gates to rescale (ModelSpec.tiny_modulation): random init already moves the image.
        # 256 px: MS-SSIM needs >= 176 px. Classifier-free guidance (> 1) doubles the UNet's batch, as deployed.
        tiny=ImageSettings(steps=8, guidance_scale=5.0, size_px=256, cases=3),
        # stabilityai/stable-diffusion-xl-base-1.0's defaults: 1024 px, 50 steps, guidance 5.
        full=ImageSettings(steps=50, guidance_scale=5.0, size_px=1024, cases=2),
        # fluxgate's file formats target DiT checkpoints' layouts; torchao quantizes the loaded bf16 UNet instead.
        precisions=("bf16", TORCHAO_FP8_ROW),
        description="Stable Diffusion XL base 1.0: StableDiffusionXLPipeline around UNet2DConditionModel",
    ),
)

PRECISIONS = (
    PrecisionSpec(
        TORCHAO_FP8_ROW,
        tier="8bit",
        format="fluxgate_sdxl_example.torchao_fp8:FORMAT",
        file_precision="bf16",  # loads the bf16 denoiser, then `FORMAT.transform` quantizes it in place
        requires=("torchao",),
        description="torchao Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()): E4M3 weights with a "
                    "per-row scale, activations quantized per row at run time",
    ),
)
