"""SDXL's builder (`BUILDER`): diffusers' `StableDiffusionXLPipeline` around `UNet2DConditionModel`, real classes with
seeded random weights, implementing `fluxgate.models.builder.ModelBuilder`.

SDXL conditions its UNet on two CLIP text encoders: the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP
ViT-bigG (1280) concatenated per token, `prompt_embeds` `[B, 77, 2048]` (the UNet's `cross_attention_dim`), and
bigG's projected pooled output `pooled_prompt_embeds` `[B, 1280]`, which the pipeline concatenates with six
Fourier-embedded size/crop numbers (`add_time_ids`, 6 x 256) into the UNet's 2816-wide `text_time` embedding.

At toy size (the tiny profile) the layout is kept, narrower and shallower: two encoders of width 32 (so
`cross_attention_dim` 64, pooled 32), a two-level UNet with one cross-attention level, a 4-latent-channel VAE with
SDXL's 8x downscale and scaling factor. A 256 px image is a 32 x 32 latent.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fluxgate.models.builder import ModelBuilder
from fluxgate.models.seeding import cpu_normal, seeded_module
from fluxgate.models.tokenizers import word_level_tokenizer

_TEXT_DIM = 32  # each tiny encoder's hidden size (real: 768 and 1280)
_TIME_EMBED_DIM = 8  # per size/crop number (real: addition_time_embed_dim 256)
_TOKENS = 32  # the tiny tokenizers' model_max_length (real: 77); the pipeline pads every prompt to it
_CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>", "<unk>"]  # ids 0, 1, 2: CLIP pools at the eos id

TINY_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 1),
    "attention_head_dim": (2, 4),  # diffusers' name for SDXL's head *counts*: heads of 16 channels here
    "norm_num_groups": 16,
    "cross_attention_dim": 2 * _TEXT_DIM,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": _TEXT_DIM + 6 * _TIME_EMBED_DIM,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters).
FULL_UNET_CONFIG: dict = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "norm_num_groups": 32,
    "cross_attention_dim": 2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP ViT-bigG)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 x 256
}

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (83,653,863 parameters).
FULL_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
FULL_SEQUENCE_LENGTH = 77  # both CLIP tokenizers' model_max_length: SDXL pads every prompt to it
FULL_POOLED_DIM = 1280  # OpenCLIP ViT-bigG's projection_dim


def _scheduler() -> EulerDiscreteScheduler:
    """stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json."""
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                  timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def _tiny_vae() -> AutoencoderKL:
    """SDXL's VAE layout at toy width: 4 levels (8x down), 4 latent channels, SDXL's scaling factor."""
    return AutoencoderKL(**{**FULL_VAE_CONFIG, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1,
                            "norm_num_groups": 8, "sample_size": 256, "force_upcast": False})


def _clip_tokenizer():
    """A word-level stand-in for CLIP's BPE tokenizer, wrapping each prompt in start/end tokens as CLIP's does (the
    text model pools at the first end-of-text id)."""
    tokenizer = word_level_tokenizer(_CLIP_SPECIAL, unk_token="<unk>", pad_token="<|endoftext|>",
                                     model_max_length=_TOKENS, bos_token="<|startoftext|>",
                                     eos_token="<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return tokenizer


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=_TEXT_DIM, intermediate_size=4 * _TEXT_DIM,
                          num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=_TOKENS,
                          projection_dim=_TEXT_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)


class SDXLBase(ModelBuilder):
    """SDXL base 1.0: `StableDiffusionXLPipeline` around `UNet2DConditionModel` (the spec's `denoiser="unet"`)."""

    pipeline_class = StableDiffusionXLPipeline
    transformer_class = UNet2DConditionModel  # the protocol's name for the denoiser's class
    tiny_transformer_config = TINY_UNET_CONFIG
    full_transformer_config = FULL_UNET_CONFIG

    def tiny_components(self, seed: int) -> dict:
        """Every StableDiffusionXLPipeline component but the UNet at toy size, float32 on the CPU in eval mode: the
        real scheduler, two CLIP text encoders (the second with its projection, whose `text_embeds` `[B, 32]` is the
        pooled prompt) with their tokenizers, a tiny VAE. Seed offsets keep the modules' random streams apart."""
        tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
        config = _clip_config(len(tokenizer))
        return {
            "scheduler": _scheduler(),
            "vae": seeded_module(_tiny_vae, seed + 3, "cpu", torch.float32),
            "text_encoder": seeded_module(lambda: CLIPTextModel(config), seed + 1, "cpu", torch.float32),
            "tokenizer": tokenizer,
            "text_encoder_2": seeded_module(lambda: CLIPTextModelWithProjection(config), seed + 2, "cpu",
                                            torch.float32),
            "tokenizer_2": tokenizer_2,
        }

    def full_components(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict:
        """Every StableDiffusionXLPipeline component but the UNet at full size: the real scheduler, SDXL's VAE config
        with seeded random weights made on `device` in `dtype`, no text encoders (the prompt comes as embeddings:
        `prompt_inputs`)."""
        return {"scheduler": _scheduler(),
                "vae": seeded_module(lambda: AutoencoderKL(**FULL_VAE_CONFIG), seed, device, dtype),
                "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}

    def prompt_inputs(self, seed: int, device: torch.device | str, dtype: torch.dtype, config: dict | None = None,
                      sequence_length: int = FULL_SEQUENCE_LENGTH) -> dict:
        """Pipeline kwargs that stand for the prompt: `prompt_embeds` `[1, sequence_length, cross_attention_dim]`
        ([1, 77, 2048] at full size) and `pooled_prompt_embeds` `[1, pooled]` ([1, 1280]: the UNet's
        `projection_class_embeddings_input_dim` less the six 256-wide time ids), standard normal, drawn on the CPU
        from `seed`. `config` defaults to the full UNet's. No negative embeddings: SDXL base's
        `force_zeros_for_empty_prompt` makes the unconditional branch zeros, and the pipeline adds `add_time_ids`
        from height and width itself."""
        config = config or FULL_UNET_CONFIG
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        prompt, pooled = cpu_normal(seed, (1, sequence_length, config["cross_attention_dim"]), (1, pooled_dim))
        return {"prompt_embeds": prompt.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}


BUILDER = SDXLBase()
