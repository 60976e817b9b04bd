"""fluxgate.measuring.flops: model FLOPs per denoising step (analytic for linears, the same for every precision of a model),
the GEMM roof (none on CPU) and MFU."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fluxgate.measuring import flops
from fluxgate.precisions import PRECISIONS


def test_linear_flops_match_two_m_n_k():
    module = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16, bias=False))
    inputs = torch.randn(8, 64)

    # Not a diffusers model: no config to build a meta twin from, so the module itself is counted, with a warning.
    with pytest.warns(UserWarning, match="meta-device twin"):
        counted = flops.count_step_flops(SimpleNamespace(transformer=module), {}, calls=[((inputs,), {})])

    assert counted == 2 * 8 * 64 * 32 + 2 * 8 * 32 * 16


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_attention_flops_count_on_cpu_too():
    b, h, s, d = 1, 2, 16, 8
    q = k = v = torch.randn(b, h, s, d)

    with pytest.warns(UserWarning, match="meta-device twin"):
        counted = flops.count_step_flops(SimpleNamespace(transformer=Attention()), {}, calls=[((q, k, v), {})])

    assert counted == 2 * (2 * b * h * s * s * d)  # QK^T and PV


def test_one_step_is_one_transformer_forward_whatever_steps_the_call_asks_for(tiny_call_kwargs, tiny_flux1):
    calls = flops.capture_transformer_calls(tiny_flux1("bf16"), tiny_call_kwargs)

    assert len(calls) == 1
    args, kwargs = calls[0]
    assert kwargs["hidden_states"].shape == (1, (256 // 16) ** 2, 64)  # 8x VAE, 2x2 packing: 16x16 tokens


def test_step_flops_are_the_same_for_every_precision_of_a_model(tiny_call_kwargs, tiny_flux1):
    counted = {precision: flops.count_step_flops(tiny_flux1(precision), tiny_call_kwargs) for precision in PRECISIONS}

    assert counted["bf16"] > 0
    assert set(counted.values()) == {counted["bf16"]}, counted


def test_meta_twin_count_equals_the_count_of_the_loaded_bf16_transformer(tiny_call_kwargs, tiny_flux1):
    pipe = tiny_flux1("bf16")
    calls = flops.capture_transformer_calls(pipe, tiny_call_kwargs)

    # The math attention backend runs attention as two bmm, which the stock counter sees.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as live:
        for args, kwargs in calls:
            pipe.transformer(*args, **kwargs)

    assert live.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0
    assert flops.count_step_flops(pipe, tiny_call_kwargs, calls=calls) == live.get_total_flops()


def test_no_roof_on_cpu():
    assert flops.measure_roof(torch.device("cpu")) == {}


def test_mfu_is_achieved_model_flops_over_the_roof():
    assert flops.mfu(flops_per_step=100e12, it_s=4.0, roof_tflops=800.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="roof"):
        flops.mfu(1e12, 1.0, 0.0)
