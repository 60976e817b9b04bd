"""A team's model family written against fluxgate's documented API only, as tests/test_extending.py registers it:
PixArt-Sigma, diffusers' `PixArtSigmaPipeline` around `PixArtTransformer2DModel`, a class diffusers has no single-file
loader for (it is not in `diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES`).

`MODELS` is what an entry point of the `fluxgate.models` group would name, `BUILDER` the builder its spec names;
`PRECISIONS` a load-then-transform backend (`fluxgate.precisions` group) that loads the bf16 file first.
Tiny: a 2-block transformer of 2 heads of 64, a T5 v1.1-style encoder, a 4-channel SD-style VAE; all seeded, offline.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from tokenizers import processors
from transformers import T5Config, T5EncoderModel

from fluxgate.models import ImageSettings, ModelSpec
from fluxgate.models.builder import ModelBuilder
from fluxgate.models.seeding import cpu_normal, seeded_module
from fluxgate.models.tokenizers import word_level_tokenizer
from fluxgate.precisions import PrecisionSpec
from fluxgate.precisions.spec import PrecisionFormat

NAME = "pixart-sigma"
SEQUENCE_LENGTH = 32  # the tiny T5's prompt length (PixArt-Sigma's own: 300)
_TEXT_DIM = 64

TINY_TRANSFORMER_CONFIG = {
    "num_attention_heads": 2, "attention_head_dim": 64, "in_channels": 4, "out_channels": 8, "num_layers": 2,
    "cross_attention_dim": 128, "caption_channels": _TEXT_DIM, "sample_size": 32, "patch_size": 2,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "use_additional_conditions": False,
}
# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (its PixArtTransformer2DModel arguments)
FULL_TRANSFORMER_CONFIG = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "cross_attention_dim": 1152, "caption_channels": 4096, "sample_size": 128, "patch_size": 2,
    "interpolation_scale": 2, "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "use_additional_conditions": False,
}
_PIPELINE_KWARGS = {"clean_caption": False, "use_resolution_binning": False}


def _scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                       prediction_type="epsilon")


def _vae() -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=256, scaling_factor=0.13025)


def _t5(seed: int):
    tokenizer = word_level_tokenizer(["<pad>", "</s>", "<unk>"], unk_token="<unk>", pad_token="<pad>",
                                     model_max_length=SEQUENCE_LENGTH, eos_token="</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)])
    config = T5Config(vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_kv=32, d_ff=2 * _TEXT_DIM, num_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    return seeded_module(lambda: T5EncoderModel(config), seed, "cpu", torch.float32), tokenizer


class PixArtSigma(ModelBuilder):
    """PixArt-Sigma; its transformer is loaded by `ModelBuilder.load_transformer`'s default, which assigns the state
    dict to a class built from its config (diffusers has no single-file loader for it)."""

    pipeline_class = PixArtSigmaPipeline
    transformer_class = PixArtTransformer2DModel
    tiny_transformer_config = TINY_TRANSFORMER_CONFIG
    full_transformer_config = FULL_TRANSFORMER_CONFIG

    def tiny_components(self, seed: int) -> dict:
        text_encoder, tokenizer = _t5(seed + 1)
        return {"scheduler": _scheduler(), "vae": seeded_module(_vae, seed + 2, "cpu", torch.float32),
                "text_encoder": text_encoder, "tokenizer": tokenizer}

    def full_components(self, device, dtype, seed: int = 0) -> dict:
        vae = seeded_module(lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                                  sample_size=1024, scaling_factor=0.13025), seed, device, dtype)
        return {"scheduler": _scheduler(), "vae": vae, "text_encoder": None, "tokenizer": None}

    def prompt_inputs(self, seed, device, dtype, config=None, sequence_length: int = 300) -> dict:
        """T5 `prompt_embeds` and `negative_prompt_embeds` `[1, sequence_length, caption_channels]` and their all-ones
        attention masks `[1, sequence_length]`."""
        channels = (config or FULL_TRANSFORMER_CONFIG)["caption_channels"]
        prompt, negative = cpu_normal(seed, (1, sequence_length, channels), (1, sequence_length, channels))
        mask = torch.ones(1, sequence_length, dtype=torch.long, device=device)
        return {"prompt_embeds": prompt.to(device, dtype), "prompt_attention_mask": mask,
                "negative_prompt_embeds": negative.to(device, dtype), "negative_prompt_attention_mask": mask}


BUILDER = PixArtSigma()

MODELS = (
    ModelSpec(
        name=NAME,
        import_builder=f"{__name__}:BUILDER",
        quantized_blocks=("transformer_blocks.",),
        gguf_arch="pixart",
        tiny=ImageSettings(steps=4, guidance_scale=4.5, size_px=256, cases=1,
                           extra={"max_sequence_length": SEQUENCE_LENGTH, **_PIPELINE_KWARGS}),
        full=ImageSettings(steps=20, guidance_scale=4.5, size_px=1024, cases=1, extra=_PIPELINE_KWARGS),
        description="PixArt-Sigma: PixArtSigmaPipeline around PixArtTransformer2DModel (no single-file loader)",
    ),
)


def _fake_int8_rows(denoiser: torch.nn.Module) -> None:
    """Rounds each block linear's weight to 255 levels per row (symmetric int8 with a per-row scale), in place: a
    load-then-transform backend, loading the bf16 file first."""
    with torch.no_grad():
        for name, module in denoiser.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
                scale = module.weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
                module.weight.copy_((module.weight / scale).round().clamp(-127, 127) * scale)


INT8_ROWS = "team-int8-rows"
FORMAT = PrecisionFormat(transform=_fake_int8_rows)
PRECISIONS = (PrecisionSpec(INT8_ROWS, tier="8bit", format=f"{__name__}:FORMAT", file_precision="bf16",
                            description="block linears rounded to int8 levels per row after loading (a team's "
                                        "load-then-transform backend)"),)
