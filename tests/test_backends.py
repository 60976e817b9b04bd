"""The backend axis: which backend runs a precision's file (`--backends`, marks, combo ids), the skips that say why one
cannot run, and `fp8-scaled@comfy` (ComfyUI's comfy-kitchen path) on a tiny combo where comfy_kitchen is installed."""

import tomllib
from pathlib import Path

import pytest
import torch

from fluxgate.errors import SkipCombo
from fluxgate.matrix import Combo, combos, parse_backends
from fluxgate.models import MODELS
from fluxgate.precisions import BACKENDS, PRECISIONS, BackendSpec, backends_of, resolved
from fluxgate.weights.sources import load_denoiser
from test_plugin import collected, matrix  # noqa: F401  (the fixture)

COMFY = "flux1-dev[fp8-scaled@comfy]"


def test_a_default_backend_keeps_todays_ids_and_another_backend_is_named_after_an_at_sign():
    assert Combo("flux1-dev", "fp8-scaled").id == "flux1-dev[fp8-scaled]"
    assert Combo("flux1-dev", "fp8-scaled", backend="diffusers") == Combo("flux1-dev", "fp8-scaled")
    assert Combo("flux1-dev", "fp8-scaled", backend="comfy").id == COMFY
    assert Combo("flux1-dev", "fp8-scaled", "compile", "comfy").id == "flux1-dev[fp8-scaled@comfy-compile]"


@pytest.mark.parametrize("combo_id", ["flux1-dev[fp8-scaled]", "flux1-dev[fp8-scaled-compile]", COMFY,
                                      "flux1-dev[fp8-scaled@comfy-compile]", "flux2-dev[bf16]"])
def test_combo_ids_parse_back_to_the_same_combo(combo_id):
    assert Combo.parse(combo_id).id == combo_id


def test_backends_keep_apart_in_baseline_keys_history_windows_and_the_reference():
    default, comfy = Combo.parse("flux1-dev[fp8-scaled]"), Combo.parse(COMFY)
    assert (comfy.precision, comfy.backend, comfy.runtime) == ("fp8-scaled", "comfy", "eager")
    assert default.variant != comfy.variant == "fp8-scaled@comfy"  # thresholds.toml keys
    assert default.id != comfy.id  # history windows compare ids (judging.window)
    assert not Combo("flux1-dev", "bf16", backend="other").is_reference


def test_a_backend_runs_the_precisions_file_through_its_own_format_in_the_precisions_tier():
    torchao = Combo.parse("flux1-dev[fp8-scaled@torchao]").precision_spec
    assert (torchao.name, torchao.tier, torchao.backend, torchao.file_precision) == ("fp8-scaled", "8bit", "torchao",
                                                                                    "fp8-scaled")
    spec = Combo.parse(COMFY).precision_spec  # its own file: ComfyUI's per-tensor numbers
    assert (spec.name, spec.tier, spec.backend, spec.file_precision, spec.file_name) == (
        "fp8-scaled", "8bit", "comfy", None, "fp8-scaled@comfy")
    assert spec.format == "fluxgate.precisions.fp8_comfy:FORMAT" and "comfy_kitchen" in spec.requires
    assert resolved("fp8-scaled") is PRECISIONS["fp8-scaled"] and backends_of("fp8-scaled") == ["diffusers", "comfy", "torchao"]


def test_the_default_selection_is_each_precisions_default_backend():
    assert all(not combo.backend for combo in combos())
    assert len(combos()) == len(MODELS) * len(PRECISIONS)


def test_backends_select_like_precisions():
    assert combos(["flux1-dev"], backends=["comfy"]) == [Combo.parse(COMFY)]
    assert [c.id for c in combos(["flux1-dev"], ["fp8-scaled"], backends=parse_backends("all"))] == [
        "flux1-dev[fp8-scaled]", COMFY, TORCHAO]
    assert [c.id for c in combos(["flux1-dev"], ["nvfp4"], backends=parse_backends("all"))] == [
        "flux1-dev[nvfp4]", NVFP4_FP8]
    assert [c.id for c in combos(["flux1-dev"], ["bf16", "fp8-scaled"], ["eager", "compile"], ["diffusers", "comfy"])
            ] == ["flux1-dev[bf16]", "flux1-dev[bf16-compile]", "flux1-dev[fp8-scaled]",
                  "flux1-dev[fp8-scaled-compile]", COMFY, "flux1-dev[fp8-scaled@comfy-compile]"]
    assert parse_backends(None) is None


