"""What a weight precision is to fluxgate (`PrecisionSpec`), and what the precisions' writers share.

Every precision's module (`bf16`, `fp8_scaled`, `gguf_q8_0`, `nvfp4`) builds one `PrecisionSpec` from its own writer,
loader config, in-memory layout, quantized layer, shape check and fast GEMM; `fluxgate.precisions.PRECISIONS` lists
them. The mechanism is diffusers' own: its single-file loader with the spec's quantization config swaps in the
spec's quantized linear layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fluxgate.errors import FixtureError

DTYPE = torch.bfloat16  # what the pipelines compute in, and the precision of every unquantized tensor
StateDict = dict[str, torch.Tensor]
# (bf16 state dict, keys of the linear weights to quantize, destination, GGUF architecture name) -> the file written
Writer = Callable[[StateDict, set[str], Path, str], None]
# (linear's key prefix, its bf16 weight `[N, K]`) -> that linear's tensors in the loader's layout, on the weight's device
Layout = Callable[[str, torch.Tensor], StateDict]
# a quantized linear layer -> {tensor name: the shape its in/out features give that tensor}
PackedShapes = Callable[[torch.nn.Linear], dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class FastGemm:
    """A precision's own low-precision GEMM, as a profile of one step shows it (`fluxgate.measuring.kernels`)."""

    label: str  # the kernel path's name for it, e.g. "fp8 GEMM (_scaled_mm)"
    matches: Callable[[str], bool]  # a profiled CPU-side op name or CUDA kernel name -> whether it is this GEMM


@dataclass(frozen=True)
class PrecisionSpec:
    """A weight precision: its file format and writer, how diffusers loads it, and how a loaded model shows it.

    `layout` is None for a precision that quantizes nothing (bf16); `quantized_layer` is the diffusers linear the
    loader swaps in for a quantized weight; `packed_shapes` checks that layer's tensors where diffusers does not
    (None where it does); `fast_gemm` is None where no low-precision GEMM exists (the layer always dequantizes).
    """

    name: str
    tier: str  # similarity limits are set per tier: "reference", "8bit", "4bit"
    suffix: str  # the checkpoint file's extension
    block_size: int  # quantized linears need in_features divisible by this
    write: Writer  # the checkpoint file, as real quantized checkpoints store it
    quantization_config: Callable[[torch.dtype], object | None]  # compute dtype -> `from_single_file`'s config
    layout: Layout | None = None  # the synthetic profile's in-memory tensors: what `write` stores for one linear
    quantized_layer: type | None = None
    packed_shapes: PackedShapes | None = None
    fast_gemm: FastGemm | None = None

    @property
    def marker(self) -> str:
        """The pytest marker of its combos: `fp8_scaled` for `fp8-scaled`."""
        return self.name.replace("-", "_")


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """The first of the named tensors holding NaN or infinite values: (name, how many, of how many), else None.
    Floating-point tensors only (fp8 included, counted through float32); GGUF's packed blocks are not floats."""
    for name, tensor in tensors:
        if not tensor.is_floating_point() or type(tensor).__name__ == "GGUFParameter":
            continue
        values = tensor.detach()
        count = int((~torch.isfinite(values.float() if values.element_size() == 1 else values)).sum())
        if count:
            return name, count, tensor.numel()
    return None


def require_finite(key: str, value: torch.Tensor) -> None:
    """FixtureError naming the tensor when it holds NaN or infinite values: no format can quantize or store them
    meaningfully (they would come back as NaN scales or NaN images)."""
    bad = first_nonfinite([(key, value)])
    if bad:
        raise FixtureError(f"{key}: {bad[1]} of {bad[2]} values are NaN or infinite; a checkpoint cannot hold them")


def safetensors_writer(layout: Layout | None) -> Writer:
    """A writer of safetensors files that puts each linear weight to quantize into `layout` and every other tensor in
    bf16 (`layout` None: everything bf16). Raises FixtureError for a tensor holding NaN or infinite values."""

    def write(state_dict: StateDict, quantize: set[str], path: Path, arch: str) -> None:
        tensors: StateDict = {}
        for key, value in state_dict.items():
            if layout is not None and key in quantize:
                tensors.update(layout(key.removesuffix(".weight"), value))
            else:
                require_finite(key, value)
                tensors[key] = value.to(DTYPE).contiguous()
        save_file(tensors, str(path))

    return write
