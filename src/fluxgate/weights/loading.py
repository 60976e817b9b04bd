"""Loading a transformer in a precision through its model's loader (`ModelBuilder.load_transformer`: by default
diffusers' own single-file loader, `fluxgate.models.loading`), and saying what is wrong when a checkpoint will not load.

The precision's spec gives the loader its quantization config (`PrecisionSpec.quantization_config`), so diffusers swaps
in its own quantized linear layers; the spec's `packed_shapes` then checks what diffusers puts in place unchecked.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import gguf
import torch

from fluxgate.errors import FixtureError, SkipCombo
from fluxgate.models.builder import ModelBuilder
from fluxgate.models.loading import has_single_file_loader, load_default
from fluxgate.precisions import DTYPE, PrecisionSpec, installed
from fluxgate.precisions.spec import StateDict
from fluxgate.weights.headers import gguf_problem, read_gguf, safetensors_problem


def load_transformer(precision: PrecisionSpec, builder: ModelBuilder | type, checkpoint: Path | StateDict,
                     config: Path | str, device: torch.device, dtype: torch.dtype = DTYPE,
                     config_subfolder: str | None = None, name: str | None = None) -> torch.nn.Module:
    """Load a transformer from a file or an in-memory state dict (diffusers key format) in `precision` through the
    model's `builder.load_transformer` (its default: diffusers' `from_single_file`, or the state dict assigned to a
    class without one; a bare transformer class is loaded by that default), with the model config from a local folder
    or cached Hub id (`config`, its `config_subfolder`), on `device` in `dtype`. The loader's SkipCombo (it cannot
    load this precision here) or FixtureError is raised again whole, prefixed with the file (or `name`) and the
    precision; any other failure raises FixtureError, one line naming the file and what is wrong with it: the file's
    own defect where one is found (`file_problem`), else the loader's error and its root cause; a quantized tensor
    whose shape does not fit the config is named too."""
    path = name or str(checkpoint)
    if isinstance(checkpoint, Path) and not checkpoint.is_file():
        raise FixtureError(f"{checkpoint}: checkpoint file not found")
    try:
        model = _loader(builder)(checkpoint, config, device=device, dtype=dtype, subfolder=config_subfolder,
                                 quantization_config=precision.quantization_config(dtype))
    except (SkipCombo, FixtureError) as refusal:  # already one line saying why: kept whole, the file named
        raise type(refusal)(f"{path}: cannot load as {precision.name}: {refusal}") from None
    except Exception as error:  # the loaders raise many types; the user needs the file and the reason
        reason = (file_problem(checkpoint) if isinstance(checkpoint, Path) else None) or _causes(error)
        raise FixtureError(f"{path}: cannot load as {precision.name} ({reason})") from error
    misfit = misfit_quantized_linear(model)
    if misfit:
        raise FixtureError(f"{path}: cannot load as {precision.name} (does not fit the model config {config}: "
                           f"{misfit})")
    return model


def _loader(builder: ModelBuilder | type) -> Callable[..., torch.nn.Module]:
    """The builder's `load_transformer` (a builder that does not subclass ModelBuilder may lack it: the default then),
    or the default loader of a bare transformer class."""
    if isinstance(builder, type):
        return partial(load_default, builder)
    return getattr(builder, "load_transformer", None) or partial(load_default, builder.transformer_class)


def loader_name(builder: ModelBuilder) -> str:
    """How `builder` loads its denoiser, for a record's origin: "from_single_file" or "load_state_dict" (the default
    loader, by whether the class has a single-file loader), or "<Builder>.load_transformer" (its own)."""
    own = getattr(type(builder), "load_transformer", None)
    if own is not None and own is not ModelBuilder.load_transformer:
        return f"{type(builder).__name__}.load_transformer"
    return "from_single_file" if has_single_file_loader(builder.transformer_class) else "load_state_dict"


def _causes(error: BaseException) -> str:
    """The error and its root cause, one line: diffusers wraps a file's real problem in a generic OSError."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    shown = [error] if len(chain) == 1 else [error, chain[-1]]
    return "; ".join(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}" for e in shown)


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be parsed (`headers`: unreadable, truncated, a corrupt header), or GGUF tensor
    types diffusers' GGUF loader cannot dequantize; None when the file itself looks sound (the problem is elsewhere)."""
    if path.suffix != ".gguf":
        return safetensors_problem(path)
    problem = gguf_problem(path)
    if problem:
        return problem
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *SUPPORTED_GGUF_QUANT_TYPES}
    unsupported = [tensor for tensor in read_gguf(path).tensors if tensor.type_id not in {t.value for t in readable}]
    if unsupported:
        first = unsupported[0]
        return (f"{len(unsupported)} tensor(s) in a GGUF type diffusers cannot dequantize, e.g. {first.name} is "
                f"{first.type_name}; it reads {', '.join(sorted(t.name for t in readable))}")
    return None


def misfit_quantized_linear(model: torch.nn.Module) -> str | None:
    """The first quantized linear whose loaded tensors do not have the shapes its in/out features give them (each
    precision's `packed_shapes`), as "<name>.<tensor> has shape [...], but a K -> N linear needs [...]"; else None.
    diffusers checks the shapes of plain and GGUF weights but puts fp8r/nvfp4 tensors in place as they are."""
    checks = [(spec.quantized_layer, spec.packed_shapes) for spec in installed() if spec.packed_shapes]
    for name, module in model.named_modules():
        for layer, packed_shapes in checks:
            if not isinstance(module, layer):
                continue
            for tensor, expected in packed_shapes(module).items():
                actual = tuple(getattr(module, tensor).shape)
                if actual != expected:
                    return (f"{name}.{tensor} has shape {list(actual)}, but a {module.in_features} -> "
                            f"{module.out_features} linear needs {list(expected)}")
    return None