def test_an_unknown_backend_is_an_error_naming_the_option_and_the_choices():
    with pytest.raises(ValueError, match="--backends: unknown name.*torchx.*choose from diffusers, comfy"):
        parse_backends("comfy,torchx")


def test_a_backend_name_that_would_break_ids_is_refused():
    for bad in ("", "a@b", "fast-compile"):
        with pytest.raises(ValueError, match="want a short name"):
            BackendSpec("fp8-scaled", bad, format="x:Y")


def test_backend_option_and_marks_select_items(matrix):  # noqa: F811
    assert collected(matrix, "--models", "flux1-dev", "--backends", "comfy") == [f"test_x.py::{COMFY}"]
    assert collected(matrix, "--backends", "all", "-m", "comfy and z_image_turbo") == [
        "test_x.py::z-image-turbo[fp8-scaled@comfy]"]
    assert len(collected(matrix, "--backends", "all", "-m", "diffusers")) == 16
    assert len(collected(matrix)) == 16  # unchanged without --backends
    result = matrix.runpytest("--collect-only", "--backends", "torchx")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--backends: unknown name(s) torchx" in result.stderr.str()


def test_help_and_markers_explain_the_backends(matrix):  # noqa: F811
    help_text = " ".join(matrix.runpytest("--help").stdout.str().split())
    assert "--backends=NAMES" in help_text and "flux1-dev[fp8-scaled@comfy]" in help_text
    assert "comfy-kitchen" in help_text and "compute capability 8.9+" in help_text
    assert "@pytest.mark.comfy: combos run by backend comfy" in matrix.runpytest("--markers").stdout.str()


class NoSource:
    def transformer(self, combo, device):
        raise AssertionError("a skipped combo loads nothing")


def test_a_missing_backend_package_is_a_one_line_skip_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "comfy_kitchen" else real(name, *args))
    with pytest.raises(SkipCombo) as skip:
        load_denoiser(NoSource(), Combo.parse(COMFY), torch.device("cpu"))
    assert str(skip.value) == (f"{COMFY}: backend comfy of fp8-scaled needs the Python package 'comfy_kitchen' "
                               "(pip install comfy-kitchen)")


