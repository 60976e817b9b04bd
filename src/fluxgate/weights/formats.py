"""The quantization markers a checkpoint carries, read from its header: ComfyUI's (`comfy_quant`,
`_quantization_metadata`, legacy `scaled_fp8`), convert_to_quant's row-wise fp8, unmarked fp8 scale shapes, and the
quantized formats fluxgate has no slot for (nunchaku SVDQuant, AWQ, GPTQ, bitsandbytes NF4/FP4/int8). `identify` asks
here; each function's docstring names the writer's source.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from fluxgate.errors import FixtureError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")  # ComfyUI / sd.cpp key prefixes
# comfy_quant / _quantization_metadata format -> (precision, layout); "float8_e4m3fn_rowwise" is convert_to_quant's
# (constants.py VALID_QUANT_FORMATS, formats/fp8_conversion.py): e4m3 with an fp32 `weight_scale` [N], fp8r's numbers
COMFY_FORMATS = {"float8_e4m3fn": ("fp8-scaled", "comfy-mixed-fp8"), "nvfp4": ("nvfp4", "comfy-nvfp4"),
                 "float8_e4m3fn_rowwise": ("fp8-scaled", "comfy-rowwise-fp8")}
MAX_MARKER_BYTES = 1 << 16  # a comfy_quant marker is a JSON object of a few dozen bytes


def json_object(text) -> dict:
    """The JSON object in `text` (a metadata string), {} for anything else."""
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def comfy_layers(path: Path, header: dict, metadata: dict, prefix: str) -> tuple[dict[str, str], str]:
    """The model's ComfyUI-quantized linears: {layer name without `prefix`: format}, and where they are marked
    ("_quantization_metadata", "comfy_quant tensors", both, or "" for none), as ComfyUI's `convert_old_quants` reads
    them. A listed layer is the model's when `<prefix><layer>.weight` is a tensor of the file; names in the metadata
    may carry the prefix (or another of PREFIXES) or not. Raises FixtureError naming the file for a marker that is not
    ComfyUI's JSON, and for markers that name no tensor of the file (its layers could not be told from ModelOpt's)."""
    configs, marked_by = comfy_layer_configs(path, header, metadata, prefix)
    return layer_formats(configs), marked_by


def layer_formats(configs: dict[str, dict]) -> dict[str, str]:
    """{layer: format} of the layer configs `comfy_layer_configs` reads."""
    return {layer: str(conf.get("format")) for layer, conf in configs.items()}


def comfy_layer_configs(path: Path, header: dict, metadata: dict, prefix: str) -> tuple[dict[str, dict], str]:
    """`comfy_layers` with each layer's whole ComfyUI config (`{"format": ..., "full_precision_matrix_mult": ...}`,
    comfy/ops.py `mixed_precision_ops.Linear._load_from_state_dict`); the header's config wins over a comfy_quant
    tensor's for the same layer, as in ComfyUI (`convert_old_quants` writes the header's over the tensors).
    Raises FixtureError as `comfy_layers` does, and for a config that is not a JSON object."""
    listed: dict[str, dict] = {}
    sources = []
    markers = [key for key in header if key.endswith(".comfy_quant")]
    if markers:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in markers:
                begin, end = header[key]["data_offsets"]
                if header[key].get("dtype") != "U8" or len(header[key].get("shape", ())) != 1:
                    raise FixtureError(f"{path}: {key} is a {header[key].get('dtype')} tensor of shape "
                                       f"{header[key].get('shape')}; a comfy_quant marker is 1-D uint8 (JSON bytes)")
                if end - begin > MAX_MARKER_BYTES:
                    raise FixtureError(f"{path}: {key} is a comfy_quant marker of {end - begin} bytes; ComfyUI's are "
                                       f"a short JSON object (fluxgate reads at most {MAX_MARKER_BYTES})")
                try:
                    conf = json.loads(bytes(handle.get_tensor(key).tolist()))
                except (ValueError, AttributeError, TypeError) as error:
                    raise FixtureError(f"{path}: {key} is not ComfyUI's JSON marker ({error})") from None
                listed[key.removesuffix(".comfy_quant")] = _layer_config(path, key, conf)
        sources.append("comfy_quant tensors")
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
            listed.update({name: _layer_config(path, name, conf) for name, conf in layers.items()})
        except (ValueError, AttributeError) as error:
            raise FixtureError(f"{path}: unreadable _quantization_metadata ({error})") from None
        sources.insert(0, "_quantization_metadata")
    own = {}
    for name, conf in listed.items():
        bare = [name.removeprefix(p) for p in (prefix, *PREFIXES) if name.startswith(p)] + [name]
        layer = next((b for b in bare if f"{prefix}{b}.weight" in header), None)
        if layer is not None:
            own[layer] = conf
    if listed and not own and not any(f"{name}.weight" in header for name in listed):  # others: a VAE's, an encoder's
        raise FixtureError(f"{path}: its {' and '.join(sources)} list {len(listed)} quantized layers, e.g. "
                           f"'{next(iter(listed))}', but name none of its tensors")
    return own, " and ".join(sources)


def _layer_config(path: Path, name: str, conf) -> dict:
    """One layer's ComfyUI quantization config as a dict, its `full_precision_matrix_mult` read as ComfyUI reads it
    (true, false, null or a number: truthiness). FixtureError naming the file and layer when the config is not a JSON
    object, or that flag is a string, list or object (ComfyUI would take "false" for true)."""
    if conf is None:
        return {}
    if not isinstance(conf, dict):
        raise FixtureError(f"{path}: {name}'s ComfyUI quantization config is {type(conf).__name__}, not a JSON object")
    flag = conf.get("full_precision_matrix_mult")
    if not (flag is None or isinstance(flag, (bool, int, float))):
        raise FixtureError(f"{path}: {name} has full_precision_matrix_mult {json.dumps(flag)[:40]}; ComfyUI reads "
                           "it as true or false")
    return {**conf, "full_precision_matrix_mult": bool(flag)}


def full_precision_layers(configs: dict[str, dict], header: dict, metadata: dict, prefix: str) -> set[str]:
    """The model's e4m3 linears ComfyUI runs in full precision (the weight dequantized to the compute dtype, a bf16
    GEMM; comfy/ops.py `mixed_precision_ops.Linear.forward` -> `forward_comfy_cast_weights`), names without `prefix`.
    As comfy/utils.py `convert_old_quants` decides it: in a legacy file (a `scaled_fp8` marker, no
    `_quantization_metadata`) every `scale_weight` layer is full precision when the marker has two elements and is
    not when it has any other count, whatever a `comfy_quant` tensor of that layer says; elsewhere each layer whose
    ComfyUI config says `full_precision_matrix_mult`. Layers whose weight is not e4m3 are left out (ComfyUI runs
    nothing quantized there). `configs`: the file's layer configs (`comfy_layer_configs`, read once by the caller)."""
    found = {layer for layer, conf in configs.items() if conf.get("full_precision_matrix_mult")}
    if "_quantization_metadata" not in metadata and f"{prefix}scaled_fp8" in header:
        legacy = {key[len(prefix):].removesuffix(".scale_weight") for key in header
                  if key.startswith(prefix) and key.endswith(".scale_weight")}
        found = (found | legacy) if legacy_full_precision(header, metadata, prefix) else found - legacy
    return {layer for layer in found if header.get(f"{prefix}{layer}.weight", {}).get("dtype") == "F8_E4M3"}


