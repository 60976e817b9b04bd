"""FLUX.1-dev's builder (`BUILDER`): the real diffusers/transformers classes with seeded random weights.

At toy size (the tiny profile), shapes keep the real layout (16-channel VAE with 8x downscale, 2x2 latent packing into 64 transformer input
channels, double- and single-stream blocks, guidance embedding, CLIP pooled + T5 sequence conditioning), only
narrower and shallower, so a 256 px, 4-step image takes ~0.1 s on two idle CPU cores.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from fluxgate.models.builder import ModelBuilder
from fluxgate.models.seeding import cpu_normal, seeded_module
from fluxgate.models.tokenizers import word_level_tokenizer

# Short prompts keep the text encoders and joint attention cheap. Pipeline calls must pass
# max_sequence_length=MAX_SEQUENCE_LENGTH: FluxPipeline pads the T5 input to that argument (default 512),
# not to the tokenizer's model_max_length.
MAX_SEQUENCE_LENGTH = 32
_CLIP_MAX_LENGTH = 32  # real CLIP: 77; the pipeline reads it from the tokenizer's model_max_length
_TEXT_DIM = 64  # a multiple of 64 so context_embedder and the pooled-text embedder quantize in whole blocks
_LATENT_CHANNELS = 16  # as in the real FLUX VAE; 2x2 packing makes the transformer's 64 input channels

TINY_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 4 * _LATENT_CHANNELS,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    # Inner dim 128: every block Linear then has in_features in {128, 512, 640} and out_features a multiple
    # of 128, so GGUF (32) and NVFP4 (16) blocks tile them exactly.
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": _TEXT_DIM,
    "pooled_projection_dim": _TEXT_DIM,
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled
    # Real FLUX splits head dim 128 as (16, 56, 56); same proportions for head dim 64 (must sum to it).
    "axes_dims_rope": (8, 28, 28),
}


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The FLUX.1 scheduler config (resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _vae(seed: int, dtype: torch.dtype) -> AutoencoderKL:
    """A 4-level (8x) KL autoencoder with FLUX's 16 latent channels, scaling and shift, and no quant convs."""
    # No init rescaling is needed for visible images: with default init, GroupNorm+SiLU feed conv_out
    # unit-scale activations, so decoded pixels have std ~0.35 in [-1, 1] (~40 on 0-255), and the
    # transformer's velocity moves them by ~20 levels on average, so a broken transformer shows.
    return seeded_module(
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=1,
            latent_channels=_LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        seed,
        "cpu",
        dtype,
    )


def _clip(seed: int, dtype: torch.dtype) -> tuple[CLIPTextModel, PreTrainedTokenizerFast]:
    """CLIP text encoder (FLUX uses only its pooled output) and a matching word-level tokenizer."""
    tokenizer = word_level_tokenizer(
        ["<|startoftext|>", "<|endoftext|>", "<unk>"],
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=_CLIP_MAX_LENGTH,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )
    # CLIP pools at the first eos id, so wrap prompts as the real CLIP tokenizer does; truncation keeps room.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=4 * _TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return seeded_module(lambda: CLIPTextModel(config), seed, "cpu", dtype), tokenizer


def _t5(seed: int, dtype: torch.dtype) -> tuple[T5EncoderModel, PreTrainedTokenizerFast]:
    """T5 v1.1-style (gated-gelu) encoder and a word-level tokenizer with T5's pad/eos/unk ids."""
    tokenizer = word_level_tokenizer(
        ["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_SEQUENCE_LENGTH,
        eos_token="</s>",
    )
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_DIM,
        d_kv=32,
        d_ff=2 * _TEXT_DIM,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=MAX_SEQUENCE_LENGTH,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
    )
    return seeded_module(lambda: T5EncoderModel(config), seed, "cpu", dtype), tokenizer


# --- Full size (synthetic profile): the real checkpoint's shapes, seeded random weights, no text encoders. ---

# black-forest-labs/FLUX.1-dev transformer/config.json: 11,901,408,320 parameters.
FULL_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL hidden size
    "pooled_projection_dim": 768,  # CLIP-L pooled output
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# black-forest-labs/FLUX.1-dev vae/config.json (also Z-Image's VAE): 83,819,683 parameters.
FULL_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": _LATENT_CHANNELS,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# FluxPipeline pads the T5 prompt to max_sequence_length, 512 by default, whatever the prompt's length.
FULL_SEQUENCE_LENGTH = 512



class Flux1Dev(ModelBuilder):
    """FLUX.1-dev: `FluxPipeline` around `FluxTransformer2DModel`, CLIP-L pooled + T5 sequence conditioning."""

    pipeline_class = FluxPipeline
    transformer_class = FluxTransformer2DModel
    tiny_transformer_config = TINY_TRANSFORMER_CONFIG
    full_transformer_config = FULL_TRANSFORMER_CONFIG

    def tiny_components(self, seed: int, dtype: torch.dtype = torch.float32) -> dict:
        """Every FluxPipeline component except the transformer, on CPU in eval mode.

        `dtype` must equal the transformer's: FluxPipeline makes latents and text embeddings in the text
        encoders' dtype and feeds them to the transformer, then the VAE, without casting. So a bf16 transformer
        needs `dtype=torch.bfloat16` here; the float32 default fails with a dtype-mismatch RuntimeError.
        """
        # Distinct seed offsets so the encoders and the VAE don't start from the same random stream.
        text_encoder, tokenizer = _clip(seed + 1, dtype)
        text_encoder_2, tokenizer_2 = _t5(seed + 2, dtype)
        return {
            "scheduler": _scheduler(),
            "vae": _vae(seed + 3, dtype),
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2,
            "tokenizer_2": tokenizer_2,
            "image_encoder": None,
            "feature_extractor": None,
        }

    def full_components(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict:
        """Every FluxPipeline component except the transformer at full size: the real scheduler, the real-config VAE
        with seeded random weights made on `device` in `dtype`, and no text encoders (the prompt comes as
        embeddings)."""
        return {
            "scheduler": _scheduler(),
            "vae": seeded_module(lambda: AutoencoderKL(**FULL_VAE_CONFIG), seed, device, dtype),
            "text_encoder": None,
            "tokenizer": None,
            "text_encoder_2": None,
            "tokenizer_2": None,
            "image_encoder": None,
            "feature_extractor": None,
        }

    def prompt_inputs(self, seed: int, device: torch.device | str, dtype: torch.dtype, config: dict | None = None,
                      sequence_length: int = FULL_SEQUENCE_LENGTH) -> dict:
        """Pipeline kwargs that stand for the prompt: T5 `prompt_embeds` `[1, sequence_length, joint_attention_dim]`
        and CLIP `pooled_prompt_embeds` `[1, pooled_projection_dim]`, standard normal (unit std, as the encoders'
        outputs roughly are), drawn on the CPU from `seed` so every device gets the same values. `config` defaults to
        the full transformer's; no negative embeddings: FLUX.1-dev's guidance is distilled into the model
        (true_cfg_scale 1)."""
        config = config or FULL_TRANSFORMER_CONFIG
        prompt, pooled = cpu_normal(seed, (1, sequence_length, config["joint_attention_dim"]),
                                    (1, config["pooled_projection_dim"]))
        return {"prompt_embeds": prompt.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}


BUILDER = Flux1Dev()
