"""Tiny checkpoint files in the exact layouts public tools write, made from fluxgate's tiny models' known bf16
weights, and what the tests of those layouts (test_layouts, test_real_layouts, test_refusals) need to load them
through the real profile and measure what was loaded.

Each writer follows its tool's published facts, independently of fluxgate's adapters:
- original (BFL / Tongyi) keys: the inverse of diffusers' single-file converters (loaders/single_file_utils.py
  `convert_flux2_transformer_checkpoint_to_diffusers`, `convert_z_image_transformer_checkpoint_to_diffusers`): fused
  qkv, FLUX.2's final (shift, scale) order.
- ComfyUI fp8 (QUANTIZATION.md "Checkpoint Format"): e4m3 `weight`, scalar fp32 `weight_scale`, `input_scale`; the
  quantized layers listed in the header's `_quantization_metadata` or by `<layer>.comfy_quant` uint8 JSON tensors;
  legacy scaled fp8 (comfy/utils.py `convert_old_quants`): `scale_weight`, `scale_input`, a `scaled_fp8` marker.
- comfy-kitchen NVFP4 (backends/eager/quantization.py `quantize_nvfp4(hi_first=True)`, float_utils `to_blocked`):
  the first value of a pair in the HIGH nibble, E4M3 block scales in cuBLAS's 128x4-tile layout.
- city96 GGUF (ComfyUI-GGUF tools/convert.py + tools/lcpp.patch): original keys, 1-D and small (<= 1024 values)
  tensors F32, the arch's unquantized tensors BF16, block linears in the quantized type.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from diffusers.quantizers.bfl.utils import (
    BFLFP8RLinear,
    BFLNVFP4Linear,
    dequantize_fp8r,
    dequantize_nvfp4,
    quantize_fp8r,
    quantize_nvfp4,
)
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
from safetensors.torch import save_file

from fluxgate.matrix import Combo
from fluxgate.models import MODELS
from fluxgate.weights.real import RealSource

SEED = 0
CPU = torch.device("cpu")
Q = gguf.GGMLQuantizationType
# Relative Frobenius error of each format's own rounding of the tiny models' weights, with headroom: a misread file
# is far beyond (a ComfyUI NVFP4 file read as ModelOpt: 1.42).
ROUNDING = {"fp8": 0.035, "nvfp4": 0.12, "Q8_0": 0.006}


def reference(model: str) -> dict[str, torch.Tensor]:
    """The tiny transformer's bf16 weights in diffusers keys (what fluxgate's own bf16 checkpoint holds)."""
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in MODELS[model].tiny_transformer(SEED).state_dict().items()}


# --- original keys -------------------------------------------------------------------------------------------------

_FLUX2_RENAMES = {"x_embedder.": "img_in.", "context_embedder.": "txt_in.", "proj_out.": "final_layer.linear.",
                  "time_guidance_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
                  "time_guidance_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
                  "time_guidance_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
                  "time_guidance_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
                  "double_stream_modulation_img.linear.": "double_stream_modulation_img.lin.",
                  "double_stream_modulation_txt.linear.": "double_stream_modulation_txt.lin.",
                  "single_stream_modulation.linear.": "single_stream_modulation.lin."}
_FLUX2_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                 "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                 "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                 "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
                 "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
                 "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
                 "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_FLUX2_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
                 "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_FLUX2_QKV = {"attn.to_q.weight": "img_attn.qkv.weight", "attn.add_q_proj.weight": "txt_attn.qkv.weight"}


def flux2_to_original(sd: dict) -> dict:
    """FLUX.2 diffusers keys -> BFL's (flux2-dev.safetensors, Comfy-Org split files)."""
    out = {}
    for key, value in sd.items():
        block, _, rest = key.partition(".")[2].partition(".")
        if key.startswith("transformer_blocks."):
            if rest in _FLUX2_QKV:
                parts = [sd[f"transformer_blocks.{block}.{rest.replace('q', letter, 1)}"] for letter in "qkv"]
                out[f"double_blocks.{block}.{_FLUX2_QKV[rest]}"] = torch.cat(parts)
            elif rest in _FLUX2_DOUBLE:
                out[f"double_blocks.{block}.{_FLUX2_DOUBLE[rest]}"] = value
        elif key.startswith("single_transformer_blocks."):
            out[f"single_blocks.{block}.{_FLUX2_SINGLE[rest]}"] = value
        elif key == "norm_out.linear.weight":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = value.chunk(2)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
        else:
            old = next((old for old in _FLUX2_RENAMES if key.startswith(old)), "")
            out[_FLUX2_RENAMES.get(old, "") + key[len(old):]] = value
    return out


