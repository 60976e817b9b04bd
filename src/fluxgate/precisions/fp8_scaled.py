"""`fp8-scaled`: safetensors in BFL's `fp8r` layout, loaded by diffusers' BFL quantizer into `BFLFP8RLinear`.

Layout (diffusers `quantizers/bfl/utils.py`, `quantize_fp8r`): a quantized linear's `weight` is float8_e4m3fn
`[N, K]` with an fp32 per-row `weight_scale` `[N]` (row amax / 448); everything else is bfloat16. `BFLFP8RLinear` runs
`torch._scaled_mm` on CUDA compute capability 8.9+ and dequantizes to bf16 elsewhere.

A file's static activation scale (`<layer>.input_scale`, fp32 `[]`: ComfyUI's, ModelOpt's FP8 export) is read by
diffusers' BFL quantizer but kept only on NVFP4 layers (diffusers 0.42 `BFLQuantizer.create_quantized_param`);
`keep_fp8r_input_scales`, installed when this module is imported, keeps it on each `BFLFP8RLinear` too, as the
buffer `input_scale`, which its own forward never reads (it scales each input row at run time) and the `comfy`
backend quantizes inputs with. Likewise `keep_full_precision_marks` moves the adapter's full-precision mark
(`weights.layouts`: a layer ComfyUI runs dequantized; a mark no file can carry) onto its `BFLFP8RLinear` as the
attribute `full_precision_matrix_mult`, through diffusers' key mapping (a fused qkv's mark lands on its q, k and v),
which the `comfy` backend honours. The wrappers change nothing else of diffusers' loading in the process.
"""

from __future__ import annotations

import torch
from diffusers import BFLQuantizationConfig
from diffusers.quantizers.bfl.bfl_quantizer import BFLQuantizer
from diffusers.quantizers.bfl.utils import BFLFP8RLinear, BFLQuantizedParameter, quantize_fp8r
from diffusers.utils import get_module_from_name

from fluxgate.precisions.spec import (FULL_PRECISION_KEY, FULL_PRECISION_MARK, FastGemm, PrecisionFormat, StateDict,
                                     require_finite, safetensors_writer, static_activation_scale)

FP8_GEMM = "fp8 GEMM per-row, fast accum (diffusers BFLFP8RLinear _scaled_mm)"


def fp8r_tensors(prefix: str, weight: torch.Tensor) -> StateDict:
    """One linear's tensors in the fp8r layout (module docstring), on the weight's device. Raises FixtureError for
    NaN or infinite values."""
    require_finite(f"{prefix}.weight", weight)
    weight_q, weight_scale = quantize_fp8r(weight)
    return {f"{prefix}.weight": weight_q, f"{prefix}.weight_scale": weight_scale}


def _packed_shapes(layer: torch.nn.Linear) -> dict[str, tuple[int, ...]]:
    # diffusers puts fp8r tensors in place as they are, whatever their shape: checked by the loader
    return {"weight": (layer.out_features, layer.in_features), "weight_scale": (layer.out_features,)}


def keep_fp8r_input_scales() -> None:
    """Wrap diffusers' `BFLQuantizer.create_quantized_param` (once per process) so that an fp8r parameter's static
    activation scale lands on its `BFLFP8RLinear` as the buffer `input_scale` (fp32 `[]`, on the layer's device);
    NVFP4 layers and files without one are loaded exactly as diffusers loads them. The loader then raises
    ValueError naming the layer for a scale that is not one finite number above 0 (`spec.static_activation_scale`)."""
    create = BFLQuantizer.create_quantized_param
    if getattr(create, "keeps_fp8r_input_scale", False):
        return

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        create(self, model, param_value, param_name, target_device, *args, **kwargs)
        input_scale = getattr(param_value, "input_scale", None)
        module, _ = get_module_from_name(model, param_name)
        if input_scale is not None and isinstance(module, BFLFP8RLinear):
            scale = static_activation_scale(f"{param_name.removesuffix('.weight')}.input_scale", input_scale)
            module.register_buffer("input_scale", scale.to(target_device))

    create_quantized_param.keeps_fp8r_input_scale = True
    BFLQuantizer.create_quantized_param = create_quantized_param


