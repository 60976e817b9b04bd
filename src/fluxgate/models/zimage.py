"""Z-Image-Turbo's builder (`BUILDER`): the real diffusers/transformers classes with seeded random weights.

At toy size (the tiny profile), shapes follow the released checkpoint (Tongyi-MAI/Z-Image-Turbo): a single-stream DiT with noise/context
refiners and 128-wide heads split (32, 48, 48) across RoPE axes, a Flux-style 16-channel VAE with an 8x
downsample, a Qwen3 causal LM as text encoder and a Qwen chat template in front of the prompt.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from fluxgate.models.builder import ModelBuilder
from fluxgate.models.flux1 import FULL_VAE_CONFIG
from fluxgate.models.seeding import cpu_normal, seeded_module
from fluxgate.models.tokenizers import word_level_tokenizer

_CAP_FEAT_DIM = 128  # text encoder hidden size; the real one is Qwen3-4B's 2560

# Real: dim 3840, 30 heads of 128, 30 layers. Here 3 heads of the real head width, so the real RoPE split
# (axes_dims sum == head_dim) is kept. dim=384 makes every block Linear quantizable: in_features 384, 1024
# (FFN hidden = int(dim / 3 * 8)) and 256 (adaLN input = min(dim, 256)) are multiples of 64, and outputs
# 384, 1024, 1536 multiples of 16.
TINY_TRANSFORMER_CONFIG: dict = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 384,
    "n_layers": 2,
    "n_refiner_layers": 2,
    "n_heads": 3,
    "n_kv_heads": 3,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": _CAP_FEAT_DIM,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    # Caption positions run along axis 0 and the image starts after them, so 256 covers max_sequence_length
    # up to ~200; 64 per spatial axis covers 1024px (64 patches of 16px).
    "axes_lens": [256, 64, 64],
}

# Qwen3's template, trimmed to plain chat: with enable_thinking true it adds nothing after the assistant header,
# which is exactly the prefix Z-Image encodes.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Qwen's byte-level BPE never needs an unknown token; the word-level stand-in does, hence "<unk>".
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]


def _tokenizer():
    tok = word_level_tokenizer(
        _SPECIAL_TOKENS,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        model_max_length=512,
        extra_words=("user", "assistant", "system"),
    )
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _text_encoder(vocab_size: int) -> Qwen3ForCausalLM:
    # Real: 36 layers, 32 query / 8 kv heads of 128, tied embeddings. Three layers so hidden_states[-2]
    # (what the pipeline reads) is a mid-stack layer output, as in the real model, not the embeddings.
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=_CAP_FEAT_DIM,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


def _vae() -> AutoencoderKL:
    # Four levels keep the real 8x downsample (16x with the 2x2 patch), so 256px is a 16x16 token grid.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 64, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # Z-Image-Turbo scheduler_config.json: a fixed shift of 3, no resolution-dependent shifting.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


# --- Full size (synthetic profile): the real checkpoint's shapes, seeded random weights, no text encoder. ---

# Tongyi-MAI/Z-Image-Turbo transformer/config.json: 6,154,908,736 parameters.
FULL_TRANSFORMER_CONFIG: dict = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,  # Qwen3-4B hidden size
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
# ZImagePipeline drops the padding of the encoded prompt, so the caption is as long as the chat-templated prompt:
# fluxgate's default prompt is ~17 Qwen tokens, plus 8 of the template ("<|im_start|>user\n ... <|im_end|>\n
# <|im_start|>assistant\n"). The transformer pads captions to a multiple of 32 itself.
FULL_SEQUENCE_LENGTH = 25



class ZImageTurbo(ModelBuilder):
    """Z-Image-Turbo: `ZImagePipeline` around `ZImageTransformer2DModel`, conditioned on a Qwen3 hidden state."""

    pipeline_class = ZImagePipeline
    transformer_class = ZImageTransformer2DModel
    tiny_transformer_config = TINY_TRANSFORMER_CONFIG
    full_transformer_config = FULL_TRANSFORMER_CONFIG

    def tiny_components(self, seed: int) -> dict:
        """Scheduler, VAE, text encoder and tokenizer at toy size, float32 on CPU in eval mode.

        Default init is kept: the random decoder already turns latents into a textured image (pixel std ~40 of
        255), and the transformer's velocity (std ~0.6) moves the final latents enough to show in it.
        """
        tokenizer = _tokenizer()
        return {
            "scheduler": _scheduler(),
            "vae": seeded_module(_vae, seed, "cpu", torch.float32),
            "text_encoder": seeded_module(lambda: _text_encoder(len(tokenizer)), seed + 1, "cpu", torch.float32),
            "tokenizer": tokenizer,
        }

    def full_components(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict:
        """Every ZImagePipeline component except the transformer at full size: the real scheduler, the FLUX VAE
        (Z-Image ships FLUX.1's) with seeded random weights made on `device` in `dtype`, and no text encoder."""
        return {
            "scheduler": _scheduler(),
            "vae": seeded_module(lambda: AutoencoderKL(**FULL_VAE_CONFIG), seed, device, dtype),
            "text_encoder": None,
            "tokenizer": None,
        }

    def prompt_inputs(self, seed: int, device: torch.device | str, dtype: torch.dtype, config: dict | None = None,
                      sequence_length: int = FULL_SEQUENCE_LENGTH) -> dict:
        """Pipeline kwargs that stand for the prompt: `prompt_embeds`, a list of one `[sequence_length, cap_feat_dim]`
        tensor (the pipeline takes one unpadded caption per image), standard normal, drawn on the CPU from `seed` so
        every device gets the same values. `config` defaults to the full transformer's. No negative embeddings:
        Z-Image-Turbo runs at guidance 0 (a guidance > 0 without `negative_prompt_embeds` is refused by the
        pipeline)."""
        config = config or FULL_TRANSFORMER_CONFIG
        (caption,) = cpu_normal(seed, (sequence_length, config["cap_feat_dim"]))
        return {"prompt_embeds": [caption.to(device, dtype)]}


BUILDER = ZImageTurbo()
