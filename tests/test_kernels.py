"""fluxgate.measuring.kernels: which GEMM path the quantized linears of a combo ran. On CPU every quantized combo dequantizes
(the forced-fallback case); layers that run `torch._scaled_mm` (the H100 fp8 path) are told apart from it."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.quantizers.bfl.utils import FP8_MAX, BFLFP8RLinear, quantize_fp8r

from fluxgate.measuring import kernels
from fluxgate.measuring.kernels import BF16_GEMM, DEQUANT_FALLBACK, kernel_path
from fluxgate.precisions import PRECISIONS
from fluxgate.precisions.fp8_scaled import FP8_GEMM
from fluxgate.precisions.spec import FastGemm, PrecisionFormat

QUANTIZED_CLASS = {"fp8-scaled": "BFLFP8RLinear", "nvfp4": "BFLNVFP4Linear", "gguf-q8_0": "GGUFLinear"}


@pytest.mark.parametrize("precision", list(QUANTIZED_CLASS))
def test_quantized_combo_on_cpu_is_flagged_as_dequantize_fallback(tiny_call_kwargs, tiny_flux1, precision):
    path = kernel_path(tiny_flux1(precision), tiny_call_kwargs, precision)

    assert path.fallback is True and path.label == DEQUANT_FALLBACK
    assert path.quantized_linears > 0 and path.quantized_linear_calls == path.quantized_linears
    assert path.quantized_kinds == {QUANTIZED_CLASS[precision]: path.quantized_linears}
    assert "aten::_scaled_mm" not in path.op_counts and path.op_counts["aten::addmm"] > 0


def test_bf16_combo_runs_plain_bf16_gemm(tiny_call_kwargs, tiny_flux1):
    path = kernel_path(tiny_flux1("bf16"), tiny_call_kwargs, "bf16")

    assert path.fallback is False and path.label == BF16_GEMM
    assert path.quantized_linears == 0 and path.op_counts["aten::addmm"] > 0
    assert path.to_json()["label"] == BF16_GEMM
    assert path.host_syncs_per_step is None  # CPU: no host-device syncs to count


def test_host_syncs_count_the_cuda_calls_that_make_the_host_wait_inside_the_step_only():
    def event(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    # a FLUX.1 nvfp4 eager step on the H100 blocks on a lookup-table copy in every linear; the profiler's own
    # closing sync comes after the step's range
    events = [event(kernels.STEP_RANGE, 0, 1000)]
    events += [event("cudaMemcpyAsync", 2 * i, 2 * i + 1) for i in range(494)]
    events += [event("cudaStreamSynchronize", 2 * i + 1, 2 * i + 2) for i in range(494)]
    events += [event("cudaLaunchKernel", 990, 991), event("cudaDeviceSynchronize", 1001, 1500)]
    assert kernels.host_syncs(events) == 494
    assert kernels.host_syncs([event(kernels.STEP_RANGE, 0, 10), event("cudaLaunchKernel", 1, 2)]) == 0
    assert kernels.host_syncs([event("cudaStreamSynchronize", 1, 2)]) == 0  # no step range: nothing inside it


class ScaledMMLinear(BFLFP8RLinear):
    """BFLFP8RLinear's CUDA path (per-row E4M3 activations, `torch._scaled_mm`) without the CUDA check."""

    def forward(self, inputs):
        x = inputs.reshape(-1, self.in_features).float()
        x_scale = (x.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        x_q = (x / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_q, self.weight.T, x_scale, self.weight_scale[None, :], out_dtype=torch.bfloat16)
        return out.reshape(*inputs.shape[:-1], self.out_features)


def fp8_layer(cls: type, features: int = 32) -> BFLFP8RLinear:
    layer = cls(features, features, bias=False, compute_dtype=torch.bfloat16)
    weight, scale = quantize_fp8r(torch.randn(features, features, generator=torch.Generator().manual_seed(0)))
    layer.weight.data, layer.weight_scale.data = weight, scale
    return layer


def path_of(*layers: torch.nn.Module, precision: str = "fp8-scaled") -> kernels.KernelPath:
    transformer = torch.nn.Sequential(*layers)
    return kernel_path(SimpleNamespace(transformer=transformer), {}, precision,
                       calls=[((torch.randn(4, 32, dtype=torch.bfloat16),), {})])


def test_fp8_layers_that_run_scaled_mm_are_labelled_fp8_gemm():
    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(ScaledMMLinear))

    assert path.label == FP8_GEMM and path.fallback is False
    assert path.op_counts["aten::_scaled_mm"] == 2 and path.quantized_linear_calls == 2


def test_some_layers_falling_back_flags_the_combo_and_says_how_many():
    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(BFLFP8RLinear))

    assert path.fallback is True
    assert path.label == f"{FP8_GEMM}; dequantize fallback in 1 of 2 calls"


def test_quantized_precision_without_quantized_layers_is_a_fallback():
    path = path_of(torch.nn.Linear(32, 32).to(torch.bfloat16), precision="nvfp4")

    assert path.fallback is True and path.label.startswith(BF16_GEMM) and "dequantized at load" in path.label


def test_without_the_profiler_dispatched_ops_are_counted_instead(monkeypatch):
    def broken_profiler(*args, **kwargs):
        raise RuntimeError("profiler unavailable")

    monkeypatch.setattr(kernels, "profile", broken_profiler)

    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(BFLFP8RLinear))

    assert path.method == "dispatch" and path.op_counts["aten::_scaled_mm"] == 1 and path.fallback is True