def legacy_full_precision(header: dict, metadata: dict, prefix: str) -> bool:
    """Whether a legacy `scaled_fp8` marker of two elements makes ComfyUI run every scaled layer in full precision."""
    marker = header.get(f"{prefix}scaled_fp8")
    return "_quantization_metadata" not in metadata and marker is not None and \
        math.prod(marker.get("shape", ())) == 2


def foreign_quantization(model: dict[str, dict], metadata: dict) -> tuple[str, str] | None:
    """(layout, detail) of a quantized format fluxgate runs no kernels for, by its own markers (`bitsandbytes`,
    `packed_int4`), else None."""
    return bitsandbytes(model) or packed_int4(model, metadata)


BNB_QUANT_STATE = ".quant_state.bitsandbytes__"


def bitsandbytes(model: dict[str, dict]) -> tuple[str, str] | None:
    """(layout, detail) of bitsandbytes-quantized weights, else None.

    4-bit (bitsandbytes/nn/modules.py `Linear4bit._save_to_state_dict`, functional.py `QuantState.as_dict(packed=
    True)`; diffusers' and Forge's `*-bnb-nf4` files): `<layer>.weight` uint8 `[K*N/2, 1]`, two 4-bit codes a byte,
    beside `<layer>.weight.absmax` (per-block scales), `.weight.quant_map` (the 16-value code book), with nested
    (double) quantization also `.weight.nested_absmax` / `.weight.nested_quant_map`, and the packed JSON
    `.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) whose suffix is the code book: "bnb-nf4" / "bnb-fp4".
    8-bit (`Linear8bitLt._save_to_state_dict`): int8 `<layer>.weight` and its fp32 row scales `<layer>.SCB`:
    "bnb-int8"."""
    kinds = Counter(key.rsplit(BNB_QUANT_STATE, 1)[1] for key in model if BNB_QUANT_STATE in key)
    if not kinds:  # the code book's name lost (an unpacked QuantState): the 4-bit tensors still say bitsandbytes
        kinds = Counter("4bit" for key in model if key.endswith(".weight.absmax")
                        and key.replace(".absmax", ".quant_map") in model)
    if kinds:
        names = "+".join(kind for kind, _ in kinds.most_common())
        return (f"bnb-{names}", f"{sum(kinds.values())} bitsandbytes 4-bit {names.upper()} weights (packed uint8 "
                "`weight`, `absmax`, `quant_map`, `quant_state`); fluxgate runs no bitsandbytes kernels")
    int8 = [key for key in model if key.endswith(".SCB")]
    if int8:
        return "bnb-int8", (f"{len(int8)} bitsandbytes LLM.int8 weights (int8 `weight`, `SCB` row scales); fluxgate "
                            "runs no bitsandbytes kernels")
    return None


