"""The synthetic profile: each model's real full-size transformer with seeded random weights, made on the device and
loaded through diffusers' own single-file loader into the same quantized layers a real checkpoint gets.

Every state-dict tensor is drawn on the device from its own generator, seeded by (seed, key), so its value does not
depend on which other tensors exist or in which order they are made. A linear weight the precision quantizes is
quantized into the loader's layout right after it is drawn, so on the way to a smaller precision the device never
holds more than one bf16 weight (and its fp32 transients). `from_single_file` keeps tensors that are already on the
target device where they are (checked in tests/test_synthetic.py), so the peak is the state dict itself plus the
transients of the largest weight: FLUX.2-dev (32.2B parameters, 60 GiB in bf16) fits an 80 GB GPU in every precision.

Loader layouts (the tensors each precision's file writer in `precisions` stores, here kept in memory):
- `bf16`: every tensor bfloat16.
- `fp8-scaled`: `weight` float8_e4m3fn `[N, K]` and fp32 per-row `weight_scale` `[N]`.
- `gguf-q8_0`: `weight` a GGUFParameter of Q8_0 bytes, uint8 `[N, K/32*34]` (see `quantize_q8_0`).
- `nvfp4`: `weight` uint8 `[N, K/2]`, float8_e4m3fn `weight_scale` `[N, K/16]`, fp32 scalars `weight_scale_2` and
  `input_scale`.
Everything that is not quantized (embedders, norms, final layers, biases) is bfloat16.

On the CPU every quantized tensor is byte-identical to what the file writer makes from the same bf16 weights. On CUDA,
Q8_0 still is, but diffusers' fp8r and nvfp4 quantizers divide by Python floats, which CUDA computes as a multiply by
the reciprocal: some scales land one ulp away from the CPU's (and ~0.1 % of fp8 codes with them). Weights drawn on a
GPU differ from those drawn on the CPU anyway (another generator); the build is deterministic on one device type.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import torch
from diffusers.quantizers.gguf.utils import GGUFParameter

from fluxgate.files import atomic_write
from fluxgate.models import ModelSpec
from fluxgate.weights.precisions import PrecisionSpec, fp8r_tensors, load_transformer, nvfp4_tensors
from fluxgate.weights.tiny import quantized_linear_keys

StateDict = dict[str, torch.Tensor]
DTYPE = torch.bfloat16  # what the pipelines compute in, and the precision of every unquantized tensor
BIAS_STD = 0.02
Q8_0_BLOCK = 32  # values per Q8_0 block, stored as 34 bytes: an fp16 scale, then 32 int8 codes
_Q8_0_CHUNK_BLOCKS = 1 << 20  # blocks quantized at a time: bounds the fp32 transients to ~0.5 GB


def device_of(device: torch.device | str) -> torch.device:
    """`device` with its index: a tensor on cuda:0 is "already there" for the loader only if it asks for cuda:0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seeded_module(build: Callable[[], torch.nn.Module], seed: int, device: torch.device | str,
                  dtype: torch.dtype) -> torch.nn.Module:
    """`build()` with its class's own init, created on `device` under `seed` (the caller's RNG state is restored),
    cast to `dtype`, in eval mode. For the small full-size components (the VAE: ~84M parameters)."""
    device = device_of(device)
    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        module = build()
    return module.to(dtype).eval()


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def random_tensor(key: str, shape: torch.Size, seed: int, device: torch.device | str) -> torch.Tensor:
    """The bf16 value of state-dict entry `key`, drawn on `device` from a generator seeded by (seed, key) alone.

    Weights of 2+ dims ~ N(0, 1/fan_in), so every linear keeps its input's scale and the AdaLN gates come out O(1)
    as in a trained model (the class init's U(+-1/sqrt(fan_in)) shrinks each layer's output 3x in variance);
    1-D weights (norm scales) are 1; biases ~ N(0, 0.02^2); anything else (pad tokens) ~ N(0, 1).
    """
    device = device_of(device)
    if key.endswith(".weight") and len(shape) == 1:
        return torch.ones(shape, dtype=DTYPE, device=device)
    if key.endswith(".weight"):
        std = 1 / math.sqrt(math.prod(shape[1:]))
    else:
        std = BIAS_STD if key.endswith(".bias") else 1.0
    generator = torch.Generator(device=device).manual_seed(_key_seed(seed, key))
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(std)
    return values.to(DTYPE)