def keep_full_precision_marks() -> None:
    """Wrap diffusers' BFL loading (once per process) so a `<layer>.full_precision_matrix_mult` key holding
    `spec.FULL_PRECISION_MARK` (the adapter's) sets `full_precision_matrix_mult = True` on the loaded `BFLFP8RLinear`:
    `BFLQuantizer.maybe_update_state_dict` takes the marks out and puts them on the layers' `BFLQuantizedParameter`,
    `BFLQuantizedParameter._like` keeps them through diffusers' key mapping (split, chunk), `create_quantized_param`
    sets the layer's attribute. Raises ValueError naming the key for anything else under that name (a file's own
    tensor: which layers ComfyUI runs in full precision is read from its ComfyUI markers, never from a key a file
    names) or a mark on no fp8r weight, and (as diffusers does for differing scales) NotImplementedError with their
    shapes when weights with different marks are concatenated."""
    update = BFLQuantizer.maybe_update_state_dict
    if getattr(update, "keeps_full_precision_marks", False):
        return
    create, like = BFLQuantizer.create_quantized_param, BFLQuantizedParameter._like
    torch_function = BFLQuantizedParameter.__torch_function__.__func__
    suffix = f".{FULL_PRECISION_KEY}"

    def maybe_update_state_dict(self, state_dict):
        marks = [key for key in state_dict if key.endswith(suffix)]
        for key in marks:
            if state_dict.pop(key) is not FULL_PRECISION_MARK:
                raise ValueError(f"{key} is a tensor of the file under the name of fluxgate's full-precision mark; "
                                 "which layers run in full precision is read from the file's ComfyUI markers")
        state_dict = update(self, state_dict)
        for key in marks:
            weight = state_dict.get(key.removesuffix(suffix) + ".weight")
            if not isinstance(weight, BFLQuantizedParameter) or weight.quant_type != "fp8r":
                raise ValueError(f"{key} marks no fp8r weight; only fp8 layers run in full precision")
            setattr(weight, FULL_PRECISION_KEY, True)
        return state_dict

    def _like(self, data, weight_scale):
        made = like(self, data, weight_scale)
        setattr(made, FULL_PRECISION_KEY, getattr(self, FULL_PRECISION_KEY, False))
        return made

    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.cat, torch.concat, torch.concatenate) and args:
            marks = {getattr(t, FULL_PRECISION_KEY, False) for t in args[0] if isinstance(t, BFLQuantizedParameter)}
            if len(marks) > 1:
                raise NotImplementedError(f"{len(args[0])} quantized weights of shapes "
                                          f"{[list(t.shape) for t in args[0]]} joined into one layer: some are marked "
                                          "full_precision_matrix_mult, some not; ComfyUI runs them apart")
        return torch_function(cls, func, types, args, kwargs)

    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        create(self, model, param_value, param_name, target_device, *args, **kwargs)
        module, _ = get_module_from_name(model, param_name)
        if getattr(param_value, FULL_PRECISION_KEY, False) and isinstance(module, BFLFP8RLinear):
            setattr(module, FULL_PRECISION_KEY, True)

    maybe_update_state_dict.keeps_full_precision_marks = True
    create_quantized_param.keeps_fp8r_input_scale = getattr(create, "keeps_fp8r_input_scale", False)
    BFLQuantizer.maybe_update_state_dict = maybe_update_state_dict
    BFLQuantizer.create_quantized_param = create_quantized_param
    BFLQuantizedParameter._like = _like
    BFLQuantizedParameter.__torch_function__ = classmethod(__torch_function__)


keep_fp8r_input_scales()
keep_full_precision_marks()

FORMAT = PrecisionFormat(write=safetensors_writer(fp8r_tensors),
                         quantization_config=lambda dtype: BFLQuantizationConfig(compute_dtype=dtype),
                         layout=fp8r_tensors, quantized_layer=BFLFP8RLinear, packed_shapes=_packed_shapes,
                         fast_gemm=FastGemm(FP8_GEMM, lambda name: name == "aten::_scaled_mm"))
