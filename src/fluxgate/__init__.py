"""fluxgate: the PR gate for quantized diffusion models (speed, VRAM and image similarity per model x precision)."""

__version__ = "0.1.0"

# diffusers 0.42.1 logs "Unable to import `torchao` Tensor objects" whenever torchao >= 0.16 is installed (it looks
# for layouts torchao has since removed), once per process, at import: about loading torchao-serialized checkpoints,
# which fluxgate never does (its torchao backend quantizes after loading). Set before diffusers is first imported.
import logging as _logging  # noqa: E402

_logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(_logging.ERROR)