def packed_int4(model: dict[str, dict], metadata: dict) -> tuple[str, str] | None:
    """(layout, detail) of linears packed as int32/int8 `qweight`, else None. Told apart by the tensors beside it:

    - nunchaku (nunchaku/models/linear.py, merge_safetensors.py): SVDQuant W4A4 linears `qweight` int8 [N, K/2] +
      `wscales` (+ `smooth_factor`, low-rank `proj_down`/`proj_up`, saved as `smooth`/`lora_down`/`lora_up`), AWQ
      W4A16 linears `qweight` int32 + `wscales` + `wzeros`; `__metadata__` `quantization_config` {"method":
      "svdquant", "weight": {"dtype": "int4" | "fp4_e2m1_all"}, "rank": r}. Named as nunchaku's files are:
      `svdq-int4_r32`, `svdq-fp4_r32`.
    - GPTQ (AutoGPTQ auto_gptq/nn_modules/qlinear `QuantLinear` buffers, GPTQModel alike): `qweight` int32
      [K*bits/32, N] (packed along the input), `qzeros` int32 [groups, N*bits/32], `scales` fp16 [groups, N],
      `g_idx` int32 [K] (each input channel's group, act-order): "gptq".
    - AutoAWQ (awq/modules/linear/gemm.py `WQLinear_GEMM`): `qweight` int32 [K, N/8] (packed along the output),
      `qzeros` int32 [K/group, N/8], `scales` fp16 [K/group, N], no `g_idx`: "awq-w4a16", as nunchaku's AWQ
      linears."""
    qweights = [key.removesuffix(".qweight") for key in model if key.endswith(".qweight")]
    if not qweights:
        return None
    svdq = [layer for layer in qweights if any(f"{layer}.{part}" in model for part in
                                               ("smooth_factor", "smooth", "proj_down", "lora_down"))]
    if svdq:
        return _svdquant(model, metadata, svdq, len(qweights))
    gptq = [layer for layer in qweights if f"{layer}.g_idx" in model or _packed_along_input(model, layer)]
    if gptq:
        bits = {32 * model[f"{layer}.qweight"]["shape"][0] // model[f"{layer}.g_idx"]["shape"][0]
                for layer in gptq if f"{layer}.g_idx" in model and model[f"{layer}.g_idx"]["shape"][0]}
        width = f"{'/'.join(map(str, sorted(bits)))}-bit " if bits else ""
        return "gptq", (f"{len(gptq)} GPTQ {width}linears (qweight packed along the input, qzeros, scales, g_idx); "
                        "fluxgate runs no GPTQ kernels")
    writer = "nunchaku: qweight/wscales/wzeros" if any(f"{layer}.wscales" in model for layer in qweights) \
        else "AutoAWQ: qweight/qzeros/scales"
    return "awq-w4a16", f"{len(qweights)} AWQ W4A16 linears ({writer}); no fluxgate precision"


