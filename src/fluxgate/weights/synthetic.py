"""The synthetic profile: each model's real full-size transformer with seeded random weights, made on the device and
loaded through diffusers' own single-file loader into the same quantized layers a real checkpoint gets.

Every state-dict tensor is drawn on the device from its own generator, seeded by (seed, key), so its value does not
depend on which other tensors exist or in which order they are made. A linear weight the precision quantizes is
quantized into the loader's layout right after it is drawn, so on the way to a smaller precision the device never
holds more than one bf16 weight (and its fp32 transients). `from_single_file` keeps tensors that are already on the
target device where they are (checked in tests/test_synthetic.py), so the peak is the state dict itself plus the
transients of the largest weight: FLUX.2-dev (32.2B parameters, 60 GiB in bf16) fits an 80 GB GPU in every precision.

Loader layouts: each precision's `PrecisionSpec.layout` (documented in its module under `fluxgate.precisions`), the
tensors its file writer stores, here kept in memory. Everything that is not quantized (embedders, norms, final layers,
biases) is bfloat16.

On the CPU every quantized tensor is byte-identical to what the file writer makes from the same bf16 weights. On CUDA,
Q8_0 still is, but diffusers' fp8r and nvfp4 quantizers divide by Python floats, which CUDA computes as a multiply by
the reciprocal: some scales land one ulp away from the CPU's (and ~0.1 % of fp8 codes with them). Weights drawn on a
GPU differ from those drawn on the CPU anyway (another generator); the build is deterministic on one device type.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from fluxgate.errors import SkipCombo
from fluxgate.files import atomic_write
from fluxgate.matrix import Combo
from fluxgate.models import ModelSpec, pipeline
from fluxgate.models.seeding import device_of
from fluxgate.precisions import DTYPE, PrecisionSpec
from fluxgate.precisions.spec import StateDict
from fluxgate.weights.loading import load_transformer, loader_name

BIAS_STD = 0.02


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


def random_state_dict(model: ModelSpec, precision: PrecisionSpec, device: torch.device | str, seed: int,
                      config: dict | None = None) -> StateDict:
    """The transformer's state dict in `precision`'s loader layout, every tensor made on `device` (module docstring).

    `config` overrides the full-size config (tests use the tiny one). Quantized weights are those real quantized
    checkpoints quantize (`ModelSpec.quantized_linear_keys`), made from the same bf16 values the bf16 state dict
    holds.
    """
    skeleton = model.meta_transformer(config)
    shapes = skeleton.state_dict()
    layout = precision.layout
    quantize = model.quantized_linear_keys(skeleton, precision.block_size) if layout else set()
    state_dict: StateDict = {}
    for key, meta in shapes.items():
        if not meta.is_floating_point():
            state_dict[key] = torch.zeros(meta.shape, dtype=meta.dtype, device=device_of(device))
        elif layout is not None and key in quantize:
            state_dict.update(layout(key.removesuffix(".weight"), random_tensor(key, meta.shape, seed, device)))
        else:
            state_dict[key] = random_tensor(key, meta.shape, seed, device)
    return state_dict


def config_dir(transformer: torch.nn.Module) -> Path:
    """A folder holding the transformer's config.json, for the loader's `config`; one per distinct config,
    kept in the temp dir (the config of a meta instance is all it needs)."""
    text = transformer.to_json_string()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "fluxgate-synthetic-configs" / f"{type(transformer).__name__}-{digest}"
    if not (folder / "config.json").is_file():
        atomic_write(folder / "config.json", lambda tmp: tmp.write_text(text))
    return folder


def load(model: ModelSpec, precision: PrecisionSpec, state_dict: StateDict, device: torch.device | str,
         config: dict | None = None) -> torch.nn.Module:
    """`state_dict` (already on `device`) through the model's loader (`ModelBuilder.load_transformer`; by default
    `from_single_file` with `precision`'s quantization config, which swaps in its quantized linears) taking the tensors
    as they are, without copying them."""
    folder = config_dir(model.meta_transformer(config))
    return load_transformer(precision, model.builder, state_dict, folder, device_of(device),
                            DTYPE, name=f"synthetic {model.name}[{precision.name}] state dict")


def build_transformer(model: ModelSpec, precision: PrecisionSpec, device: torch.device | str, seed: int,
                      config: dict | None = None) -> tuple[torch.nn.Module, str]:
    """The model's transformer (full size unless `config` says otherwise) with seeded random weights, in `precision`,
    on `device`, loaded by diffusers' own loader; and a line saying how it was made."""
    device = device_of(device)
    transformer = load(model, precision, random_state_dict(model, precision, device, seed, config), device, config)
    return transformer, f"seeded random {precision.name} state dict on {device} -> {loader_name(model.builder)}"


def build_pipeline(model: ModelSpec, transformer: torch.nn.Module, device: torch.device | str, seed: int = 0):
    """The model's diffusers pipeline: `transformer` plus the full-size components (`full_components`) on `device`.
    Call it with the model's `prompt_inputs` in place of a prompt."""
    return pipeline(model, transformer, model.builder.full_components(device_of(device), DTYPE, seed))


class SyntheticSource:
    """The synthetic profile's `sources.Source`: full-size real architectures with seeded random weights built on a
    CUDA device (`build_transformer`), the full-size VAE, and the prompt as embeddings (`prompt_inputs`)."""

    def __init__(self, seed: int):
        self.seed = seed

    def transformer(self, combo: Combo, device: torch.device) -> tuple[torch.nn.Module, dict]:
        if device.type != "cuda":
            raise SkipCombo(f"{combo.id}: the synthetic profile builds full-size models on a CUDA device "
                            "(use --profile tiny on CPU)")
        transformer, path = build_transformer(combo.model_spec, combo.precision_spec, device, self.seed)
        return transformer, {"path": path, "seed": self.seed}

    def components(self, model: ModelSpec, device: torch.device) -> dict[str, Any]:
        return model.builder.full_components(device, DTYPE)

    def prompt_kwargs(self, model: ModelSpec, prompt: str, device: torch.device) -> dict:
        """Text-encoder outputs at their real shapes, drawn from a seed made of the weight seed and the prompt's text:
        each case gets its own, the same on every machine (`ModelBuilder.prompt_inputs`)."""
        return model.builder.prompt_inputs(_key_seed(self.seed, f"prompt:{prompt}"), device, DTYPE)
