"""fluxgate.weights.synthetic: seeded random transformers built in each precision's loader layout and loaded by diffusers.

Everything runs on the CPU at the tiny configs (the builder takes a `config` override), except the full-size checks,
which run on the meta device and take no memory.
"""

import gguf
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.precisions.gguf_q8_0 import quantize_q8_0
from fluxgate.weights import synthetic, tiny
from fluxgate.weights.loading import load_transformer

FLUX1 = MODELS["flux1-dev"]
TINY_FLUX1 = FLUX1.builder.tiny_transformer_config
SEED = 7


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (so bf16, fp8 and quantized parameters compare bit for bit)."""
    plain = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return plain.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert torch.equal(_bits(actual[key]), _bits(value)), key


def _forward(model_spec, transformer, config: dict) -> torch.Tensor:
    """One transformer call on a 4x4 token grid with the inputs its pipeline would pass."""
    generator = torch.Generator().manual_seed(0)
    tokens, text = 16, 8
    hidden = torch.randn(1, tokens, config["in_channels"], generator=generator).to(torch.bfloat16)
    context = torch.randn(1, text, config["joint_attention_dim"], generator=generator).to(torch.bfloat16)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        return transformer(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                           img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3)).sample


# --- Q8_0: the torch quantizer against gguf's numpy reference ---

def _gguf_q8_0(weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0))


@st.composite
def q8_0_weights(draw) -> torch.Tensor:
    """float32 `[N, K]` (K a multiple of 32) of mixed block magnitudes, some blocks all zero, a few outliers; bf16
    values or not. Block amax stays >= 1e-30: below ~3.7e-37 gguf's 1/d overflows (see the test below)."""
    rows, blocks = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    values = torch.randn(rows, blocks, 32, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    scales = draw(st.lists(st.sampled_from([0.0, 1e-30, 1e-8, 1e-3, 1.0, 6e4]) | st.floats(1e-20, 1e20),
                           min_size=rows * blocks, max_size=rows * blocks))
    values *= torch.tensor(scales).reshape(rows, blocks, 1)
    values = values.reshape(rows, blocks * 32)
    return values.to(torch.bfloat16).float() if draw(st.booleans()) else values


# amax 127 gives d = 1: every k + 0.5 is an exact tie, which ggml rounds away from zero (torch.round would not).
_TIES = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 126.5, -126.5, 0.49999997] + [3.25] * 24])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # d > 65504: both store fp16 inf
@settings(max_examples=60, deadline=None)
@given(weight=q8_0_weights())
@example(weight=_TIES)
@example(weight=torch.zeros(2, 64))
def test_torch_q8_0_is_bit_identical_to_gguf_reference(weight):
    assert torch.equal(quantize_q8_0(weight), _gguf_q8_0(weight))


@pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
def test_q8_0_blocks_too_small_for_an_fp32_reciprocal_store_a_zero_scale_like_gguf():
    # For amax < ~3.7e-37, 1/d overflows: gguf's codes are NaN cast to int8 (platform-defined garbage) and ours may
    # differ, but both store d = 0 in fp16, so the block dequantizes to zeros either way.
    weight = torch.full((1, 32), 1e-38)
    ours, reference = quantize_q8_0(weight), _gguf_q8_0(weight)
    assert torch.equal(ours[:, :2], reference[:, :2]) and not ours[:, :2].any()


def test_q8_0_of_a_bf16_weight_needs_no_float32_copy_from_the_caller():
    weight = torch.randn(64, 96).to(torch.bfloat16)
    assert torch.equal(quantize_q8_0(weight), _gguf_q8_0(weight))


# --- the synthetic build against the file-writer path ---

