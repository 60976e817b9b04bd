"""`gguf-q8_0`: GGUF files as city96's and ComfyUI-GGUF's converters write them, loaded by diffusers' GGUF quantizer
into `GGUFLinear`.

Layout (ggml's `Q8_0`, gguf-py `gguf.quants`): a quantized linear's weight in blocks of 32 values along K, each
stored as 34 bytes: an fp16 scale d = block amax / 127, then 32 int8 codes round(x / d); everything else F32. The
file's type is `MOSTLY_Q8_0` and its `general.architecture` the model's (`ModelSpec.gguf_arch`). `GGUFLinear` always
dequantizes to bf16 (with or without diffusers' CUDA dequantize kernels): Q8_0 has no GEMM of its own here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers import GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
from gguf import GGMLQuantizationType as GGMLType

from fluxgate.errors import FixtureError
from fluxgate.precisions.spec import PrecisionFormat, StateDict, require_finite

Q8_0_BLOCK = 32  # values per Q8_0 block, stored as 34 bytes: an fp16 scale, then 32 int8 codes
# Q8_0 stores each block's scale d = amax / 127 as fp16: beyond 127 * 65504 it overflows to inf.
Q8_0_MAX_ABS = 127 * 65504.0
_CHUNK_BLOCKS = 1 << 20  # blocks quantized at a time on the device: bounds the fp32 transients to ~0.5 GB


def _write(state_dict: StateDict, quantize: set[str], path: Path, arch: str) -> None:
    """The GGUF file; every tensor is checked (FixtureError: NaN, infinite, beyond Q8_0_MAX_ABS) before a byte is
    written."""
    for key, value in state_dict.items():
        require_finite(key, value)
        amax = float(value.abs().max()) if key in quantize and value.numel() else 0.0
        if amax > Q8_0_MAX_ABS:
            raise FixtureError(f"{key}: |value| up to {amax:.3g} exceeds what Q8_0 can hold ({Q8_0_MAX_ABS:.4g}: 127 x "
                               "the fp16 maximum of its block scale)")
    write_gguf(path, arch, q8_0_gguf_tensors(state_dict, quantize))


def q8_0_gguf_tensors(state_dict: StateDict, quantize: set[str]) -> Iterator[tuple[str, np.ndarray, GGMLType]]:
    """(name, data in the type's layout, type): Q8_0 for the keys in `quantize` (gguf's numpy quantizer), F32 for the
    rest."""
    for key, value in state_dict.items():
        array = value.float().numpy()
        if key in quantize:
            yield key, gguf.quants.quantize(array, GGMLType.Q8_0), GGMLType.Q8_0
        else:
            yield key, array, GGMLType.F32


def write_gguf(path: Path, arch: str, tensors: Iterable[tuple[str, np.ndarray, GGMLType]]) -> None:
    """A GGUF file (file type Q8_0, architecture `arch`) holding `tensors`, as community converters write them."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, array, kind in tensors:
        writer.add_tensor(key, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):  # blocks are independent: chunking changes no byte
        out[start:start + _CHUNK_BLOCKS] = _q8_0_blocks(blocks[start:start + _CHUNK_BLOCKS].float())
    return out.reshape(rows, cols // Q8_0_BLOCK * (Q8_0_BLOCK + 2))


def q8_0_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's weight as the GGUF loader holds it in memory: a GGUFParameter of its Q8_0 bytes, uint8
    `[N, K/32*34]` (`quantize_q8_0`), on the weight's device."""
    return {f"{prefix}.weight": GGUFParameter(quantize_q8_0(weight), quant_type=GGMLType.Q8_0)}


FORMAT = PrecisionFormat(write=_write,
                         quantization_config=lambda dtype: GGUFQuantizationConfig(compute_dtype=dtype),
                         layout=q8_0_tensors, quantized_layer=GGUFLinear)
