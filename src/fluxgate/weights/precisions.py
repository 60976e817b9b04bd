"""Weight precisions: how each one writes a real checkpoint file and loads it through diffusers' own loader.

Adding a precision is one `PrecisionSpec` in `PRECISIONS`. Every file is in diffusers key format, so
`from_single_file(path, config=<folder with config.json>)` loads it without a key conversion. Layouts:

- `bf16`: safetensors, every tensor bfloat16.
- `fp8-scaled`: safetensors in the BFL `fp8r` layout: quantized linear `weight` float8_e4m3fn `[N, K]` with an fp32
  per-row `weight_scale` `[N]`; everything else bfloat16.
- `gguf-q8_0`: GGUF written with the `gguf` package: quantized linear weights Q8_0 (blocks of 32: one fp16 scale and
  32 int8), everything else F32.
- `nvfp4`: safetensors in the ModelOpt NVFP4 layout: `weight` uint8 `[N, K/2]` (two E2M1 per byte, even element in
  the low nibble), `weight_scale` float8_e4m3fn `[N, K/16]`, fp32 scalars `weight_scale_2` and `input_scale`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Must be set before diffusers' GGUF utils are imported: its CUDA-kernels path downloads code from the Hub.
os.environ.setdefault("DIFFUSERS_GGUF_CUDA_KERNELS", "false")

import gguf  # noqa: E402
from diffusers import BFLQuantizationConfig, GGUFQuantizationConfig  # noqa: E402
from diffusers.quantizers.bfl.utils import (  # noqa: E402
    E2M1_MAX,
    FP8_MAX,
    NVFP4_BLOCK,
    BFLFP8RLinear,
    BFLNVFP4Linear,
    quantize_fp8r,
    quantize_nvfp4,
)
from gguf import GGMLQuantizationType as GGMLType  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fluxgate.errors import FixtureError  # noqa: E402

StateDict = dict[str, torch.Tensor]
# (bf16 state dict, keys of the linear weights to quantize, destination, GGUF architecture name)
Writer = Callable[[StateDict, set[str], Path, str], None]


@dataclass(frozen=True)
class PrecisionSpec:
    """A weight precision: its file format, writer, loader config and quality tier."""

    name: str
    tier: str  # similarity limits are set per tier: "reference", "8bit", "4bit"
    suffix: str
    block_size: int  # quantized linears need in_features divisible by this
    write: Writer
    quantization_config: Callable[[torch.dtype], object | None]

    @property
    def marker(self) -> str:
        return self.name.replace("-", "_")


# Q8_0 stores each block's scale d = amax / 127 as fp16: beyond 127 * 65504 it overflows to inf.
Q8_0_MAX_ABS = 127 * 65504.0


def _require_finite(key: str, value: torch.Tensor) -> None:
    """FixtureError naming the tensor when it holds NaN or infinite values: no format can quantize or store them
    meaningfully (they would come back as NaN scales or NaN images)."""
    bad = ~torch.isfinite(value)
    if bad.any():
        raise FixtureError(f"{key}: {int(bad.sum())} of {value.numel()} values are NaN or infinite; a checkpoint "
                           "cannot hold them")


def _quantize_nvfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' NVFP4 quantizer, except that an all-zero weight (global scale 0, where it would divide 0/0 into NaN
    block scales) is stored as zero codes with zero scales, which dequantize to exact zeros."""
    if weight.abs().amax() == 0:
        rows, cols = weight.shape
        return (torch.zeros(rows, cols // 2, dtype=torch.uint8, device=weight.device),
                torch.zeros(rows, cols // NVFP4_BLOCK, dtype=torch.float8_e4m3fn, device=weight.device),
                torch.zeros((), dtype=torch.float32, device=weight.device))
    return quantize_nvfp4(weight)


def fp8r_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's tensors in the fp8r layout (see module docstring), on the weight's device."""
    _require_finite(f"{prefix}.weight", weight)
    weight_q, weight_scale = quantize_fp8r(weight)
    return {f"{prefix}.weight": weight_q, f"{prefix}.weight_scale": weight_scale}


def nvfp4_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's tensors in the ModelOpt NVFP4 layout (see module docstring), on the weight's device."""
    _require_finite(f"{prefix}.weight", weight)
    weight_q, weight_scale, weight_scale_2 = _quantize_nvfp4(weight)
    # Not calibrated: only FP4 tensor-core kernels (Blackwell) read it; elsewhere diffusers dequantizes the weight
    # and ignores it. 1/(448*6) is the scale of activations with amax 1.
    input_scale = torch.tensor(1.0 / (FP8_MAX * E2M1_MAX), dtype=torch.float32, device=weight.device)
    return {f"{prefix}.weight": weight_q, f"{prefix}.weight_scale": weight_scale,
            f"{prefix}.weight_scale_2": weight_scale_2, f"{prefix}.input_scale": input_scale}


def _safetensors_writer(layout: Callable[[str, torch.Tensor], StateDict] | None) -> Writer:
    """A writer that puts each linear weight in `quantize` into `layout` and everything else in bf16."""

    def write(state_dict: StateDict, quantize: set[str], path: Path, arch: str) -> None:
        tensors: StateDict = {}
        for key, value in state_dict.items():
            if layout is not None and key in quantize:
                tensors.update(layout(key.removesuffix(".weight"), value))
            else:
                _require_finite(key, value)
                tensors[key] = value.to(torch.bfloat16).contiguous()
        save_file(tensors, str(path))

    return write


def _write_gguf_q8_0(state_dict: StateDict, quantize: set[str], path: Path, arch: str) -> None:
    for key, value in state_dict.items():  # all checked before the first byte is written
        _require_finite(key, value)
        amax = float(value.abs().max()) if key in quantize and value.numel() else 0.0
        if amax > Q8_0_MAX_ABS:
            raise FixtureError(f"{key}: |value| up to {amax:.3g} exceeds what Q8_0 can hold ({Q8_0_MAX_ABS:.4g}: 127 x "
                               "the fp16 maximum of its block scale)")
    write_gguf(path, arch, q8_0_gguf_tensors(state_dict, quantize))


def q8_0_gguf_tensors(state_dict: StateDict, quantize: set[str]) -> Iterator[tuple[str, np.ndarray, GGMLType]]:
    """(name, data in the type's layout, type): Q8_0 for the keys in `quantize`, F32 for the rest."""
    for key, value in state_dict.items():
        array = value.float().numpy()
        if key in quantize:
            yield key, gguf.quants.quantize(array, GGMLType.Q8_0), GGMLType.Q8_0
        else:
            yield key, array, GGMLType.F32


def write_gguf(path: Path, arch: str, tensors: Iterable[tuple[str, np.ndarray, GGMLType]]) -> None:
    """A GGUF file (file type Q8_0) holding `tensors`, as community converters write them."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, array, kind in tensors:
        writer.add_tensor(key, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


PRECISIONS: dict[str, PrecisionSpec] = {
    spec.name: spec
    for spec in (
        PrecisionSpec("bf16", "reference", ".safetensors", 1, _safetensors_writer(None), lambda dtype: None),
        PrecisionSpec("fp8-scaled", "8bit", ".safetensors", 1, _safetensors_writer(fp8r_tensors),
                      lambda dtype: BFLQuantizationConfig(compute_dtype=dtype)),
        PrecisionSpec("gguf-q8_0", "8bit", ".gguf", 32, _write_gguf_q8_0,
                      lambda dtype: GGUFQuantizationConfig(compute_dtype=dtype)),
        PrecisionSpec("nvfp4", "4bit", ".safetensors", 16, _safetensors_writer(nvfp4_tensors),
                      lambda dtype: BFLQuantizationConfig(compute_dtype=dtype)),
    )
}


def load_transformer(precision: PrecisionSpec, transformer_class: type, checkpoint: Path | StateDict,
                     config: Path | str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                     config_subfolder: str | None = None, name: str | None = None) -> torch.nn.Module:
    """Load a transformer through diffusers' `from_single_file` from a file or an in-memory state dict, with the
    model config from a local folder or Hub id; any failure raises FixtureError naming the file (or `name`) and
    what is wrong with it."""
    path = name or str(checkpoint)
    if isinstance(checkpoint, Path) and not checkpoint.is_file():
        raise FixtureError(f"{checkpoint}: checkpoint file not found")
    try:
        model = transformer_class.from_single_file(
            checkpoint if isinstance(checkpoint, dict) else str(checkpoint), config=str(config),
            subfolder=config_subfolder, torch_dtype=dtype, local_files_only=True, device=device,
            quantization_config=precision.quantization_config(dtype),
        )
    except Exception as error:  # the loaders raise many types; the user needs the file and the reason
        reason = (_file_problem(checkpoint) if isinstance(checkpoint, Path) else None) or _causes(error)
        raise FixtureError(f"{path}: cannot load as {precision.name} ({reason})") from error
    misfit = _misfit_quantized_linear(model)
    if misfit:
        raise FixtureError(f"{path}: cannot load as {precision.name} (does not fit the model config {config}: "
                           f"{misfit})")
    return model


def _causes(error: BaseException) -> str:
    """The error and its root cause, one line: diffusers wraps a file's real problem in a generic OSError."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    shown = [error] if len(chain) == 1 else [error, chain[-1]]
    return "; ".join(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}" for e in shown)


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be parsed: truncated, a corrupt header, GGUF tensor types the loader cannot
    dequantize; None when the file itself looks sound (the problem is elsewhere)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if path.suffix == ".gguf":
                return _gguf_problem(path, head, size)
            # safetensors: u64 little-endian header length, JSON header, then the tensor data it indexes.
            header_bytes = int.from_bytes(head, "little") if len(head) == 8 else None
            if header_bytes is None or 8 + header_bytes > size:
                return f"truncated or corrupt: {size} bytes, too short for the safetensors header it announces"
            header = json.loads(handle.read(header_bytes))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except OSError as error:
        return f"unreadable ({error})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        return f"corrupt safetensors header ({type(error).__name__}: {error})"
    if 8 + header_bytes + end > size:
        return f"truncated: {size} bytes, but its header describes {8 + header_bytes + end}"
    return None


def _gguf_problem(path: Path, head: bytes, size: int) -> str | None:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    if head[:4] != b"GGUF":
        return f"not a GGUF file (starts with {head[:4]!r}, not b'GGUF')"
    try:
        tensors = gguf.GGUFReader(str(path)).tensors
    except Exception as error:  # noqa: BLE001 - the reader fails in many ways on a cut or damaged file
        reason = " ".join(str(error).split())[:160]
        return f"truncated or corrupt GGUF file ({size} bytes; {type(error).__name__}: {reason})"
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *SUPPORTED_GGUF_QUANT_TYPES}
    unsupported = [tensor for tensor in tensors if tensor.tensor_type not in readable]
    if unsupported:
        first = unsupported[0]
        return (f"{len(unsupported)} tensor(s) in a GGUF type diffusers cannot dequantize, e.g. {first.name} is "
                f"{first.tensor_type.name}; it reads {', '.join(sorted(t.name for t in readable))}")
    return None


def _misfit_quantized_linear(model: torch.nn.Module) -> str | None:
    """The first quantized linear whose loaded tensors do not have the shapes its config gives it. diffusers checks
    the shapes of plain and GGUF weights but puts fp8r/nvfp4 tensors in place as they are, whatever their shape."""
    for name, module in model.named_modules():
        if isinstance(module, BFLNVFP4Linear):
            packing = {"weight": (module.out_features, module.in_features // 2),
                       "weight_scale": (module.out_features, module.in_features // NVFP4_BLOCK)}
        elif isinstance(module, BFLFP8RLinear):
            packing = {"weight": (module.out_features, module.in_features), "weight_scale": (module.out_features,)}
        else:
            continue
        for tensor, expected in packing.items():
            actual = tuple(getattr(module, tensor).shape)
            if actual != expected:
                return (f"{name}.{tensor} has shape {list(actual)}, but a {module.in_features} -> "
                        f"{module.out_features} linear needs {list(expected)}")
    return None