@pytest.fixture(scope="module")
def bf16_weights() -> dict[str, torch.Tensor]:
    """The tiny FLUX.1 synthetic bf16 state dict: the source the file writers quantize from."""
    return synthetic.random_state_dict(FLUX1, PRECISIONS["bf16"], "cpu", SEED, config=TINY_FLUX1)


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    return synthetic.config_dir(FLUX1.meta_transformer(TINY_FLUX1))


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_synthetic_build_equals_the_checkpoint_file_written_from_its_bf16_weights(
        precision, bf16_weights, config_folder, tmp_path):
    spec = PRECISIONS[precision]
    built, path = synthetic.build_transformer(FLUX1, spec, "cpu", SEED, config=TINY_FLUX1)
    assert path == f"seeded random {precision} state dict on cpu -> from_single_file"

    file = tmp_path / f"transformer{spec.suffix}"
    spec.write(dict(bf16_weights), tiny.quantized_keys(FLUX1, bf16_weights, spec.block_size), file, "flux")
    from_file = load_transformer(spec, FLUX1.builder.transformer_class, file, config_folder, torch.device("cpu"))

    _assert_same_tensors(built.state_dict(), from_file.state_dict())
    assert {type(m) for m in built.modules()} == {type(m) for m in from_file.modules()}
    output = _forward(FLUX1, built, TINY_FLUX1)
    assert output.shape == (1, 16, TINY_FLUX1["in_channels"]) and output.isfinite().all()
    assert torch.equal(output, _forward(FLUX1, from_file, TINY_FLUX1))


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_loader_takes_the_state_dict_tensors_without_copying_them(precision):
    # What keeps FLUX.2-dev in 80 GB: a copy on the way in would double the peak (120 GiB in bf16). On the CPU the
    # loader's device moves are the same no-ops as on a GPU when the tensors are already there.
    spec = PRECISIONS[precision]
    state_dict = synthetic.random_state_dict(FLUX1, spec, "cpu", SEED, config=TINY_FLUX1)
    storages = {_bits(t).untyped_storage().data_ptr() for t in state_dict.values()}
    transformer = synthetic.load(FLUX1, spec, state_dict, "cpu", config=TINY_FLUX1)
    copied = [key for key, tensor in transformer.state_dict().items()
              if _bits(tensor).untyped_storage().data_ptr() not in storages]
    assert copied == []


# --- determinism ---

def test_same_seed_builds_the_same_weights_and_another_seed_does_not():
    spec = PRECISIONS["nvfp4"]
    first = synthetic.random_state_dict(FLUX1, spec, "cpu", SEED, config=TINY_FLUX1)
    _assert_same_tensors(synthetic.random_state_dict(FLUX1, spec, "cpu", SEED, config=TINY_FLUX1), first)
    other = synthetic.random_state_dict(FLUX1, spec, "cpu", SEED + 1, config=TINY_FLUX1)
    assert not torch.equal(_bits(other["x_embedder.weight"]), _bits(first["x_embedder.weight"]))


def test_each_weight_depends_only_on_seed_and_key_not_on_the_other_tensors(bf16_weights):
    # A model with one block fewer draws every shared tensor identically, and a tensor drawn alone equals its
    # value in the whole state dict: no tensor depends on what was drawn before it.
    shallower = synthetic.random_state_dict(FLUX1, PRECISIONS["bf16"], "cpu", SEED,
                                            config={**TINY_FLUX1, "num_layers": 1, "num_single_layers": 1})
    assert shallower.keys() < bf16_weights.keys()
    _assert_same_tensors(shallower, {key: bf16_weights[key] for key in shallower})
    key = "single_transformer_blocks.1.proj_mlp.weight"
    alone = synthetic.random_tensor(key, bf16_weights[key].shape, SEED, "cpu")
    assert torch.equal(_bits(alone), _bits(bf16_weights[key]))


def test_weights_keep_activations_at_unit_scale(bf16_weights):
    weight = bf16_weights["transformer_blocks.0.ff.net.2.weight"].float()  # [128, 512]
    assert weight.std() * 512**0.5 == pytest.approx(1.0, rel=0.05)
    assert torch.equal(bf16_weights["transformer_blocks.0.attn.norm_q.weight"], torch.ones(64, dtype=torch.bfloat16))


# --- full size, on the meta device ---

