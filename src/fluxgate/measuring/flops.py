"""Model FLOPs per denoising step, the device's GEMM roof, and model FLOPs utilisation (MFU).

"Model FLOPs" are the GEMM and attention FLOPs the model needs (2*M*N*K per matmul, 4*B*H*Sq*Sk*D per attention),
whatever kernels a precision runs them with; elementwise work, norms, softmax and dequantization are not counted. They
are the same for every precision of a model, so they are counted on a BF16 twin of the transformer built on the meta
device (no memory, no compute) and fed the shapes of the real inputs.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.utils import flop_counter
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from fluxgate.models import denoiser_of

# (positional args, keyword args) of one transformer forward.
TransformerCall = tuple[tuple, dict]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The counter's own attention formula, for the SDPA variants its registry lacks."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# Attention ops the counter's registry lacks (torch 2.13): CPU SDPA would otherwise count as zero FLOPs.
_EXTRA_FORMULAS = {
    getattr(torch.ops.aten, name): _sdpa_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name)
}


def capture_transformer_calls(pipe, call_kwargs: dict) -> list[TransformerCall]:
    """The inputs of every transformer forward in one denoising step: copies taken during a 1-step pipeline call
    (latents out, so the VAE does not run). Two calls per step when the pipeline runs true CFG as separate passes."""
    calls: list[TransformerCall] = []

    def record(module, args, kwargs):
        calls.append(tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, (args, kwargs)))

    kwargs = {key: value for key, value in call_kwargs.items() if key != "callback_on_step_end"}
    # A fresh generator: a caller's generator must not be advanced, and the noise values do not change any shape.
    kwargs.update(num_inference_steps=1, output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
    handle = denoiser_of(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(**kwargs)
    finally:
        handle.remove()
    return calls


def _count(module: torch.nn.Module, calls: list[TransformerCall]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        for args, kwargs in calls:
            module(*args, **kwargs)
    return counter.get_total_flops()


def _compute_dtype(calls: list[TransformerCall]) -> torch.dtype:
    """The dtype of the first floating-point input (the latents): the dtype the transformer computes in."""
    for leaf in tree_leaves(calls):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return torch.bfloat16


def _meta_twin(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer's architecture from its config, plain `nn.Linear` everywhere, on the meta device."""
    with torch.device("meta"):
        twin = type(transformer).from_config(transformer.config)
    return twin.to(dtype).eval()


def count_step_flops(pipe, call_kwargs: dict, *, calls: list[TransformerCall] | None = None) -> float:
    """Model FLOPs of one denoising step (every transformer forward of the step), in FLOPs.

    Counted on a meta-device BF16 twin of `pipe.transformer`, because a quantized transformer's counts depend on its
    kernels: `torch._scaled_mm` (fp8) is in the counter's registry, but FlashInfer's FP4 GEMM is not and would count as
    zero, and CPU attention is missing from the registry. If the twin cannot be built or run (not a diffusers model, an
    op without a meta kernel), the loaded transformer is counted instead, with a warning. `calls` reuses inputs from
    `capture_transformer_calls`.
    """
    calls = capture_transformer_calls(pipe, call_kwargs) if calls is None else calls
    transformer = getattr(denoiser_of(pipe), "_orig_mod", denoiser_of(pipe))  # unwrap torch.compile
    try:
        twin = _meta_twin(transformer, _compute_dtype(calls))
        meta_calls = tree_map(lambda x: torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x,
                              calls)
        return float(_count(twin, meta_calls))
    except Exception as error:  # any failure of the twin: the live count is the next best answer
        warnings.warn(f"count_step_flops: the meta-device twin of {type(transformer).__name__} failed "
                      f"({type(error).__name__}: {error}); counting the loaded transformer, whose quantized kernels "
                      f"the counter may not see", stacklevel=2)
        return float(_count(denoiser_of(pipe), calls))


def _time_ms(fn, warmup: int, iters: int) -> float:
    """Milliseconds per call of `fn` on the current CUDA stream, by CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _fp8_gemm(a: torch.Tensor, b: torch.Tensor):
    """An E4M3 x E4M3 -> BF16 `torch._scaled_mm` as diffusers' BFLFP8RLinear runs it (row-wise fp32 scales, fast
    accumulation), or tensor-wise scales where row-wise is unsupported. `a` must be row-major `[M, K]` and `b`
    column-major `[K, N]` (the transpose of a row-major `[N, K]`). Returns (the call, the scaling used)."""
    rows, cols = a.shape[0], b.shape[1]
    rowwise = (torch.ones(rows, 1, device=a.device), torch.ones(1, cols, device=a.device))
    tensorwise = (torch.ones((), device=a.device), torch.ones((), device=a.device))
    for name, (scale_a, scale_b) in (("rowwise", rowwise), ("tensorwise", tensorwise)):
        call = functools.partial(torch._scaled_mm, a, b, scale_a, scale_b, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
        try:
            call()
        except RuntimeError:
            continue
        return call, name
    raise RuntimeError("torch._scaled_mm supports neither row-wise nor tensor-wise scales on this device")


def measure_roof(device: torch.device, size: int = 8192, warmup: int = 3, iters: int = 10) -> dict:
    """Dense GEMM throughput of the device in TFLOP/s from `size`^3 GEMMs; {} on CPU. Keys: gemm_size, bf16_tflops,
    fp8_tflops and fp8_scaling ("rowwise" or "tensorwise"), or fp8_error.

    fp8 is measured only on compute capability 8.9+; where it fails, "fp8_error" says why. 26 GEMMs of 1.1 TFLOP each:
    well under a second on an H100, most of it cuBLAS start-up.
    """
    if device.type != "cuda":
        return {}
    flops = 2.0 * size**3
    roof: dict = {"gemm_size": size}
    with torch.cuda.device(device):
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
        out = torch.empty(size, size, device=device, dtype=torch.bfloat16)
        roof["bf16_tflops"] = flops / _time_ms(lambda: torch.mm(a, b, out=out), warmup, iters) / 1e9
        if torch.cuda.get_device_capability(device) >= (8, 9):
            try:
                call, roof["fp8_scaling"] = _fp8_gemm(a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t())
                roof["fp8_tflops"] = flops / _time_ms(call, warmup, iters) / 1e9
            except RuntimeError as error:
                roof["fp8_error"] = " ".join(str(error).split())[:200]
        a = b = out = None  # free the operands (the timing closures above are done with them)
        torch.cuda.empty_cache()
    return roof


def mfu(flops_per_step: float, it_s: float, roof_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (FLOPs per step x steps per second) over the roof, a fraction."""
    if roof_tflops <= 0:
        raise ValueError(f"mfu: roof must be > 0 TFLOP/s, got {roof_tflops}")
    return flops_per_step * it_s / (roof_tflops * 1e12)
