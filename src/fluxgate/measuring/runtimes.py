"""How each value of the matrix's runtime axis (`fluxgate.matrix.RUNTIMES`) executes the transformer: eager (the
default) or under torch.compile.

`compile` uses diffusers' regional compilation (`ModelMixin.compile_repeated_blocks`): every repeated transformer
block is compiled once with `torch.compile` and the compiled code is shared by all blocks of that class, which keeps
the compile time of a 57-block FLUX.1 transformer to that of two blocks while running at full-compile speed (the
blocks hold nearly all FLOPs). Compilation happens on the first call; `warm_up` makes that call outside the timed
images and reports how long compiling took, so compile time never lands inside a timed step.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fluxgate.matrix import RUNTIMES

if TYPE_CHECKING:
    import torch

DEFAULT_COMPILE_MODE = "default"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # no CUDA graphs: step timing needs one launch per op


def prepare(transformer: "torch.nn.Module", runtime: str, mode: str = DEFAULT_COMPILE_MODE) -> "torch.nn.Module":
    """Make `transformer` (a model's denoiser) run under `runtime` (in place; compilation itself happens on the first
    call): its repeated blocks compiled where the diffusers class names them (`_repeated_blocks`), else the whole
    module (`nn.Module.compile`, e.g. a UNet)."""
    if RUNTIMES[runtime].compiles:
        if getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks(mode=mode)
        else:
            transformer.compile(mode=mode)
    return transformer


def warm_up(pipe, call_kwargs: dict, device: "torch.device") -> float:
    """Compile time in seconds: the first one-step call (compilation + a step) less a second one (a step)."""
    import torch

    def one_step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        pipe(**{**call_kwargs, "num_inference_steps": 1})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = one_step()
    return max(first - one_step(), 0.0)


def reset(runtime: str) -> None:
    """Forget compiled code after a compiled combo, so it neither holds the combo's weights nor counts towards the
    next combo's recompile limit."""
    if RUNTIMES[runtime].compiles:
        import torch

        torch._dynamo.reset()
