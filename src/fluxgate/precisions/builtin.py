"""fluxgate's own precisions and their other backends, registered through `fluxgate.registry` like any team's
(`fluxgate.precisions` and `fluxgate.backends` groups)."""

from __future__ import annotations

from fluxgate.precisions import BackendSpec, PrecisionSpec

PRECISIONS = (
    PrecisionSpec("bf16", tier="reference", format="fluxgate.precisions.bf16:FORMAT",
                  description="safetensors, every tensor bfloat16 (BFL's and Tongyi's releases)"),
    PrecisionSpec("fp8-scaled", tier="8bit", format="fluxgate.precisions.fp8_scaled:FORMAT",
                  description="BFL fp8r: E4M3 weights with a per-row fp32 scale, diffusers' BFLFP8RLinear"),
    PrecisionSpec("gguf-q8_0", tier="8bit", format="fluxgate.precisions.gguf_q8_0:FORMAT", suffix=".gguf",
                  block_size=32, requires=("gguf",),
                  description="GGUF Q8_0 (city96 / ComfyUI-GGUF), diffusers' GGUFLinear"),
    PrecisionSpec("nvfp4", tier="4bit", format="fluxgate.precisions.nvfp4:FORMAT", block_size=16,
                  description="ModelOpt NVFP4: E2M1 weights, an E4M3 scale per 16 values, diffusers' BFLNVFP4Linear"),
)

BACKENDS = (
    BackendSpec("fp8-scaled", "comfy", format="fluxgate.precisions.fp8_comfy:FORMAT", requires=("comfy_kitchen",),
                description="ComfyUI's mixed-precision fp8 path through comfy-kitchen: per-tensor weight scale, static "
                            "input scale (1.0 when the file has none), scaled_mm_v2 without fast accumulation",
                own_file=True),
    BackendSpec("fp8-scaled", "torchao", format="fluxgate.precisions.fp8_torchao:FORMAT", requires=("torchao",),
                description="diffusers users' fp8 through torchao: per-row weight scale, each input quantized per "
                            "row (dynamic), _scaled_mm with fast accumulation"),
    BackendSpec("nvfp4", "fp8", format="fluxgate.precisions.nvfp4_fp8:FORMAT",
                description="the NVFP4 weights re-quantized to fp8 per row at load, diffusers' BFLFP8RLinear: FP8 "
                            "GEMMs on a GPU without FP4 tensor cores (Hopper)"),
)
