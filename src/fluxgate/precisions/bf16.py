"""`bf16`, the reference: safetensors with every tensor bfloat16, as BFL's and Tongyi's own releases store them.

Nothing is quantized, so the loader keeps plain `nn.Linear` layers and every GEMM is a bf16 one.
"""

from __future__ import annotations

from fluxgate.precisions.spec import PrecisionFormat, safetensors_writer

FORMAT = PrecisionFormat(write=safetensors_writer(None), quantization_config=lambda dtype: None)