def _packed_along_input(model: dict[str, dict], layer: str) -> bool:
    """GPTQ packs `qweight` along the input, so its columns are the outputs `scales` has; AutoAWQ's are N/8."""
    qweight, scales = model[f"{layer}.qweight"].get("shape", ()), model.get(f"{layer}.scales", {}).get("shape", ())
    return len(qweight) == 2 and len(scales) == 2 and qweight[1] == scales[1]


def _svdquant(model: dict[str, dict], metadata: dict, svdq: list[str], linears: int) -> tuple[str, str]:
    config = json_object(metadata.get("quantization_config"))
    weight = config.get("weight") if isinstance(config.get("weight"), dict) else {}
    kind = {"int4": "int4", "fp4_e2m1_all": "fp4"}.get(str(weight.get("dtype")))
    if kind is None:
        scales = model.get(f"{svdq[0]}.wscales", {})
        kind = "fp4" if scales.get("dtype") == "F8_E4M3" else "int4"
    down = model.get(f"{svdq[0]}.proj_down") or model.get(f"{svdq[0]}.lora_down") or {}
    rank = config.get("rank") or (min(down["shape"]) if len(down.get("shape", ())) == 2 else "?")
    return (f"nunchaku-svdq-{kind}_r{rank}", f"nunchaku SVDQuant W4A4 ({kind}, rank {rank}): {len(svdq)} linears as "
            f"qweight/wscales and a low-rank branch, {linears - len(svdq)} AWQ W4A16; fluxgate runs no SVDQuant "
            "kernels")


def legacy_scaled_fp8(model: dict[str, dict], weights: dict[str, dict]) -> tuple[str | None, str, str]:
    """(precision, layout, detail) of ComfyUI's legacy `scaled_fp8` naming (comfy/utils.py `convert_old_quants`):
    `scale_weight` one fp32 number per tensor (ComfyUI), or one per row `[N]` (convert_to_quant
    `--scaling_mode row` without `--comfy_quant`: formats/fp8_conversion.py) - fp8r's own numbers either way."""
    scales = {key.removesuffix(".scale_weight"): tuple(entry["shape"]) for key, entry in model.items()
              if key.endswith(".scale_weight")}
    rows = {layer: weights.get(f"{layer}.weight", {}).get("shape", [None])[0] for layer in scales}
    if all(math.prod(shape) == 1 for shape in scales.values()):
        return "fp8-scaled", "comfy-scaled-fp8", f"{len(scales)} e4m3 weights, one scale_weight each"
    if all(shape == (rows[layer],) for layer, shape in scales.items()):
        return "fp8-scaled", "comfy-scaled-fp8-rowwise", f"{len(scales)} e4m3 weights, scale_weight per row"
    return None, "fp8-mixed-scales", f"scale_weight shapes {sorted(set(map(str, scales.values())))}"


def fp8_scales(model: dict[str, dict], fp8_weights: list[str]) -> tuple[str | None, str, str]:
    """(precision, layout, detail) of unmarked e4m3 weights, from their `weight_scale` shapes: per row `[N]` is
    `bfl-fp8`; one fp32 number each is `scalar-scale-fp8` (ModelOpt's FP8 export, ComfyUI fp8 without its markers;
    value = e4m3 x scale either way); no scale at all (a plain cast) or a mix fills no slot."""
    scales = [model.get(key.removesuffix(".weight") + ".weight_scale") for key in fp8_weights]
    shapes = [tuple(scale.get("shape", ())) if scale else None for scale in scales]
    if all(shape is not None and len(shape) == 1 and shape[0] > 1 for shape in shapes):
        return "fp8-scaled", "bfl-fp8", f"{len(scales)} e4m3 weights, per-row scales"
    if all(shape is not None and math.prod(shape) == 1 and scale.get("dtype") == "F32"
           for shape, scale in zip(shapes, scales)):
        return "fp8-scaled", "scalar-scale-fp8", f"{len(scales)} e4m3 weights, one fp32 scale each, no ComfyUI marker"
    if all(shape is None for shape in shapes):
        return None, "fp8-unscaled", f"{len(scales)} e4m3 weights without a weight_scale (a plain cast)"
    return None, "fp8-mixed-scales", f"{len(scales)} e4m3 weights, weight_scale shapes {sorted(set(map(str, shapes)))}"


