"""The weight precisions of the matrix: one `PrecisionSpec` per precision, each in its own module. Adding a precision is
one module here and its entry in `PRECISIONS`.

A spec carries all fluxgate knows of its precision: the checkpoint file's format and writer (`write`), the config of
diffusers' own single-file loader (`quantization_config`), the same tensors made in memory for the synthetic profile
(`layout`), the quantized linear layer the loader swaps in and the shapes of its tensors (`quantized_layer`,
`packed_shapes`), and the low-precision GEMM a profile shows when that layer does not fall back to dequantizing
(`fast_gemm`). Every file is in diffusers key format, so `from_single_file(path, config=<folder with config.json>)`
loads it without a key conversion.
"""

from __future__ import annotations

import os

# Must be set before diffusers' GGUF utils are imported: its CUDA-kernels path downloads code from the Hub.
os.environ.setdefault("DIFFUSERS_GGUF_CUDA_KERNELS", "false")

from fluxgate.precisions import bf16, fp8_scaled, gguf_q8_0, nvfp4  # noqa: E402
from fluxgate.precisions.spec import DTYPE, PrecisionSpec  # noqa: E402

__all__ = ["DTYPE", "PRECISIONS", "PrecisionSpec"]

PRECISIONS: dict[str, PrecisionSpec] = {spec.name: spec for spec in (bf16.SPEC, fp8_scaled.SPEC, gguf_q8_0.SPEC,
                                                                      nvfp4.SPEC)}