FULL_PARAMETERS = {  # counted from the real checkpoints' configs (report: synthetic profile)
    "flux1-dev": 11_901_408_320,
    "flux1-kontext-dev": 11_901_408_320,
    "flux2-dev": 32_223_281_152,
    "z-image-turbo": 6_154_908_736,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_transformer_has_the_real_checkpoints_parameter_count(name):
    transformer = MODELS[name].meta_transformer()
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(FULL_PARAMETERS[name], rel=0.01)


FULL_VAE = {  # (class, parameters, latent channels)
    "flux1-dev": ("AutoencoderKL", 83_819_683, 16),
    "flux2-dev": ("AutoencoderKLFlux2", 84_046_115, 32),
    "z-image-turbo": ("AutoencoderKL", 83_819_683, 16),
}


@pytest.mark.parametrize("name", sorted(FULL_VAE))
def test_full_components_are_the_real_vae_and_scheduler_without_text_encoders(name):
    model = MODELS[name]
    components = model.builder.full_components("meta", torch.bfloat16)
    vae, (cls, parameters, channels) = components["vae"], FULL_VAE[name]
    assert type(vae).__name__ == cls and vae.config.latent_channels == channels
    assert sum(p.numel() for p in vae.parameters()) == parameters
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert all(components[key] is None for key in components if key.startswith(("text_encoder", "tokenizer")))
    pipe = synthetic.build_pipeline(model, model.meta_transformer(), "meta")
    assert type(pipe) is model.builder.pipeline_class and pipe.vae_scale_factor == 8


PROMPT_SHAPES = {
    "flux1-dev": {"prompt_embeds": (1, 512, 4096), "pooled_prompt_embeds": (1, 768)},
    "flux1-kontext-dev": {"prompt_embeds": (1, 512, 4096), "pooled_prompt_embeds": (1, 768)},
    "flux2-dev": {"prompt_embeds": (1, 512, 15360)},
    "z-image-turbo": {"prompt_embeds": [(25, 2560)]},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_prompt_inputs_have_the_real_encoders_shapes_at_unit_scale(name):
    inputs = MODELS[name].builder.prompt_inputs(SEED, "cpu", torch.bfloat16)
    shapes = {key: [tuple(t.shape) for t in v] if isinstance(v, list) else tuple(v.shape) for key, v in inputs.items()}
    assert shapes == PROMPT_SHAPES[name]
    embeds = inputs["prompt_embeds"][0] if name == "z-image-turbo" else inputs["prompt_embeds"]
    assert embeds.dtype == torch.bfloat16 and embeds.float().std() == pytest.approx(1.0, rel=0.05)


# --- end to end: the real pipelines with prompt embeddings and no text encoders ---

PIPELINE_PRECISION = {"flux1-dev": "nvfp4", "flux1-kontext-dev": "fp8-scaled", "flux2-dev": "gguf-q8_0",
                      "z-image-turbo": "bf16"}
TINY_TEXT_TOKENS = 16
SIZE_PX = 64


@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_runs_from_prompt_inputs_without_text_encoders(name):
    """The synthetic call: a synthetic transformer (tiny config), the tiny VAE and scheduler, text encoders and
    tokenizers None, and `prompt_inputs` in place of the prompt."""
    model = MODELS[name]
    config = model.builder.tiny_transformer_config
    transformer, _ = synthetic.build_transformer(model, PRECISIONS[PIPELINE_PRECISION[name]], "cpu", SEED, config)
    components = {key: None if key.startswith(("text_encoder", "tokenizer")) else value
                  for key, value in model.builder.tiny_components(SEED).items()}
    components["vae"].to(torch.bfloat16)
    pipe = model.builder.pipeline_class(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**model.builder.prompt_inputs(SEED, "cpu", torch.bfloat16, config, TINY_TEXT_TOKENS),
              "height": SIZE_PX, "width": SIZE_PX, "num_inference_steps": 2,
              "guidance_scale": model.tiny.guidance_scale, "generator": torch.Generator().manual_seed(0),
              "output_type": "np"}
    if model.needs_input_image:
        kwargs |= {"image": model.builder.input_image(SIZE_PX, SEED), "max_area": SIZE_PX**2, "_auto_resize": False}
    image = pipe(**kwargs).images[0]
    assert image.shape == (SIZE_PX, SIZE_PX, 3) and np.isfinite(image).all() and image.std() > 0.01


# --- the builders behind the model specs ---

@pytest.mark.parametrize("name", list(MODELS))
def test_only_an_editing_model_makes_an_input_image(name):
    model = MODELS[name]
    image = model.builder.input_image(SIZE_PX, SEED)
    assert (image is not None) == model.needs_input_image
    if image is not None:
        assert image.size == (SIZE_PX, SIZE_PX) and image.mode == "RGB"


def test_importing_the_models_and_the_matrix_imports_neither_torch_nor_diffusers():
    import subprocess
    import sys

    code = "import sys, fluxgate.matrix; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
