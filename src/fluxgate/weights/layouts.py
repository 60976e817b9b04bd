"""Adapters from the checkpoint layouts in circulation onto what diffusers' own loaders read.

`adapt(identity, path)` returns what `from_single_file` takes (the path itself, or a state dict) and a one-line note
of what was changed. Each adapter is the smallest mapping for its layout (`fluxgate.weights.identify` names the layouts):

- a key prefix (`model.diffusion_model.` and the like, safetensors or GGUF): stripped; a full ComfyUI checkpoint's
  tensors outside it (VAE, text encoders) are left out.
- `comfy-scaled-fp8` (legacy), `comfy-mixed-fp8` and `scalar-scale-fp8`: e4m3 weights with ONE fp32 scale per tensor (`scale_weight`
  or a scalar `weight_scale`) -> diffusers' BFL fp8r layout, whose `weight_scale` is per row `[N]`: the scalar is
  repeated for every row (exact: the same number). convert_to_quant's row-wise fp8 (`comfy-rowwise-fp8`:
  `weight_scale` [N] marked `float8_e4m3fn_rowwise`; `comfy-scaled-fp8-rowwise`: legacy `scale_weight` [N] beside
  `scaled_fp8`) already holds fp8r's numbers: renamed to `weight_scale`, markers dropped. A static activation scale
  (`input_scale`, legacy `scale_input`: one fp32 number, ComfyUI's `convert_old_quants` renames the one to the other)
  is kept as `input_scale` `[]`: diffusers' `BFLFP8RLinear` does not use it (it scales each input row at run time),
  the `comfy` backend quantizes inputs with it as ComfyUI does (`precisions.fp8_scaled.keep_fp8r_input_scales`).
  A layer ComfyUI runs in full precision (`full_precision_matrix_mult`, a two-element legacy `scaled_fp8`) is marked
  by `<layer>.full_precision_matrix_mult` (a mark no file can carry), which reaches the loaded layer; the `comfy`
  backend then dequantizes it for a bf16 GEMM, as ComfyUI does. ComfyUI's `comfy_quant` markers are dropped.
- `comfy-nvfp4` -> ModelOpt NVFP4 (what diffusers' BFL nvfp4 quantizer reads), for the layers the header's
  `_quantization_metadata` or `comfy_quant` tensors mark (`identify.comfy_layers`, as ComfyUI's `convert_old_quants`):
  the two E2M1 values of each byte swapped (comfy-kitchen packs the first value in the HIGH nibble, ModelOpt in the
  LOW one), the E4M3 block scales taken out of cuBLAS's 128x4-tile layout into row-major `[N, K/16]` (comfy-kitchen
  `to_blocked`: a scale at row r, column c of the padded `[ceil128(N), ceil4(K/16)]` matrix sits at tile
  (r // 128, c // 4), offset (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4 of the tile's 512). A missing
  `input_scale` (ComfyUI computes activation scales at run time) is given as 1.0, since diffusers' loader requires
  the key: only an FP4 GEMM reads it, and the note says so.
- GGUF: a tensor no `GGUFLinear` holds (not a 2-D `.weight`: norms, Z-Image's pad tokens) stored in a type such as
  BF16 is dequantized to a plain tensor (ComfyUI-GGUF's loader does so for 1-D BF16; BF16 to float is exact), and
  Z-Image's `x_pad_token` / `cap_pad_token`, `[1, dim]` in the model, come back to that shape when stored flattened
  `[dim]` (llama.cpp's quantize writes `ggml_n_dims` dimensions, dropping the trailing 1; city96's tools/lcpp.patch
  leaves lumina2's non-2-D tensors unquantized).
- BFL's `.sft` files (safetensors under another extension, which diffusers' loader would hand to torch.load): read
  with safetensors and given as a state dict.
Everything else is passed to diffusers as the file it is. Any failure reading the tensors is a FixtureError naming the
file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxgate.errors import FixtureError
from fluxgate.weights.headers import read_safetensors_header
from fluxgate.weights.formats import comfy_layer_configs, comfy_layers, full_precision_layers
from fluxgate.weights.identify import Identity
from fluxgate.precisions.spec import FULL_PRECISION_KEY, FULL_PRECISION_MARK, static_activation_scale

NVFP4_BLOCK = 16


def blocked_to_rows(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS 128x4-tiled block scales `[ceil128(rows), ceil4(cols)]` (any 1-byte dtype) -> row-major `[rows, cols]`
    of the same dtype. Raises ValueError when the shape is not the tiled shape of `[rows, cols]`."""
    prow, pcol = -(-rows // 128) * 128, -(-cols // 4) * 4
    if tuple(blocked.shape) != (prow, pcol):
        raise ValueError(f"tiled block scales of a [{rows}, {cols}] matrix are [{prow}, {pcol}], got "
                         f"{list(blocked.shape)}")
    r = torch.arange(prow)[:, None]
    c = torch.arange(pcol)[None, :]
    offset = ((r // 128) * (pcol // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    flat = blocked.reshape(-1).view(torch.uint8)
    return flat[offset.reshape(-1)].reshape(prow, pcol)[:rows, :cols].contiguous().view(blocked.dtype)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes with their two 4-bit halves exchanged (high-first E2M1 pairs <-> low-first)."""
    return ((packed & 0x0F) << 4) | (packed >> 4)


def comfy_nvfp4_to_modelopt(state_dict: dict, layers, path: Path) -> tuple[dict, int]:
    """The state dict with every ComfyUI NVFP4 linear of `layers` (layer names, no `.weight`) in the ModelOpt layout
    and its `comfy_quant` markers dropped; returns it and how many linears had no `input_scale`. Raises FixtureError
    naming the file and tensor when a layer's tensors do not fit."""
    out = {key: value for key, value in state_dict.items() if not key.endswith(".comfy_quant")}
    missing_input_scale = 0
    for layer in layers:
        weight, scale = state_dict.get(f"{layer}.weight"), state_dict.get(f"{layer}.weight_scale")
        if weight is None or scale is None or weight.dtype != torch.uint8 or weight.ndim != 2:
            raise FixtureError(f"{path}: {layer}: an nvfp4 layer needs a uint8 [N, K/2] weight and a weight_scale")
        rows, cols = weight.shape[0], weight.shape[1] * 2 // NVFP4_BLOCK
        try:
            out[f"{layer}.weight_scale"] = blocked_to_rows(scale, rows, cols)
        except ValueError as error:
            raise FixtureError(f"{path}: {layer}.weight_scale: {error}") from None
        out[f"{layer}.weight"] = swap_nibbles(weight)
        if f"{layer}.input_scale" not in state_dict:
            out[f"{layer}.input_scale"] = torch.tensor(1.0, dtype=torch.float32)
            missing_input_scale += 1
    return out, missing_input_scale


def fp8_scales_to_fp8r(state_dict: dict, path: Path, full_precision: set[str] = frozenset()) -> tuple[dict, int]:
    """e4m3 weights with one fp32 scale per tensor or per row (`scale_weight` or `weight_scale`, `[]`, `[1]` or
    `[N]`) -> fp8r's `weight_scale` `[N]` fp32 (a scalar repeated per row); a static activation scale (`input_scale`
    or `scale_input`, `[]` or `[1]`) -> `input_scale` `[]` fp32; each layer of `full_precision` (the ones ComfyUI
    runs dequantized, `formats.full_precision_layers`) marked `<layer>.full_precision_matrix_mult`:
    `spec.FULL_PRECISION_MARK`, not a tensor (`precisions.fp8_scaled.keep_full_precision_marks` moves it onto the
    loaded layer); ComfyUI markers dropped. Returns
    it and the linears changed. Raises FixtureError naming the tensor for a scale of another shape, without an e4m3
    weight, or (an activation scale) not a finite number above 0."""
    out, changed = {}, 0
    for layer in full_precision:
        if f"{layer}.weight" in state_dict:
            out[f"{layer}.{FULL_PRECISION_KEY}"] = FULL_PRECISION_MARK
    for key, value in state_dict.items():
        if key == "scaled_fp8" or key.endswith(".comfy_quant"):
            continue
        if key.endswith((".scale_input", ".input_scale")):
            layer = key.rsplit(".", 1)[0]
            if f"{layer}.scale_input" in state_dict and f"{layer}.input_scale" in state_dict:
                raise FixtureError(f"{path}: {layer} has both scale_input and input_scale; which one ComfyUI would "
                                   "use is not defined")
            out[f"{layer}.input_scale"] = _activation_scale(key, value, state_dict.get(f"{layer}.weight"), path)
            continue
        if key.endswith((".scale_weight", ".weight_scale")):
            layer = key.rsplit(".", 1)[0]
            weight = state_dict.get(f"{layer}.weight")
            if weight is None or weight.dtype != torch.float8_e4m3fn:
                raise FixtureError(f"{path}: {key} is an fp8 scale without an e4m3 `{layer}.weight`")
            rows = weight.shape[0]
            if value.numel() != 1 and tuple(value.shape) != (rows,):
                raise FixtureError(f"{path}: {key} has shape {list(value.shape)}; an fp8 scale is one number or "
                                   f"one per row ([{rows}])")
            out[f"{layer}.weight_scale"] = value.float().reshape(-1).expand(rows).contiguous()
            changed += 1
            continue
        out[key] = value
    return out, changed


def _activation_scale(key: str, value: torch.Tensor, weight: torch.Tensor | None, path: Path) -> torch.Tensor:
    """A linear's static activation scale as fp32 `[]` (`fp8_scales_to_fp8r`, `spec.static_activation_scale`);
    FixtureError naming the tensor when it is not one finite number above 0 or has no e4m3 weight beside it."""
    if weight is None or weight.dtype != torch.float8_e4m3fn:
        raise FixtureError(f"{path}: {key} is an activation scale without an e4m3 `{key.rsplit('.', 1)[0]}.weight`")
    try:
        return static_activation_scale(key, value)
    except ValueError as error:
        raise FixtureError(f"{path}: {error}") from None


PAD_TOKENS = ("x_pad_token", "cap_pad_token")  # Z-Image's `[1, dim]` parameters (diffusers and Tongyi keys alike)


def gguf_plain_tensors(state_dict: dict) -> tuple[dict, list[str]]:
    """A GGUF state dict (diffusers' `load_gguf_checkpoint`) with the tensors no GGUFLinear holds made plain and
    Z-Image's flattened pad tokens given their `[1, dim]` shape (module docs); returns it and notes of what changed."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    out, plain, reshaped = {}, [], []
    for key, value in state_dict.items():
        if isinstance(value, GGUFParameter) and (not key.endswith(".weight") or value.ndim < 2
                                                 or key.endswith(PAD_TOKENS)):
            plain.append(f"{key} ({value.quant_type.name})")
            value = dequantize_gguf_tensor(value).to(torch.bfloat16)
        if key.endswith(PAD_TOKENS) and value.ndim == 1:
            reshaped.append(key)
            value = value.reshape(1, -1)
        out[key] = value
    notes = []
    if plain:
        notes.append(f"{len(plain)} tensors no GGUF linear holds made plain: {', '.join(plain)}")
    if reshaped:
        notes.append(f"flattened {', '.join(reshaped)} given shape [1, dim]")
    return out, notes


def _model_part(state_dict: dict, prefix: str) -> tuple[dict, int]:
    """The tensors under `prefix`, without it, and how many others were left out."""
    if not prefix:
        return state_dict, 0
    model = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return model, len(state_dict) - len(model)


def _load(path: Path) -> dict:
    if path.suffix == ".gguf":
        from diffusers.models.model_loading_utils import load_gguf_checkpoint  # after identify's bounded read

        return load_gguf_checkpoint(str(path))
    from safetensors.torch import load_file

    return load_file(str(path))


SCALED_FP8 = ("comfy-scaled-fp8", "comfy-mixed-fp8", "scalar-scale-fp8", "comfy-rowwise-fp8", "comfy-scaled-fp8-rowwise")


def adapt(identity: Identity, path: Path) -> tuple[Path | dict, str]:
    """What to hand diffusers' `from_single_file` for this checkpoint, and a note of any change made (module docs).
    Raises FixtureError, one line naming the file, for tensors that cannot be read or do not fit their layout."""
    path = Path(path)
    if not (identity.prefix or identity.layout in (*SCALED_FP8, "comfy-nvfp4") or path.suffix != ".safetensors"):
        return path, "checkpoint file -> from_single_file"
    try:
        return _adapted(identity, path)
    except FixtureError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors, gguf-py and torch fail in many ways on a damaged file
        raise FixtureError(f"{path}: cannot read its tensors as {identity.layout} ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]})") from None


def _adapted(identity: Identity, path: Path) -> tuple[dict, str]:
    state_dict, left_out = _model_part(_load(path), identity.prefix)
    changes = [f"key prefix '{identity.prefix}' stripped"] if identity.prefix else []
    if left_out:
        changes.append(f"{left_out} tensors outside it left out")
    if path.suffix == ".gguf":
        state_dict, notes = gguf_plain_tensors(state_dict)
        changes += notes
    if identity.layout in SCALED_FP8:
        header, metadata = read_safetensors_header(path)
        configs, _ = comfy_layer_configs(path, header, metadata, identity.prefix)
        full = full_precision_layers(configs, header, metadata, identity.prefix)
        state_dict, count = fp8_scales_to_fp8r(state_dict, path, full)
        changes.append(f"{identity.layout} -> fp8r: {count} scales as per-row weight_scale")
        if full:
            changes.append(f"{len(full)} layers marked full_precision_matrix_mult (the comfy backend runs them "
                           "dequantized, as ComfyUI does)")
        kept = sum(key.endswith(".input_scale") for key in state_dict)
        if kept:
            changes.append(f"{kept} static input_scale kept (the comfy backend quantizes inputs with them)")
    elif identity.layout == "comfy-nvfp4":
        header, metadata = read_safetensors_header(path)
        layers, _ = comfy_layers(path, header, metadata, identity.prefix)
        state_dict, missing = comfy_nvfp4_to_modelopt(state_dict, layers, path)
        changes.append(f"comfy-nvfp4 -> ModelOpt layout: {len(layers)} linears (nibbles swapped, tiled block scales "
                       "to rows)")
        if missing:
            changes.append(f"{missing} linears had no input_scale (ComfyUI scales activations at run time): 1.0 given, "
                           "read only by FP4 GEMMs")
    as_is = "GGUF tensors as they are" if path.suffix == ".gguf" else f"{path.suffix} read as safetensors"
    return state_dict, "; ".join(changes or [as_is]) + " -> from_single_file"

