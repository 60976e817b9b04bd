"""Round-trip error bounds of every precision, through its real file format and the loaders' own dequantizers.

Each bound is derived from the format alone (comments on the `*_bound` functions) and checked element by element
against bf16 inputs. Errors are computed in float64 against the bf16 value, so the only float slack needed is the
fp32 arithmetic inside the quantizers (a relative 1e-5 on the bound is ample).
"""

import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.bfl.utils import dequantize_fp8r, dequantize_nvfp4
from hypothesis import assume, example, given, settings, target
from hypothesis import strategies as st
from safetensors.torch import load_file

from fluxgate.precisions import PRECISIONS

QUANTIZED = [name for name in PRECISIONS if name != "bf16"]
FLOAT_SLACK = 1 + 1e-5
ROW_SCALES = [1.0, 0.0, 1e-6, 1e-3, 1e4]  # all-zero rows, tiny and large magnitudes in one matrix


@st.composite
def weights(draw) -> torch.Tensor:
    """bf16 `[N, K]`, N a multiple of 16 up to 64 and K of 32 up to 256: gaussian rows of mixed magnitude
    (some all zero) plus a few outliers up to 1e4."""
    n, k = 16 * draw(st.integers(1, 4)), 32 * draw(st.integers(1, 8))
    row_scales = draw(st.lists(st.sampled_from(ROW_SCALES) | st.floats(1e-6, 1e4), min_size=n, max_size=n))
    values = torch.randn(n, k, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1))))
    values *= torch.tensor(row_scales)[:, None]
    for row, col, value in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, k - 1),
                                                   st.floats(-1e4, 1e4)), max_size=4)):
        values[row, col] = value
    return values.to(torch.bfloat16)