def test_profiles_detach_cupti_unless_the_environment_says_otherwise(monkeypatch):
    import os
    import warnings

    monkeypatch.setenv(kernels.CUPTI_TEARDOWN_ENV, "")  # so the test's end restores this process's own setting
    monkeypatch.delenv(kernels.CUPTI_TEARDOWN_ENV)
    assert not kernels.profiler_teardown()
    assert kernels.configure_profiler_teardown() and os.environ[kernels.CUPTI_TEARDOWN_ENV] == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already "1", or empty (Kineto's default): set quietly
        assert kernels.configure_profiler_teardown()
        monkeypatch.setenv(kernels.CUPTI_TEARDOWN_ENV, "")
        assert kernels.configure_profiler_teardown() and os.environ[kernels.CUPTI_TEARDOWN_ENV] == "1"
    monkeypatch.setenv(kernels.CUPTI_TEARDOWN_ENV, "0")
    with pytest.warns(UserWarning, match="TEARDOWN_CUPTI=0 is set in the environment: CUPTI stays attached"):
        assert not kernels.configure_profiler_teardown()
    assert os.environ[kernels.CUPTI_TEARDOWN_ENV] == "0"


def test_each_precision_spec_names_its_own_fast_gemm():
    fp8, fp4 = PRECISIONS["fp8-scaled"].fast_gemm, PRECISIONS["nvfp4"].fast_gemm
    assert fp8.label == FP8_GEMM and fp8.matches("aten::_scaled_mm") and not fp8.matches("aten::mm")
    assert fp4.matches("flashinfer::mm_fp4") and fp4.matches("cutlass_e2m1_gemm_kernel")
    assert not fp4.matches("aten::_scaled_mm") and not fp4.matches("aten::addmm")
    assert PRECISIONS["bf16"].fast_gemm is None and PRECISIONS["gguf-q8_0"].fast_gemm is None


# A team's load-then-transform fp8 backend whose GEMM is the same op as fp8-scaled's (torchao's row-wise fp8 also runs
# `torch._scaled_mm`); its layers are recognised by their class here.
TEAM_FP8 = PrecisionFormat(is_quantized=lambda module: isinstance(module, BFLFP8RLinear),
                                   fast_gemm=FastGemm("team fp8 GEMM", lambda name: name == "aten::_scaled_mm"))


@pytest.fixture
def team_fp8(monkeypatch):
    from fluxgate.precisions import PrecisionSpec

    spec = PrecisionSpec("team-fp8", tier="8bit", format=f"{__name__}:TEAM_FP8", file_precision="bf16")
    monkeypatch.setattr(kernels, "PRECISIONS", {**PRECISIONS, spec.name: spec})


def test_a_combo_is_labelled_by_its_own_fast_gemm_where_another_precision_matches_the_same_op(team_fp8):
    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(ScaledMMLinear), precision="team-fp8")
    assert path.label == "team fp8 GEMM" and path.fallback is False

    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(ScaledMMLinear), precision="fp8-scaled")
    assert path.label == FP8_GEMM and path.fallback is False


def test_a_shared_fast_gemm_op_is_counted_once_so_a_partial_fallback_shows(team_fp8):
    path = path_of(fp8_layer(ScaledMMLinear), fp8_layer(BFLFP8RLinear), precision="team-fp8")
    assert path.fallback is True and path.label == "team fp8 GEMM; dequantize fallback in 1 of 2 calls"


def _comfy_layers(*full_precision: bool) -> list[torch.nn.Module]:
    fp8_comfy = pytest.importorskip("fluxgate.precisions.fp8_comfy", exc_type=ImportError)
    layers = []
    for full in full_precision:
        layer = fp8_layer(BFLFP8RLinear)
        layer.weight_scale.data = layer.weight_scale.data.amax().expand(32).contiguous()  # one scale per tensor
        layer.full_precision_matrix_mult = full
        layers.append(fp8_comfy.ComfyFP8Linear.from_fp8r(layer, torch.bfloat16))
    return layers


def test_layers_the_file_runs_in_full_precision_are_counted_apart_not_as_a_fallback():
    """ComfyUI's `full_precision_matrix_mult`: the layer's bf16 GEMM is what the file asks for; the other layers'
    FP8 GEMM is still required of them."""
    from fluxgate.precisions.fp8_comfy import FP8_TENSORWISE_GEMM

    both = path_of(*_comfy_layers(True, False))
    assert (both.fallback, both.full_precision_linears, both.quantized_linear_calls) == (False, 1, 1)
    assert both.label == (f"{FP8_TENSORWISE_GEMM}; 1 of 2 quantized linears dequantized -> bf16 GEMM as the file asks "
                          "(full_precision_matrix_mult)")
    assert path_of(*_comfy_layers(True, True)).label == ("bf16 GEMM (2 quantized linears dequantized as the file "
                                                         "asks: full_precision_matrix_mult)")
    assert path_of(*_comfy_layers(True, True)).fallback is False


def test_a_full_precision_comfy_layer_computes_with_its_dequantized_weight_and_unquantized_input():
    """ComfyUI's `forward_comfy_cast_weights`: weight dequantized to bf16, a bf16 GEMM on the input as it is."""
    (layer,) = _comfy_layers(True)
    inputs = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 600  # past e4m3
    expected = torch.nn.functional.linear(inputs, layer.weight.dequantize().to(torch.bfloat16))
    assert torch.equal(layer(inputs), expected)