def test_a_gpu_without_fp8_tensor_cores_is_a_one_line_skip_with_the_reason(monkeypatch):
    fp8_comfy = pytest.importorskip("fluxgate.precisions.fp8_comfy", exc_type=ImportError)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(SkipCombo) as skip:
        load_denoiser(NoSource(), Combo.parse(COMFY), torch.device("cuda"))
    assert str(skip.value) == (f"{COMFY}: backend comfy of fp8-scaled cannot run on cuda: comfy-kitchen's FP8 GEMM "
                               "needs FP8 tensor cores (compute capability 8.9+); this GPU is 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_comfy.unavailable(torch.device("cuda")) is None
    assert fp8_comfy.unavailable(torch.device("cpu")) is None  # comfy-kitchen's eager backend, torch's CPU scaled_mm


def _tiny_images(cache, combos: list[Combo], kernel_path_of: Combo):
    """The tiny FLUX.1 image (one case) of each combo, their load origins, and `kernel_path_of`'s kernel path."""
    from fluxgate.measuring.kernels import kernel_path
    from fluxgate.weights.tiny import TinySource

    source, device = TinySource(cache, seed=0), torch.device("cpu")
    model = MODELS["flux1-dev"]
    components = source.components(model, device)
    call = {"prompt": "a red fox", "height": 256, "width": 256, "num_inference_steps": 4, "guidance_scale": 3.5,
            "max_sequence_length": 32, "output_type": "pil"}
    images, origins, pipes = {}, {}, {}
    for combo in combos:
        transformer, origins[combo.id] = load_denoiser(source, combo, device)
        pipe = pipes[combo.id] = model.builder.pipeline_class(transformer=transformer, **components)
        pipe.set_progress_bar_config(disable=True)
        images[combo.id] = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
    path = kernel_path(pipes[kernel_path_of.id], call, kernel_path_of.precision, backend=kernel_path_of.backend)
    return images, origins, path


@pytest.fixture(scope="module")
def comfy_tiny_images(tmp_path_factory):
    """The tiny FLUX.1 image (one case) of bf16 and of fp8-scaled@comfy, and the comfy combo's kernel path."""
    pytest.importorskip("comfy_kitchen", reason="comfy_kitchen is not installed (pip install 'fluxgate[comfy]')")
    images, origins, path = _tiny_images(tmp_path_factory.mktemp("cache"), [Combo("flux1-dev", "bf16"),
                                                                          Combo.parse(COMFY)], Combo.parse(COMFY))
    return images, origins[COMFY], path


def test_comfy_backend_runs_its_fp8_gemm_on_every_quantized_linear(comfy_tiny_images):
    from fluxgate.precisions.fp8_comfy import FP8_TENSORWISE_GEMM

    _, origin, path = comfy_tiny_images
    assert path.label == FP8_TENSORWISE_GEMM and path.fallback is False
    assert path.quantized_kinds == {"ComfyFP8Linear": path.quantized_linears} and path.quantized_linears > 0
    assert origin["transform"] == "its own fp8-scaled file -> fp8-scaled@comfy (fluxgate.precisions.fp8_comfy:FORMAT)"
    assert origin["file"].endswith("transformer-fp8-scaled@comfy.safetensors")
    import comfy_kitchen  # ComfyUI's default: Triton is opt-in (--enable-triton-backend), CUDA kernels need CUDA 13+

    assert comfy_kitchen.list_backends()["triton"]["disabled"] is True


def test_comfy_backend_image_stays_inside_the_8bit_tier_against_bf16(comfy_tiny_images):
    from fluxgate.judging.similarity import compare

    images, _, _ = comfy_tiny_images
    limits = tomllib.loads((Path(__file__).parents[1] / "baselines/cpu/thresholds.toml").read_text())
    limit = limits["flux1-dev"]["fp8-scaled"]  # the same model's 8-bit limits on this class
    similarity = compare(images[COMFY], images["flux1-dev[bf16]"])
    assert similarity.ms_ssim >= limit["min_ms_ssim"] and similarity.psnr_db >= limit["min_psnr_db"], similarity


@pytest.mark.parametrize("input_scale", [1.0, 2.0 ** -7])
def test_a_comfy_layer_quantizes_its_input_with_the_static_scale_as_comfyui_does(input_scale):
    """ComfyUI's forward: x / input_scale, clamped to +-448, cast to e4m3 (no amax), times the weight's one scale.
    At 2^-7 the clamp cuts the inputs (|x| up to ~16 -> 2048): a layer that ignored the scale would be far off."""
    fp8_comfy = pytest.importorskip("fluxgate.precisions.fp8_comfy", exc_type=ImportError)
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    generator = torch.Generator().manual_seed(3)
    weight, inputs = torch.randn(32, 64, generator=generator), torch.randn(2, 5, 64, generator=generator) * 4
    layer = BFLFP8RLinear(64, 32, bias=False, compute_dtype=torch.bfloat16)
    w_scale = weight.abs().amax() / 448
    layer.weight.data = (weight / w_scale).to(torch.float8_e4m3fn)
    layer.weight_scale = w_scale.expand(32).contiguous()
    layer.register_buffer("input_scale", torch.tensor(input_scale))
    comfy = fp8_comfy.ComfyFP8Linear.from_fp8r(layer, torch.bfloat16)
    assert float(comfy.input_scale) == input_scale
    inputs = inputs.to(torch.bfloat16)
    x_q = (inputs.float().reshape(-1, 64) / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * input_scale
    expected = (x_q @ (layer.weight.float() * w_scale).T).reshape(2, 5, 32)
    error = float((comfy(inputs).float() - expected).abs().max())
    assert error < 0.005 * float(expected.abs().max()), error  # bf16's rounding of the output


def test_the_registry_holds_the_comfy_backend_with_its_origin():
    assert BACKENDS["fp8-scaled@comfy"].backend == "comfy" and BACKENDS.origin("fp8-scaled@comfy") == "fluxgate"


TORCHAO = "flux1-dev[fp8-scaled@torchao]"


def test_the_torchao_backend_is_a_one_line_skip_where_torchao_cannot_run():
    """torchao 0.18 refuses a CPU: with torchao installed the skip says so, without it the skip names the package;
    below compute capability 8.9 the reason names the GPU's."""
    import importlib.util

    assert BACKENDS["fp8-scaled@torchao"].requires == ("torchao",) and BACKENDS.origin("fp8-scaled@torchao") == "fluxgate"
    with pytest.raises(SkipCombo) as skip:
        load_denoiser(NoSource(), Combo.parse(TORCHAO), torch.device("cpu"))
    if importlib.util.find_spec("torchao") is None:
        assert str(skip.value) == (f"{TORCHAO}: backend torchao of fp8-scaled needs the Python package 'torchao' "
                                   "(pip install torchao)")
    else:
        assert str(skip.value) == (f"{TORCHAO}: backend torchao of fp8-scaled cannot run on cpu: torchao 0.18 quantizes "
                                   "fp8 dynamic row-wise only for CUDA compute capability 8.9+, MI300+ or XPU (it "
                                   "refuses a cpu device)")


def test_torchao_backend_on_a_gpu_without_fp8_tensor_cores_names_its_capability(monkeypatch):
    fp8_torchao = pytest.importorskip("fluxgate.precisions.fp8_torchao", exc_type=ImportError)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert fp8_torchao.unavailable(torch.device("cuda")) == (
        "torchao's fp8 GEMM needs FP8 tensor cores (compute capability 8.9+); this GPU is 8.6")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_torchao.unavailable(torch.device("cuda")) is None


NVFP4_FP8 = "flux1-dev[nvfp4@fp8]"


def test_nvfp4_converted_to_fp8_at_load_runs_fp8_layers_and_stays_in_the_4bit_tier_beside_nvfp4(tmp_path):
    """NVFP4 -> FP8 at load: every NVFP4 linear becomes diffusers' fp8r linear (on CPU it dequantizes, as the
    kernel path says), and its image is inside the 4-bit tier against bf16 and next to the NVFP4 image it came from."""
    from fluxgate.judging.similarity import compare

    combos = [Combo("flux1-dev", "bf16"), Combo("flux1-dev", "nvfp4"), Combo.parse(NVFP4_FP8)]
    images, origins, path = _tiny_images(tmp_path, combos, Combo.parse(NVFP4_FP8))
    assert path.quantized_kinds == {"BFLFP8RLinear": path.quantized_linears} and path.quantized_linears > 0
    assert path.fallback is True  # CPU: BFLFP8RLinear dequantizes
    assert origins[NVFP4_FP8]["transform"] == "nvfp4 -> nvfp4@fp8 (fluxgate.precisions.nvfp4_fp8:FORMAT)"
    limit = tomllib.loads((Path(__file__).parents[1] / "baselines/cpu/thresholds.toml").read_text())["flux1-dev"]["nvfp4"]
    against_bf16 = compare(images[NVFP4_FP8], images["flux1-dev[bf16]"])
    assert against_bf16.ms_ssim >= limit["min_ms_ssim"] and against_bf16.psnr_db >= limit["min_psnr_db"], against_bf16
    assert compare(images[NVFP4_FP8], images["flux1-dev[nvfp4]"]).ms_ssim > 0.99  # E4M3's rounding of NVFP4 values


def test_the_comfy_backends_own_file_holds_comfyuis_per_tensor_numbers_rounded_once():
    """The generated profiles' @comfy file is quantized once per tensor from bf16 by comfy-kitchen, as ComfyUI's
    files are; the layer it loads into keeps those numbers exactly (no re-quantization of per-row numbers)."""
    fp8_comfy = pytest.importorskip("fluxgate.precisions.fp8_comfy", exc_type=ImportError)
    from comfy_kitchen.tensor import TensorCoreFP8Layout
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear, quantize_fp8r

    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    tensors = fp8_comfy.per_tensor_fp8r_tensors("x", weight)
    scale = tensors["x.weight_scale"]
    assert scale.shape == (96,) and bool((scale == scale[0]).all())
    layer = BFLFP8RLinear(64, 96, bias=False, compute_dtype=torch.bfloat16)
    layer.weight.data, layer.weight_scale = tensors["x.weight"], tensors["x.weight_scale"]
    comfy = fp8_comfy.ComfyFP8Linear.from_fp8r(layer, torch.bfloat16)
    held_q, held_scale = TensorCoreFP8Layout.get_plain_tensors(comfy.weight)
    qdata, params = TensorCoreFP8Layout.quantize(weight, scale="recalculate")
    assert torch.equal(held_q.float(), qdata.float()) and torch.equal(held_scale, params.scale.float())
    held = comfy.weight.dequantize().float()
    q, row_scale = quantize_fp8r(weight)  # the fp8-scaled file's per-row numbers, re-quantized per tensor
    layer.weight.data, layer.weight_scale = q, row_scale
    twice = fp8_comfy.ComfyFP8Linear.from_fp8r(layer, torch.bfloat16).weight.dequantize().float()
    error = lambda w: float((w - weight.float()).norm() / weight.float().norm())  # noqa: E731
    assert error(held) < 0.8 * error(twice), (error(held), error(twice))