def _state_dict(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A quantizable linear `w` plus tensors that must stay in high precision: its bias and a norm weight."""
    n = weight.shape[0]
    bias = torch.linspace(-3, 3, n).to(torch.bfloat16)
    return {"w.weight": weight, "w.bias": bias, "norm.weight": (bias * 1e-3 + 1).to(torch.bfloat16)}


def _stored(path: Path) -> dict[str, tuple[object, torch.Tensor]]:
    """Every tensor in the file as the loader reads it: name -> (stored type, float32 dequantized value)."""
    if path.suffix == ".gguf":
        return {t.name: (t.tensor_type, torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))))
                for t in gguf.GGUFReader(str(path)).tensors}
    raw = load_file(str(path))
    values = {}
    for key, tensor in raw.items():
        prefix = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{prefix}.weight_scale_2" in raw:
            tensor = dequantize_nvfp4(tensor, raw[f"{prefix}.weight_scale"], raw[f"{prefix}.weight_scale_2"])
        elif key.endswith(".weight") and f"{prefix}.weight_scale" in raw:
            tensor = dequantize_fp8r(tensor, raw[f"{prefix}.weight_scale"])
        values[key] = (raw[key].dtype, tensor.float())
    return values


def write(precision: str, state_dict: dict[str, torch.Tensor], folder: Path) -> Path:
    """`state_dict` written in `precision`'s format into `folder`, quantizing `w.weight` only."""
    spec = PRECISIONS[precision]
    path = folder / f"transformer{spec.suffix}"
    spec.write(state_dict, {"w.weight"}, path, "flux")
    return path


def round_trip(precision: str, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[object, torch.Tensor]]:
    """Write `state_dict` in `precision`'s format and read it back (a temporary folder: hypothesis calls it often)."""
    with tempfile.TemporaryDirectory() as folder:
        return _stored(write(precision, state_dict, Path(folder)))


def fp8r_bound(w: torch.Tensor) -> torch.Tensor:
    """E4M3 has 3 mantissa bits: rounding a normal value v moves it by at most half an ulp <= |v|/16; below 2^-6
    the subnormal spacing is 2^-9, so by at most 2^-10. v = w / scale with scale = row amax / 448 (v never exceeds
    448, the E4M3 max), so in weight units |err| <= |w|/16 + scale * 2^-10."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
    return w.abs() / 16 + scale * 2**-10


def q8_0_bound(w: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 along K, codes = round(w / d) with d = block amax / 127: |w - code * d| <= d/2. The file holds d
    as fp16 (d16): |d16 - d| <= d * 2^-11 (10 mantissa bits) or <= 2^-25 in fp16's subnormal range (spacing 2^-24),
    and |code| <= 127, so |err| <= d/2 + 127 * max(d * 2^-11, 2^-25). (Blocks with d < 2^-25 flush to zero.)"""
    n, k = w.shape
    d = w.abs().reshape(n, k // 32, 32).amax(dim=-1, keepdim=True) / 127
    bound = d / 2 + 127 * torch.clamp(d * 2**-11, min=2**-25)
    return bound.expand(n, k // 32, 32).reshape(n, k)


def nvfp4_bound(w: torch.Tensor) -> torch.Tensor:
    """Global s2 = A / (448 * 6) (A = tensor amax); a block of 16 with amax a wants scale factor b = a / (6 * s2)
    <= 448, stored as E4M3 bs with |bs - b| <= max(b/16, 2^-10) (as for fp8r), so scale = bs * s2 <= a * 17/96 +
    s2 * 2^-10. y = w / scale rounds onto the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, whose half-spacing (.25 below
    2, .5 below 4, 1 up to 6) is at most max(|y|, 1) / 4: |err| <= max(|w|, scale) / 4. When bs rounded down, |y|
    can pass 6 and is clamped: err = |w| - 6 * scale <= 6 * s2 * |b - bs|, which is below |w|/4 for a normal bs
    (|y| <= 6.4) and <= 6 * s2 * 2^-10 for a subnormal or zero bs (a zero bs flushes its block to zero).
    So |err| <= max(|w|/4, scale_max/4, 6 * s2 * 2^-10)."""
    n, k = w.shape
    s2 = w.abs().amax() / (448 * 6)
    block_amax = w.abs().reshape(n, k // 16, 16).amax(dim=-1, keepdim=True)
    scale_max = (block_amax * 17 / 96 + s2 * 2**-10).expand(n, k // 16, 16).reshape(n, k)
    return torch.maximum(torch.maximum(w.abs(), scale_max) / 4, 6 * s2 * 2**-10)


BOUNDS = {"fp8-scaled": fp8r_bound, "gguf-q8_0": q8_0_bound, "nvfp4": nvfp4_bound}


def error_ratio(precision: str, weight: torch.Tensor) -> torch.Tensor:
    """|dequantized - w| / bound per element, in float64; <= 1 everywhere when the bound holds."""
    w = weight.double()
    dequantized = round_trip(precision, _state_dict(weight))["w.weight"][1].double()
    return (dequantized - w).abs() / BOUNDS[precision](w)


# gguf's Q8_0 takes 1/d, which overflows for a block with amax below ~1e-37: its codes are garbage, but its fp16 d
# is 0, so the block flushes to zero, within the bound.
@pytest.mark.filterwarnings("ignore:(divide by zero|overflow|invalid value) encountered:RuntimeWarning")
@pytest.mark.parametrize("precision", QUANTIZED)
@settings(max_examples=25, deadline=None)
@given(weight=weights())
@example(weight=torch.tensor([[1e-38] * 32, [1e4] + [-1e-6] * 31] * 8).to(torch.bfloat16))  # bf16 extremes
def test_quantized_weight_error_stays_within_format_bound(precision, weight):
    # An all-zero nvfp4 weight comes back NaN: see test_nvfp4_all_zero_weight_round_trips_to_zeros.
    assume(precision != "nvfp4" or weight.any())
    ratio = error_ratio(precision, weight)
    target(float(ratio.max()), label=f"{precision} error / bound")
    worst = tuple(int(i) for i in np.unravel_index(int(ratio.argmax()), ratio.shape))
    assert ratio.max() <= FLOAT_SLACK, f"error is {float(ratio.max()):.3f}x the bound at (row, col) {worst}"


@pytest.mark.parametrize("precision", QUANTIZED)
def test_error_bound_is_tight_on_gaussian_weights(precision):
    # A bound far above the real error would let a broken quantizer pass the property test.
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert error_ratio(precision, weight).max() > 0.9


def test_nvfp4_all_zero_weight_round_trips_to_zeros():
    stored = round_trip("nvfp4", _state_dict(torch.zeros(16, 32, dtype=torch.bfloat16)))
    assert torch.equal(stored["w.weight"][1], torch.zeros(16, 32))


@pytest.mark.parametrize("precision", QUANTIZED)
def test_unquantized_tensors_come_back_exactly_in_high_precision(precision):
    state_dict = _state_dict(torch.randn(16, 64).to(torch.bfloat16))
    stored = round_trip(precision, state_dict)
    high = gguf.GGMLQuantizationType.F32 if precision == "gguf-q8_0" else torch.bfloat16
    for key in ("w.bias", "norm.weight"):
        stored_type, value = stored[key]
        assert stored_type == high, key
        assert torch.equal(value, state_dict[key].float()), key
    assert {key for key in stored if key.startswith("norm.")} == {"norm.weight"}, "norm.weight got scales"


EXPECTED_LAYOUT = {  # key -> (dtype, shape) for a [16, 64] w.weight
    "fp8-scaled": {"w.weight": (torch.float8_e4m3fn, (16, 64)), "w.weight_scale": (torch.float32, (16,))},
    "nvfp4": {"w.weight": (torch.uint8, (16, 32)), "w.weight_scale": (torch.float8_e4m3fn, (16, 4)),
              "w.weight_scale_2": (torch.float32, ()), "w.input_scale": (torch.float32, ())},
}


@pytest.mark.parametrize("precision", sorted(EXPECTED_LAYOUT))
def test_safetensors_file_has_the_loader_layout(precision, tmp_path):
    raw = load_file(str(write(precision, _state_dict(torch.randn(16, 64).to(torch.bfloat16)), tmp_path)))
    layout = {key: (value.dtype, tuple(value.shape)) for key, value in raw.items()
              if key.startswith("w.") and key != "w.bias"}
    assert layout == EXPECTED_LAYOUT[precision]


def test_gguf_file_holds_the_quantized_weight_as_q8_0_with_its_shape(tmp_path):
    reader = gguf.GGUFReader(str(write("gguf-q8_0", _state_dict(torch.randn(16, 64).to(torch.bfloat16)), tmp_path)))
    tensors = {t.name: (t.tensor_type, [int(d) for d in t.shape]) for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    assert tensors["w.weight"] == (gguf.GGMLQuantizationType.Q8_0, [64, 16])  # GGUF lists dims innermost first
    assert arch == "flux"


@settings(max_examples=25, deadline=None)
@given(weight=weights())
def test_bf16_checkpoint_round_trips_exactly(weight):
    state_dict = _state_dict(weight)
    stored = round_trip("bf16", state_dict)
    assert {key: dtype for key, (dtype, _) in stored.items()} == dict.fromkeys(state_dict, torch.bfloat16)
    for key, value in state_dict.items():
        assert torch.equal(stored[key][1], value.float()), key
