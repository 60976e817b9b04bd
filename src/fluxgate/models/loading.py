"""How a denoiser is loaded from a checkpoint when its builder does not say otherwise (`ModelBuilder.load_transformer`'s
default, `load_default`): through diffusers' single-file loader where the class has one, else from its config.

diffusers' `from_single_file` exists only for the classes of its single-file registry
(`diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES`: FLUX, SD3, UNet2DConditionModel, ...); it also
converts original (ComfyUI, BFL) key layouts and swaps in quantized layers from a quantization config. Any other
diffusers class (PixArtTransformer2DModel, ...) is built from its config with empty weights (no memory, no random
init) and the checkpoint's state dict is assigned to it: that reads a file in diffusers' own key names in a plain
dtype, which is what the bf16 file and every load-then-transform backend (that loads the bf16 file) need. A format
whose loading needs a quantization config cannot go that way: the combo is skipped, saying why.

Imports torch, diffusers and accelerate: only code that loads weights imports it.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from safetensors.torch import load_file

from fluxgate.errors import FixtureError, SkipCombo

StateDict = dict[str, torch.Tensor]
SHOWN_KEYS = 3  # how many missing or unexpected keys an error names


def has_single_file_loader(transformer_class: type) -> bool:
    """Whether diffusers' `from_single_file` can load `transformer_class`: the class has the method and is (a subclass
    of) one of diffusers' single-file registry's classes (otherwise the method raises ValueError)."""
    return hasattr(transformer_class, "from_single_file") and any(
        base.__name__ in SINGLE_FILE_LOADABLE_CLASSES for base in transformer_class.__mro__)


def load_default(transformer_class: type, checkpoint: Path | StateDict, config: Path | str, *,
                 device: torch.device, dtype: torch.dtype, quantization_config: object | None = None,
                 subfolder: str | None = None) -> torch.nn.Module:
    """`transformer_class` loaded from `checkpoint` (a file, or an in-memory state dict) with the model config in
    `config` (a local folder or a cached Hub id, its `subfolder`), on `device` in `dtype`, in eval mode: through
    `from_single_file` (with `quantization_config`) where the class has a single-file loader, else
    `load_state_dict_into_class`. Raises SkipCombo (one line, naming the class and the config) when a quantization
    config is asked of a class without a single-file loader; what the loaders raise otherwise."""
    if has_single_file_loader(transformer_class):
        return transformer_class.from_single_file(
            checkpoint if isinstance(checkpoint, dict) else str(checkpoint), config=str(config), subfolder=subfolder,
            torch_dtype=dtype, local_files_only=True, device=device, quantization_config=quantization_config)
    if quantization_config is not None:
        raise SkipCombo(f"{transformer_class.__name__} has no diffusers single-file loader (diffusers "
                        f"{diffusers.__version__}), which loading with {type(quantization_config).__name__} needs; its "
                        "builder's load_transformer can load it otherwise")
    return load_state_dict_into_class(transformer_class, checkpoint, config, device=device, dtype=dtype,
                                      subfolder=subfolder)


def load_state_dict_into_class(transformer_class: type, checkpoint: Path | StateDict, config: Path | str, *,
                               device: torch.device, dtype: torch.dtype,
                               subfolder: str | None = None) -> torch.nn.Module:
    """`transformer_class` built from its config (`config`: a folder holding config.json, or a cached Hub id, and its
    `subfolder`) with empty parameters (buffers computed as the class makes them), then `checkpoint`'s tensors
    assigned as its parameters (`load_state_dict(strict=True, assign=True)`: tensors already on `device` in `dtype`
    are taken without a copy), moved to `device` in `dtype`, in eval mode. `checkpoint` is a safetensors file or a
    state dict under diffusers' key names. Raises FixtureError (one line) naming the missing and unexpected keys when
    the checkpoint's keys are not the class's (an original ComfyUI/BFL layout needs diffusers' single-file
    converters), RuntimeError for a tensor of the wrong shape, OSError for an unreadable file or config."""
    settings = transformer_class.load_config(str(config), subfolder=subfolder, local_files_only=True)
    with init_empty_weights():
        model = transformer_class.from_config(settings)
    state_dict = checkpoint if isinstance(checkpoint, dict) else load_file(str(checkpoint), device=str(device))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise FixtureError(f"{transformer_class.__name__} is loaded by its state dict, without diffusers' single-file "
                           f"converters, so the checkpoint must hold diffusers' key names: {_some(missing)} missing, "
                           f"{_some(unexpected)} unexpected")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def _some(keys: list[str]) -> str:
    """`3 keys (a, b, c, ...)`: how many and the first few."""
    if not keys:
        return "no keys"
    shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} key{'s' if len(keys) > 1 else ''} ({shown})"
