"""ComfyUI "scaled fp8" checkpoints onto diffusers' fp8 path.

ComfyUI's layout: each quantized linear has `weight` float8_e4m3fn `[N, K]` and a per-tensor fp32 `scale_weight`
(a scalar or `[1]`: weight = fp8 * scale_weight), sometimes a `scale_input`, and the file carries an empty marker
tensor `scaled_fp8`. diffusers' BFL `fp8r` layout wants a per-row fp32 `weight_scale` `[N]`, so the scalar is
broadcast to every row; `scale_input` (static activation scaling) has no counterpart there and is dropped. The key
names stay as they are: `from_single_file` converts original-format keys, and the BFL quantizer keeps the scales
with their rows through that conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxgate.errors import FixtureError

MARKER = "scaled_fp8"


def is_scaled_fp8(path: Path) -> bool:
    """True for a safetensors file carrying ComfyUI's `scaled_fp8` marker (reads only the header)."""
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return MARKER in handle.keys()
    except Exception as error:  # noqa: BLE001 - a header safetensors cannot parse is a broken file
        raise FixtureError(f"{path}: unreadable safetensors header ({type(error).__name__}: {error})") from None


def to_fp8r(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rewrite ComfyUI scaled-fp8 tensors into the fp8r layout (`weight_scale` per row); other tensors unchanged."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == MARKER or key.endswith(".scale_input"):
            continue
        if key.endswith(".scale_weight"):
            prefix = key.removesuffix(".scale_weight")
            weight = state_dict.get(f"{prefix}.weight")
            if weight is None or weight.dtype != torch.float8_e4m3fn or value.numel() != 1:
                raise FixtureError(f"{path}: {key} must be a scalar scale of an e4m3 `{prefix}.weight`")
            converted[f"{prefix}.weight_scale"] = value.float().reshape(()).expand(weight.shape[0]).contiguous()
            continue
        converted[key] = value
    return converted


def load_scaled_fp8(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in diffusers' fp8r layout, ready for `from_single_file(state_dict, ...)`."""
    return to_fp8r(load_file(str(path)), path)