def zimage_to_original(sd: dict) -> dict:
    """Z-Image diffusers keys -> Tongyi's (z_image_turbo_bf16.safetensors, Comfy-Org split files)."""
    renames = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
               (".attention.norm_k.", ".attention.k_norm."))
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            value = torch.cat([value, sd[key.replace("to_q", "to_k")], sd[key.replace("to_q", "to_v")]])
            key = key.replace(".attention.to_q.", ".attention.qkv.")
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


ORIGINAL = {"flux2-dev": flux2_to_original, "z-image-turbo": zimage_to_original}


def is_block_linear(key: str, value: torch.Tensor) -> bool:
    """A linear weight of the blocks quantized files quantize (original or diffusers keys)."""
    blocks = ("double_blocks.", "single_blocks.", "layers.", "transformer_blocks.", "single_transformer_blocks.")
    return key.startswith(blocks) and key.endswith(".weight") and value.ndim == 2


# --- one quantized linear in each layout ---------------------------------------------------------------------------

def comfy_marker(fmt: str, **config) -> torch.Tensor:
    """ComfyUI's `<layer>.comfy_quant` tensor: the JSON {"format": fmt, **config} as uint8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt, **config}).encode()), dtype=torch.uint8)


def tiled(scales: torch.Tensor) -> torch.Tensor:
    """[R, C] one-byte scales in cuBLAS's 128x4-tile layout, padded to [ceil128(R), ceil4(C)] (comfy-kitchen's
    `to_blocked`), written element by element from the tile formula."""
    rows, cols = scales.shape
    prow, pcol = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = np.zeros((prow, pcol), dtype=np.uint8)
    padded[:rows, :cols] = scales.view(torch.uint8).numpy()
    out = np.empty(prow * pcol, dtype=np.uint8)
    for r in range(prow):
        for c in range(pcol):
            out[((r // 128) * (pcol // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = padded[r, c]
    return torch.from_numpy(out.reshape(prow, pcol)).view(scales.dtype)


def e4m3_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.float().abs().amax() / 448.0
    return (weight.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale.reshape(())


def comfy_fp8(layer: str, weight: torch.Tensor) -> dict:
    q, scale = e4m3_per_tensor(weight)
    return {f"{layer}.weight": q, f"{layer}.weight_scale": scale, f"{layer}.input_scale": torch.tensor(1.0)}


def legacy_scaled_fp8(layer: str, weight: torch.Tensor) -> dict:
    q, scale = e4m3_per_tensor(weight)
    return {f"{layer}.weight": q, f"{layer}.scale_weight": scale.reshape(1), f"{layer}.scale_input": torch.ones(1)}


def rowwise_e4m3(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """convert_to_quant `--scaling_mode row` (converters/learned_rounding.py `_convert_fp8_rowwise`, without learned
    rounding): scale = row amax / 448, fp32 [N]."""
    scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / 448.0
    return (weight.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def rowwise_fp8(layer: str, weight: torch.Tensor) -> dict:
    """convert_to_quant `--comfy_quant` row-wise: `weight_scale` [N] (marked "float8_e4m3fn_rowwise")."""
    q, scale = rowwise_e4m3(weight)
    return {f"{layer}.weight": q, f"{layer}.weight_scale": scale}


def legacy_rowwise_fp8(layer: str, weight: torch.Tensor) -> dict:
    """convert_to_quant without `--comfy_quant` (formats/fp8_conversion.py): `scale_weight` [N]; the file carries the
    `scaled_fp8` marker (`with_scaled_fp8_marker`)."""
    q, scale = rowwise_e4m3(weight)
    return {f"{layer}.weight": q, f"{layer}.scale_weight": scale}


def with_scaled_fp8_marker(tensors: dict, elements: int = 2) -> dict:
    """ComfyUI's legacy whole-file marker (comfy/utils.py `convert_old_quants`): an e4m3 `scaled_fp8` of 2 elements
    as convert_to_quant and most third-party converters write it (ComfyUI then runs every layer in full precision),
    or of none as ComfyUI's own ModelSave writes it (FP8 GEMMs)."""
    return {**tensors, "scaled_fp8": torch.zeros(elements, dtype=torch.float8_e4m3fn)}


def fp8r_twin(layer: str, weight: torch.Tensor) -> dict:
    """The per-tensor fp8 numbers of `comfy_fp8` in the native fp8r layout: the scalar repeated per row."""
    q, scale = e4m3_per_tensor(weight)
    return {f"{layer}.weight": q, f"{layer}.weight_scale": scale.expand(q.shape[0]).contiguous()}


