"""How a weight precision is written, loaded and recognised (`PrecisionFormat`), and what the precisions' writers
share. Imports torch: only code that writes or loads weights imports it.

Every precision's module (`bf16`, `fp8_scaled`, `gguf_q8_0`, `nvfp4`) builds one `PrecisionFormat`, `FORMAT`, from its
own writer, loader config, in-memory layout, quantized layer, shape check and fast GEMM; its light
`fluxgate.precisions.PrecisionSpec` (in `fluxgate.precisions.builtin`) names it. The mechanism is diffusers' own: its single-file loader with the spec's quantization config swaps in the
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

    label: str  # the kernel path's name for it: what GEMM, its scale granularity, fast accumulation or not, whose
    matches: Callable[[str], bool]  # a profiled CPU-side op name or CUDA kernel name -> whether it is this GEMM


@dataclass(frozen=True)
class PrecisionFormat:
    """How a precision is written, loaded and recognised: the heavy half of a `fluxgate.precisions.PrecisionSpec`
    (which holds the light facts: name, tier, suffix, block size) and what the spec's `format` target names.

    A file format: `write` makes its checkpoint file and `quantization_config` gives diffusers' single-file loader the
    config that swaps in `quantized_layer`. A load-then-transform backend (its spec's `file_precision` names the file
    it loads, e.g. bf16): `transform` quantizes the loaded module in place or returns its replacement. `layout` is the
    synthetic profile's in-memory tensors of one linear (None: nothing quantized in the file); `packed_shapes` checks
    the quantized layer's tensors where diffusers does not; `fast_gemm` is the precision's own low-precision GEMM as
    a profile shows it (None: the layer always dequantizes); `is_quantized` recognises a quantized module where no
    single layer class does (a tensor subclass in a plain `nn.Linear`); `unavailable` says why this device cannot
    run it (None: it can).
    """

    write: Writer | None = None
    quantization_config: Callable[[torch.dtype], object | None] = lambda dtype: None
    layout: Layout | None = None
    quantized_layer: type | None = None
    packed_shapes: PackedShapes | None = None
    fast_gemm: FastGemm | None = None
    transform: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None
    is_quantized: Callable[[torch.nn.Module], bool] | None = None
    unavailable: Callable[[torch.device], str | None] | None = None

    def quantized(self, module: torch.nn.Module) -> bool:
        """`module` is one of this format's quantized linears."""
        if self.is_quantized is not None:
            return self.is_quantized(module)
        return self.quantized_layer is not None and isinstance(module, self.quantized_layer)

    @property
    def quantizes(self) -> bool:
        """Whether this format quantizes anything (bf16 does not)."""
        return self.quantized_layer is not None or self.is_quantized is not None


def swap_layers(module: torch.nn.Module, is_layer: Callable[[torch.nn.Module], bool],
                replacement: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """Replace every submodule of `module` for which `is_layer` holds by `replacement(it)`, in place, one at a time
    (a backend's `transform`: the quantized layers of the loaded file swapped for its own); returns `module`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_layer(child):
                setattr(parent, name, replacement(child))
    return module


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


# The state-dict key (after `<layer>.`) and layer attribute naming a linear ComfyUI runs in full precision: its fp8
# weight dequantized to the compute dtype for a bf16 GEMM (ComfyUI comfy/ops.py `mixed_precision_ops`).
FULL_PRECISION_KEY = "full_precision_matrix_mult"


class FullPrecisionMark:
    """The value of a `<layer>.full_precision_matrix_mult` key in an adapted state dict (`weights.layouts`): not a
    tensor, so no file can carry one; the loader (`fp8_scaled.keep_full_precision_marks`) refuses anything else under
    that name."""

    def __repr__(self) -> str:
        return "FULL_PRECISION_MARK"


FULL_PRECISION_MARK = FullPrecisionMark()


def static_activation_scale(key: str, value: torch.Tensor) -> torch.Tensor:
    """A linear's static activation scale (`input_scale`: inputs are divided by it before the cast to fp8) as fp32
    `[]`. Raises ValueError naming `key` when it is not one finite number above 0."""
    if value.numel() != 1:
        raise ValueError(f"{key} has shape {list(value.shape)}; a static activation scale is one number")
    scale = value.detach().float().reshape(())
    if not bool(torch.isfinite(scale)) or float(scale) <= 0:
        raise ValueError(f"{key} is {float(scale)}; a static activation scale is a finite number above 0")
    return scale


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
