"""fluxgate: the PR gate for quantized diffusion models (speed, VRAM and image similarity per model x precision)."""

__version__ = "0.1.0"