def fp8r(layer: str, weight: torch.Tensor) -> dict:
    q, scale = quantize_fp8r(weight)
    return {f"{layer}.weight": q, f"{layer}.weight_scale": scale}


def modelopt_nvfp4(layer: str, weight: torch.Tensor, input_scale: bool = True) -> dict:
    packed, block, global_scale = quantize_nvfp4(weight)
    out = {f"{layer}.weight": packed, f"{layer}.weight_scale": block,
           f"{layer}.weight_scale_2": global_scale.float().reshape(())}
    return {**out, f"{layer}.input_scale": torch.tensor(1.0 / (448 * 6))} if input_scale else out


def comfy_nvfp4(layer: str, weight: torch.Tensor, input_scale: bool = True) -> dict:
    """comfy-kitchen's NVFP4 of the same numbers as `modelopt_nvfp4`: high nibble first, tiled block scales."""
    out = modelopt_nvfp4(layer, weight, input_scale)
    packed = out[f"{layer}.weight"]
    out[f"{layer}.weight"] = ((packed & 0x0F) << 4) | (packed >> 4)
    out[f"{layer}.weight_scale"] = tiled(out[f"{layer}.weight_scale"])
    return out


def comfy_nvfp4_without_input_scale(layer: str, weight: torch.Tensor) -> dict:
    """ComfyUI computes activation scales at run time: its NVFP4 files may carry no `input_scale`."""
    return comfy_nvfp4(layer, weight, input_scale=False)


COMFY_FORMAT = {comfy_fp8: "float8_e4m3fn", comfy_nvfp4: "nvfp4", comfy_nvfp4_without_input_scale: "nvfp4",
                rowwise_fp8: "float8_e4m3fn_rowwise"}


def quantized_tensors(sd: dict, layer_fn, marking: str | None = None, prefix: str = "",
                      listed_with_prefix: bool = True) -> tuple[dict, dict | None]:
    """(tensors, safetensors metadata) of `sd` with every block linear through `layer_fn`, the rest as is, keys
    under `prefix`. `marking` "tensors" adds `comfy_quant` tensors, "metadata" the header's `_quantization_metadata`
    (layer names with the prefix or, `listed_with_prefix` False, without it), None neither."""
    tensors, layers = {}, {}
    for key, value in sd.items():
        if is_block_linear(key, value):
            layer = key.removesuffix(".weight")
            tensors.update({prefix + k: v.contiguous() for k, v in layer_fn(layer, value).items()})
            layers[(prefix if listed_with_prefix else "") + layer] = {"format": COMFY_FORMAT.get(layer_fn, "?")}
            if marking == "tensors":
                tensors[f"{prefix}{layer}.comfy_quant"] = comfy_marker(COMFY_FORMAT[layer_fn])
        else:
            tensors[prefix + key] = value.contiguous()
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} \
        if marking == "metadata" else None
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- GGUF as city96 / llama.cpp write it ---------------------------------------------------------------------------

# city96's tools/lcpp.patch: the tensors each image arch leaves unquantized
KEEP_HIGH = {"flux": ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer."),
             "lumina2": ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.",
                         "noise_refiner.")}