def _q8_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """fp32 `[B, 32]` -> uint8 `[B, 34]`, step for step gguf.quants.Q8_0.quantize_blocks (ggml's reference)."""
    # Divide by a tensor, not the Python number 127: CUDA computes tensor / scalar as tensor * (1 / scalar), which
    # can land one ulp away from the correctly rounded quotient that numpy (and the CPU) computes.
    amax = blocks.abs().amax(dim=1, keepdim=True)
    scale = amax / amax.new_tensor(127.0)
    inverse = torch.where(scale == 0, torch.zeros_like(scale), scale.reciprocal())
    scaled = blocks * inverse
    # np_roundf: round half away from zero, computed as floor(a) + floor(2 * (a - floor(a))). floor(a + 0.5) is not
    # the same: a + 0.5 can round up in fp32 (0.49999997 + 0.5 == 1.0).
    magnitude = scaled.abs()
    whole = magnitude.floor()
    codes = (whole + torch.floor(2 * (magnitude - whole))).copysign(scaled)
    return torch.cat([scale.to(torch.float16).view(torch.uint8), codes.to(torch.int8).view(torch.uint8)], dim=1)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """`[N, K]` float weight (K a multiple of 32) -> GGUF Q8_0 bytes, uint8 `[N, K/32*34]`, on the weight's device.

    Per block of 32 values along K: the fp16 scale d = amax/127 (2 bytes, little-endian), then 32 int8 codes
    round(x * (1/d)) rounded half away from zero; an all-zero block has d = 0 and zero codes. The fp32 arithmetic is
    gguf.quants.quantize's, so the bytes are identical to it (tests/test_synthetic.py).
    """
    rows, cols = weight.shape
    blocks = weight.reshape(rows * cols // Q8_0_BLOCK, Q8_0_BLOCK)
    out = torch.empty(blocks.shape[0], Q8_0_BLOCK + 2, dtype=torch.uint8, device=weight.device)
    for start in range(0, blocks.shape[0], _Q8_0_CHUNK_BLOCKS):  # blocks are independent: chunking changes no byte
        out[start:start + _Q8_0_CHUNK_BLOCKS] = _q8_0_blocks(blocks[start:start + _Q8_0_CHUNK_BLOCKS].float())
    return out.reshape(rows, cols // Q8_0_BLOCK * (Q8_0_BLOCK + 2))


def _q8_0_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    return {f"{prefix}.weight": GGUFParameter(quantize_q8_0(weight), quant_type=gguf.GGMLQuantizationType.Q8_0)}


# Precision name -> (linear prefix, bf16 weight) -> its tensors in the loader's layout. bf16 quantizes nothing.
_LAYOUTS: dict[str, Callable[[str, torch.Tensor], StateDict]] = {
    "fp8-scaled": fp8r_tensors,
    "gguf-q8_0": _q8_0_tensors,
    "nvfp4": nvfp4_tensors,
}


def meta_transformer(model: ModelSpec, config: dict | None = None) -> torch.nn.Module:
    """The transformer's module tree on the meta device (no memory): its keys, shapes and config."""
    with torch.device("meta"):
        return model.module.TRANSFORMER_CLASS(**(config or model.module.FULL_TRANSFORMER_CONFIG))


def random_state_dict(model: ModelSpec, precision: PrecisionSpec, device: torch.device | str, seed: int,
                      config: dict | None = None) -> StateDict:
    """The transformer's state dict in `precision`'s loader layout, every tensor made on `device` (module docstring).

    `config` overrides the full-size config (tests use the tiny one). Quantized weights are those real quantized
    checkpoints quantize (`tiny.quantized_linear_keys`), made from the same bf16 values the bf16 state dict holds.
    """
    config = config or model.module.FULL_TRANSFORMER_CONFIG
    meta = meta_transformer(model, config)
    shapes = meta.state_dict()
    layout = _LAYOUTS.get(precision.name)
    if layout is None and precision.name != "bf16":
        raise ValueError(f"{precision.name}: the synthetic profile has no in-memory layout for this precision; "
                         f"add one to fluxgate.weights.synthetic._LAYOUTS")
    quantize = quantized_linear_keys(meta, model.quantized_blocks, precision.block_size) if layout else set()
    state_dict: StateDict = {}
    for key, meta in shapes.items():
        if not meta.is_floating_point():
            state_dict[key] = torch.zeros(meta.shape, dtype=meta.dtype, device=device_of(device))
        elif key in quantize:
            state_dict.update(layout(key.removesuffix(".weight"), random_tensor(key, meta.shape, seed, device)))
        else:
            state_dict[key] = random_tensor(key, meta.shape, seed, device)
    return state_dict


def config_dir(transformer: torch.nn.Module) -> Path:
    """A folder holding the transformer's config.json, for `from_single_file(config=...)`; one per distinct config,
    kept in the temp dir (the config of a meta instance is all it needs)."""
    text = transformer.to_json_string()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fluxgate-synthetic-configs" / f"{type(transformer).__name__}-{digest}"
    if not (folder / "config.json").is_file():
        atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text))
    return folder


def load(model: ModelSpec, precision: PrecisionSpec, state_dict: StateDict, device: torch.device | str,
         config: dict | None = None) -> torch.nn.Module:
    """`state_dict` (already on `device`) through `from_single_file` with `precision`'s quantization config: the
    loader swaps in its quantized linears and takes the tensors as they are, without copying them."""
    folder = config_dir(meta_transformer(model, config))
    return load_transformer(precision, model.module.TRANSFORMER_CLASS, state_dict, folder, device_of(device),
                            DTYPE, name=f"synthetic {model.name}[{precision.name}] state dict")


def build_transformer(model: ModelSpec, precision: PrecisionSpec, device: torch.device | str, seed: int,
                      config: dict | None = None) -> tuple[torch.nn.Module, str]:
    """The model's transformer (full size unless `config` says otherwise) with seeded random weights, in `precision`,
    on `device`, loaded by diffusers' own loader; and a line saying how it was made."""
    device = device_of(device)
    transformer = load(model, precision, random_state_dict(model, precision, device, seed, config), device, config)
    return transformer, f"seeded random {precision.name} state dict on {device} -> from_single_file"


def build_pipeline(model: ModelSpec, transformer: torch.nn.Module, device: torch.device | str, seed: int = 0):
    """The model's diffusers pipeline: `transformer` plus the full-size components (`full_components`) on `device`.
    Call it with the model's `prompt_inputs` in place of a prompt."""
    components = model.module.full_components(device_of(device), DTYPE, seed)
    return model.module.PIPELINE_CLASS(transformer=transformer, **components)
