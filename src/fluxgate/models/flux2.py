"""FLUX.2-dev's builder (`BUILDER`): the real diffusers/transformers classes, seeded random weights, nothing downloaded;
at toy size (the tiny profile) and at the released checkpoint's size (the synthetic profile)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from fluxgate.models.builder import ModelBuilder
from fluxgate.models.seeding import cpu_normal, seeded_module
from fluxgate.models.tokenizers import word_level_tokenizer

_TEXT_HIDDEN = 64
# The pipeline stacks hidden_states[10], [20], [30] by default; with 31 layers all three stay intermediate
# (as in the 40-layer original), so no text_encoder_out_layers override is needed.
_TEXT_LAYERS = 31
_LATENT_CHANNELS = 32  # as in FLUX.2: 32 VAE channels, 2x2-patchified to 128 transformer channels

TINY_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 4 * _LATENT_CHANNELS,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * _TEXT_HIDDEN,  # three stacked text-encoder layers
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (16, 16, 16, 16),  # (t, h, w, l) axes sum to attention_head_dim
    "guidance_embeds": True,
}

_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>"]

# Mistral-Small-3 layout, reading the text parts of `{"type": "text", "text": ...}` content lists.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set t = m['content'] %}"
    "{% else %}{% set t = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ t }}[/INST]"
    "{% else %}{{ t }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def _tokenizer():
    # The system message's words get their own ids so it is not a run of <unk>s.
    words = tuple(dict.fromkeys(SYSTEM_MESSAGE.lower().replace(".", " ").replace(",", " ").split()))
    tok = word_level_tokenizer(_SPECIAL_TOKENS, unk_token="<unk>", pad_token="<pad>", model_max_length=512,
                               bos_token="<s>", eos_token="</s>", extra_words=words)
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _text_encoder(tok) -> Mistral3ForConditionalGeneration:
    ids = tok.convert_tokens_to_ids
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tok), "hidden_size": _TEXT_HIDDEN, "intermediate_size": 128,
            "num_hidden_layers": _TEXT_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 512, "rope_theta": 1e9, "sliding_window": None,
            "bos_token_id": ids("<s>"), "eos_token_id": ids("</s>"), "pad_token_id": ids("<pad>"),
        },
        # Never run for text-to-image, but part of the real class; kept as small as Pixtral allows.
        vision_config={
            "model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "head_dim": 16, "image_size": 56, "patch_size": 14,
        },
        image_token_index=ids("[IMG]"),
    )
    return Mistral3ForConditionalGeneration(config)


def _vae() -> AutoencoderKLFlux2:
    # Four levels keep vae_scale_factor at 8, so 256px maps to 32x32 latents / 16x16 tokens as in the real model.
    return AutoencoderKLFlux2(
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=256,
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2-dev scheduler_config.json; the pipeline passes `mu`, which needs dynamic shifting.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


# --- Full size (synthetic profile): the real checkpoint's shapes, seeded random weights, no text encoder. ---

# black-forest-labs/FLUX.2-dev transformer/config.json: 32,223,281,152 parameters (60.0 GiB in bf16).
FULL_TRANSFORMER_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,  # three stacked Mistral-Small-3 hidden states of 5120
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": True,  # FLUX.2-dev is guidance-distilled
}
# black-forest-labs/FLUX.2-dev vae/config.json: 84,046,115 parameters, plus batch-norm statistics of the latents.
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
    # The file also says "force_upcast": true, which this class does not take (from_pretrained drops it).
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}
# Flux2Pipeline pads the Mistral prompt to max_sequence_length, 512 by default.
FULL_SEQUENCE_LENGTH = 512



class Flux2Dev(ModelBuilder):
    """FLUX.2-dev: `Flux2Pipeline` around `Flux2Transformer2DModel`, conditioned on three stacked Mistral-Small-3
    hidden states."""

    pipeline_class = Flux2Pipeline
    transformer_class = Flux2Transformer2DModel
    tiny_transformer_config = TINY_TRANSFORMER_CONFIG
    full_transformer_config = FULL_TRANSFORMER_CONFIG

    def tiny_components(self, seed: int) -> dict:
        """Every Flux2Pipeline component except the transformer, float32 on CPU in eval mode.

        Flux2Pipeline casts neither prompt embeds (text_encoder.dtype) before the transformer's context_embedder nor
        latents (transformer dtype) before the VAE, so text_encoder and vae must be cast to the transformer's dtype.
        """
        torch.manual_seed(seed)
        tok = _tokenizer()
        text_encoder = _text_encoder(tok).eval()
        vae = _vae().eval()
        return {"scheduler": _scheduler(), "vae": vae, "text_encoder": text_encoder, "tokenizer": tok}

    def full_components(self, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict:
        """Every Flux2Pipeline component except the transformer at full size: the real scheduler, the real-config VAE
        with seeded random weights made on `device` in `dtype` (batch-norm statistics at their init: mean 0, var 1),
        and no text encoder (the prompt comes as embeddings)."""
        return {
            "scheduler": _scheduler(),
            "vae": seeded_module(lambda: AutoencoderKLFlux2(**FULL_VAE_CONFIG), seed, device, dtype),
            "text_encoder": None,
            "tokenizer": None,
        }

    def prompt_inputs(self, seed: int, device: torch.device | str, dtype: torch.dtype, config: dict | None = None,
                      sequence_length: int = FULL_SEQUENCE_LENGTH) -> dict:
        """Pipeline kwargs that stand for the prompt: `prompt_embeds` `[1, sequence_length, joint_attention_dim]`,
        standard normal, drawn on the CPU from `seed` so every device gets the same values. `config` defaults to the
        full transformer's. Its dtype must be the transformer's: Flux2Pipeline makes the latents in the embeddings'
        dtype. No negative embeddings: guidance is distilled into FLUX.2-dev."""
        config = config or FULL_TRANSFORMER_CONFIG
        (prompt,) = cpu_normal(seed, (1, sequence_length, config["joint_attention_dim"]))
        return {"prompt_embeds": prompt.to(device, dtype)}


BUILDER = Flux2Dev()