def city96_gguf(path: Path, sd: dict, arch: str | None, block_type=Q.Q8_0, prefix: str = "", pads: str = "f32",
                extra: dict | None = None) -> Path:
    """A GGUF laid out as city96's convert.py + patched llama-quantize write it (module docs), keys under `prefix`
    (sd.cpp), beside `extra` tensors (F32, as named: an sd.cpp file's VAE and text encoders). `pads` stores Z-Image's
    pad tokens "f32" ([1, dim]), "bf16" ([1, dim]) or "flat" (llama.cpp's [dim], F32). `arch` None writes no
    `general.architecture` (sd.cpp)."""
    writer = gguf.GGUFWriter(str(path), arch=arch or "")  # gguf-py writes no general.architecture for ""
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if block_type == Q.Q8_0 else gguf.LlamaFileType.GUESSED)
    for key, value in sd.items():
        array = value.float().numpy()
        if key.endswith("pad_token"):
            kind = Q.BF16 if pads == "bf16" else Q.F32
            array = array.reshape(-1) if pads == "flat" else array
        elif value.ndim == 1 or value.numel() <= 1024:
            kind = Q.F32
        elif key.startswith(KEEP_HIGH.get(arch, ())) or not is_block_linear(key, value):
            kind = Q.BF16
        else:
            kind = block_type
        writer.add_tensor(prefix + key, array if kind == Q.F32 else gguf.quants.quantize(array, kind), raw_dtype=kind)
    for key, value in (extra or {}).items():
        writer.add_tensor(key, value.float().numpy(), raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def raw_gguf(path: Path, arch: str, weights: dict[str, Q], rows: int = 4, cols: int = 256) -> Path:
    """A GGUF whose `weights` (name -> type) are `[rows, cols]` tensors of random bytes in that type's block size:
    enough for identification, which reads the tensor index only (gguf-py quantizes few types itself)."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    rng = np.random.default_rng(0)
    for name, kind in weights.items():
        block, size = gguf.GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 255, (rows, cols // block * size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- loading through the real profile and measuring what was loaded ------------------------------------------------

def pipeline_folder(model: str, folder: Path) -> Path:
    """A local diffusers pipeline folder of the tiny model (what a models file's `pipeline = ...` points at)."""
    if not (folder / "model_index.json").is_file():
        spec = MODELS[model]
        spec.builder.pipeline_class(transformer=spec.tiny_transformer(SEED), **spec.builder.tiny_components(SEED)
                                    ).save_pretrained(folder)
    return folder


def tiny_hub_cache(cache: Path, monkeypatch) -> Path:
    """A Hugging Face cache in huggingface_hub's layout (`models--org--name/refs/main`, `snapshots/<rev>/...`) holding,
    for each pipeline fluxgate's default models file names, only its `model_index.json` and the tiny transformer's
    `transformer/config.json`, and huggingface_hub pointed at it: the config scan and the loader compare a tiny
    file's blocks with, whatever the machine's own cache holds."""
    import huggingface_hub

    from fluxgate.weights.scan import named_pipelines

    revision = "0" * 40
    for model, repo in named_pipelines({}).items():
        repo_cache = cache / f"models--{repo.replace('/', '--')}"
        (repo_cache / "snapshots" / revision / "transformer").mkdir(parents=True)
        (repo_cache / "snapshots" / revision / "transformer" / "config.json").write_text(
            json.dumps(MODELS[model].builder.tiny_transformer_config))
        (repo_cache / "snapshots" / revision / "model_index.json").write_text(
            json.dumps({"_class_name": MODELS[model].builder.pipeline_class.__name__}))
        (repo_cache / "refs").mkdir()
        (repo_cache / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def load_real(path: Path, model: str, precision: str, pipeline: Path):
    """The real profile's transformer and origin for `path` in the `model` x `precision` slot."""
    toml = path.parent / f"{path.name}.{precision}.models.toml"
    toml.write_text(f'["{model}"]\npipeline = "{pipeline}"\n["{model}".checkpoints]\n'
                    f'{precision} = {{ path = "{path}" }}\n')
    return RealSource(toml).transformer(Combo(model, precision), CPU)


def effective_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as the loaded model computes with it (dequantized, float32)."""
    weights = {}
    for name, m in module.named_modules():
        if isinstance(m, BFLNVFP4Linear):
            weights[f"{name}.weight"] = dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2).float()
        elif isinstance(m, BFLFP8RLinear):
            weights[f"{name}.weight"] = dequantize_fp8r(m.weight, m.weight_scale).float()
        elif isinstance(m, torch.nn.Linear) and isinstance(m.weight, GGUFParameter) and m.weight.quant_type > 1:
            weights[f"{name}.weight"] = dequantize_gguf_tensor(m.weight).float()
    return weights


def weight_errors(module: torch.nn.Module, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative Frobenius error of each quantized linear's effective weight against the true bf16 weight."""
    return {key: float((w - ref[key].float()).norm() / ref[key].float().norm())
            for key, w in effective_weights(module).items()}


def image(model: str, transformer: torch.nn.Module, size: int = 128, steps: int = 2) -> np.ndarray:
    """A `steps`-step `size` px image of the tiny pipeline around `transformer` (bf16 components, fixed seed)."""
    spec = MODELS[model]
    components = spec.builder.tiny_components(SEED)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.to(CPU, torch.bfloat16)
    pipe = spec.builder.pipeline_class(transformer=transformer, **components)
    pipe.set_progress_bar_config(disable=True)
    settings = spec.tiny
    out = pipe(prompt="a red fox", height=size, width=size, num_inference_steps=steps,
               guidance_scale=settings.guidance_scale,
               generator=torch.Generator().manual_seed(SEED), output_type="np",
               **{k: v for k, v in settings.extra.items() if k == "max_sequence_length"})
    return out.images[0]
