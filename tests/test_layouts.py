"""Checkpoints as users hold them: identified from their contents, refused when they are not what their slot says,
and adapted from the layouts ComfyUI, comfy-kitchen, city96 and diffusers write onto diffusers' loaders.

The layouts are written here from their published facts (see fluxgate.weights.identify / fluxgate.weights.layouts docstrings),
independently of the adapters: a tiled scale matrix is built with the cuBLAS tile formula, ComfyUI NVFP4 packs the
first value of a pair in the high nibble, ComfyUI fp8 stores one fp32 scale per tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.quantizers.bfl.utils import dequantize_fp8r, dequantize_nvfp4, quantize_nvfp4
from layouts_support import comfy_marker, tiled, tiny_hub_cache
from safetensors.torch import load_file, save_file

from fluxgate.weights.members import members
from fluxgate.errors import FixtureError
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights import identify, layouts, tiny


@pytest.mark.parametrize("rows, cols", [(128, 4), (200, 6), (300, 10)])
def test_tiled_block_scales_come_back_to_rows(rows, cols):
    scales = torch.randint(0, 255, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(layouts.blocked_to_rows(tiled(scales), rows, cols), scales)
    with pytest.raises(ValueError, match="tiled block scales"):
        layouts.blocked_to_rows(scales, rows, cols + 8)


def test_comfy_nvfp4_becomes_the_modelopt_tensors_exactly(tmp_path):
    weight = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    packed, block, global_scale = quantize_nvfp4(weight)  # ModelOpt: first value in the low nibble
    comfy = {"l.weight": ((packed & 0x0F) << 4) | (packed >> 4), "l.weight_scale": tiled(block),
             "l.weight_scale_2": global_scale.float().reshape(()), "l.comfy_quant": comfy_marker("nvfp4")}
    adapted, missing = layouts.comfy_nvfp4_to_modelopt(comfy, ["l"], tmp_path / "x.safetensors")
    assert torch.equal(adapted["l.weight"], packed) and torch.equal(adapted["l.weight_scale"].view(torch.uint8),
                                                                    block.view(torch.uint8))
    assert missing == 1 and "l.comfy_quant" not in adapted
    restored = dequantize_nvfp4(adapted["l.weight"], adapted["l.weight_scale"], adapted["l.weight_scale_2"]).float()
    assert float((restored - weight).norm() / weight.norm()) < 0.12  # NVFP4's own rounding (~0.10)


def test_one_scale_per_tensor_fp8_becomes_per_row_fp8r_with_the_same_values(tmp_path):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    scale = weight.abs().max() / 448
    comfy = {"l.weight": (weight / scale).to(torch.float8_e4m3fn), "l.weight_scale": scale.reshape(()),
             "l.input_scale": torch.tensor(0.25), "l.comfy_quant": comfy_marker("float8_e4m3fn"),
             "l.bias": torch.zeros(32, dtype=torch.bfloat16)}
    adapted, changed = layouts.fp8_scales_to_fp8r(comfy, tmp_path / "x.safetensors")
    assert changed == 1 and set(adapted) == {"l.weight", "l.weight_scale", "l.input_scale", "l.bias"}
    assert adapted["l.weight_scale"].shape == (32,)
    assert adapted["l.input_scale"].shape == () and float(adapted["l.input_scale"]) == 0.25  # ComfyUI's static scale
    restored = dequantize_fp8r(adapted["l.weight"], adapted["l.weight_scale"]).float()
    assert float((restored - weight).norm() / weight.norm()) < 0.04  # e4m3's own rounding (~0.026)
    legacy = {"l.weight": comfy["l.weight"], "l.scale_weight": scale.reshape(1), "l.scale_input": torch.tensor([0.5]),
              "scaled_fp8": torch.empty(2, dtype=torch.float8_e4m3fn)}
    adapted, _ = layouts.fp8_scales_to_fp8r(legacy, tmp_path / "x.safetensors")  # convert_old_quants' renaming
    assert set(adapted) == {"l.weight", "l.weight_scale", "l.input_scale"} and float(adapted["l.input_scale"]) == 0.5


@pytest.mark.parametrize("value, problem", [
    (torch.tensor([1.0, 2.0]), r"l.input_scale has shape \[2\]; a static activation scale is one number"),
    (torch.tensor(float("nan")), "l.input_scale is nan; a static activation scale is a finite number above 0"),
    (torch.tensor(-1.0), "l.input_scale is -1.0; a static activation scale is a finite number above 0"),
    (torch.tensor(0.0), "l.input_scale is 0.0; a static activation scale is a finite number above 0"),
])
def test_a_static_activation_scale_that_is_not_one_positive_number_is_refused_naming_it(tmp_path, value, problem):
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(torch.float8_e4m3fn)
    with pytest.raises(FixtureError, match=f"x.safetensors: {problem}"):
        layouts.fp8_scales_to_fp8r({"l.weight": weight, "l.weight_scale": torch.tensor(0.1), "l.input_scale": value},
                                   tmp_path / "x.safetensors")
    with pytest.raises(FixtureError, match="l has both scale_input and input_scale"):
        layouts.fp8_scales_to_fp8r({"l.weight": weight, "l.weight_scale": torch.tensor(0.1),
                                    "l.input_scale": torch.tensor(1.0), "l.scale_input": torch.tensor(1.0)},
                                   tmp_path / "x.safetensors")
    with pytest.raises(FixtureError, match="l.input_scale is an activation scale without an e4m3 `l.weight`"):
        layouts.fp8_scales_to_fp8r({"l.weight": torch.zeros(32, 64), "l.input_scale": torch.tensor(1.0)},
                                   tmp_path / "x.safetensors")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return {f"{model}.{precision}": tiny.ensure(MODELS[model], PRECISIONS[precision], 0, cache).path
            for model in ("z-image-turbo", "flux2-dev") for precision in PRECISIONS}


def test_every_file_fluxgate_writes_is_identified_as_what_it_is(tiny_files):
    expected_layout = {"bf16": "bf16", "fp8-scaled": "bfl-fp8", "gguf-q8_0": "gguf", "nvfp4": "modelopt-nvfp4"}
    for name, path in tiny_files.items():
        model, precision = name.split(".")
        found = identify.identify(path)
        assert (found.family, found.precision, found.layout) == (
            members()[model].family, precision, expected_layout[precision]), found
        identify.check_slot(found, model, precision)
    # The tiny profile writes GGUF as the community converters do: FLUX.2 as arch `flux` (city96, ComfyUI-GGUF)
    assert identify.identify(tiny_files["flux2-dev.gguf-q8_0"]).detail.startswith("arch flux,")
    assert identify.identify(tiny_files["z-image-turbo.gguf-q8_0"]).detail.startswith("arch lumina2,")


@pytest.mark.parametrize("slot_model, slot_precision, source, problem", [
    ("z-image-turbo", "bf16", "z-image-turbo.fp8-scaled", "the bf16 slot needs bf16 weights"),
    ("z-image-turbo", "gguf-q8_0", "z-image-turbo.nvfp4", "the gguf-q8_0 slot needs a GGUF file whose quantized"),
    ("flux2-dev", "bf16", "z-image-turbo.bf16", "the flux2-dev slot needs a flux2 model"),
    ("flux1-dev", "nvfp4", "flux2-dev.nvfp4", "the flux1-dev slot needs a flux1 model"),
])
def test_a_file_that_is_not_what_its_slot_says_is_refused_naming_both(tiny_files, slot_model, slot_precision, source,
                                                                      problem):
    found = identify.identify(tiny_files[source])
    with pytest.raises(FixtureError, match=problem) as error:
        identify.check_slot(found, slot_model, slot_precision)
    assert str(tiny_files[source]) in str(error.value) and "\n" not in str(error.value)


def test_prefixes_index_files_shards_and_folders_are_named(tiny_files, tmp_path):
    state = load_file(str(tiny_files["flux2-dev.bf16"]))
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "saved.safetensors"))
    found = identify.identify(tmp_path / "saved.safetensors")
    assert (found.family, found.precision, found.prefix) == ("flux2", "bf16", "model.diffusion_model.")
    adapted, note = layouts.adapt(found, tmp_path / "saved.safetensors")
    assert set(adapted) == set(state) and note.startswith("key prefix 'model.diffusion_model.' stripped")
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "Flux2Transformer2DModel"}')
    save_file(state, str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"x": "diffusion_pytorch_model-00001-of-00002.safetensors"}}')
    assert identify.identify(folder).layout == "diffusers-folder"
    for part in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-00001-of-00002.safetensors"):
        with pytest.raises(FixtureError, match=f"give the folder {folder} instead"):
            identify.identify(folder / part)
    with pytest.raises(FixtureError, match="not a diffusers model folder"):
        identify.identify(tmp_path)


def test_a_comfy_nvfp4_file_with_a_prefix_loads_as_its_modelopt_twin(tiny_files, tmp_path):
    """End to end through the real profile's loader: fluxgate's own ModelOpt file rewritten as ComfyUI writes NVFP4
    (high nibble first, tiled scales, comfy_quant, no input_scale, ModelSave prefix) loads to the same weights."""
    from diffusers.quantizers.bfl.utils import BFLNVFP4Linear

    from fluxgate.weights.loading import load_transformer

    model = MODELS["z-image-turbo"]
    twin = load_file(str(tiny_files["z-image-turbo.nvfp4"]))
    comfy = {}
    for key, value in twin.items():
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".input_scale"):
            continue
        if key.endswith(".weight") and value.dtype == torch.uint8:
            comfy[key], comfy[f"{layer}.comfy_quant"] = ((value & 0x0F) << 4) | (value >> 4), comfy_marker("nvfp4")
        elif key.endswith(".weight_scale") and value.dtype == torch.float8_e4m3fn:
            comfy[key] = tiled(value)
        else:
            comfy[key] = value
    path = tmp_path / "z_image_nvfp4_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in comfy.items()}, str(path))
    found = identify.identify(path)
    identify.check_slot(found, "z-image-turbo", "nvfp4")
    assert found.layout == "comfy-nvfp4"
    pipeline = tmp_path / "pipeline"
    model.builder.pipeline_class(transformer=model.tiny_transformer(0), **model.builder.tiny_components(0)
                                ).save_pretrained(pipeline)
    loadable, note = layouts.adapt(found, path)
    assert "input_scale" in note and "prefix" in note
    device = torch.device("cpu")
    loaded = load_transformer(PRECISIONS["nvfp4"], model.builder.transformer_class, loadable, pipeline, device,
                              config_subfolder="transformer")
    reference = load_transformer(PRECISIONS["nvfp4"], model.builder.transformer_class, tiny_files["z-image-turbo.nvfp4"],
                                 pipeline, device, config_subfolder="transformer")
    pairs = [(a, b) for (_, a), (_, b) in zip(loaded.named_modules(), reference.named_modules())
             if isinstance(a, BFLNVFP4Linear)]
    assert pairs
    for a, b in pairs:
        assert torch.equal(dequantize_nvfp4(a.weight, a.weight_scale, a.weight_scale_2),
                           dequantize_nvfp4(b.weight, b.weight_scale, b.weight_scale_2))


def test_a_nvfp4_layer_whose_scales_do_not_fit_is_named(tmp_path):
    bad = {"l.weight": torch.zeros(128, 32, dtype=torch.uint8), "l.weight_scale": torch.zeros(128, 3).to(
        torch.float8_e4m3fn), "l.weight_scale_2": torch.tensor(1.0), "l.comfy_quant": comfy_marker("nvfp4")}
    with pytest.raises(FixtureError, match=r"x.safetensors: l.weight_scale: tiled block scales of a \[128, 4\]"):
        layouts.comfy_nvfp4_to_modelopt(bad, ["l"], tmp_path / "x.safetensors")


def test_scan_lists_every_checkpoint_and_writes_a_models_file_of_the_slots_it_fills(tiny_files, tmp_path,
                                                                                    monkeypatch):
    import shutil
    import tomllib

    from fluxgate import scan as scan_command
    from fluxgate.weights import scan

    tree = tmp_path / "ComfyUI" / "models"
    (tree / "diffusion_models").mkdir(parents=True)
    (tree / "unet").mkdir()
    # Z-Image-Turbo and Z-Image share their tensors: the published name in the path breaks the tie (README)
    shutil.copy(tiny_files["z-image-turbo.nvfp4"], tree / "diffusion_models" / "z_image_turbo_anything.safetensors")
    shutil.copy(tiny_files["flux2-dev.gguf-q8_0"], tree / "unet" / "flux2-dev-Q4_K_M.gguf")  # the name lies
    (tree / "unet" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    tiny_hub_cache(tmp_path / "hub-cache", monkeypatch)  # the Hub pipelines, as tiny as these files
    out = tmp_path / "models.toml"
    assert scan_command.main([str(tree), "--out", str(out)]) == 0
    table = tomllib.loads(out.read_text())
    assert table["z-image-turbo"]["checkpoints"] == {"nvfp4": {"path": str(tree / "diffusion_models" /
                                                                             "z_image_turbo_anything.safetensors")}}
    assert table["flux2-dev"]["checkpoints"]["gguf-q8_0"]["path"].endswith("flux2-dev-Q4_K_M.gguf")
    assert table["flux2-dev"]["pipeline"] == "black-forest-labs/FLUX.2-dev"  # no pipeline folder in the tree
    listed, _ = scan.scan(tree)
    assert any(isinstance(i, str) and "broken.safetensors: truncated or corrupt safetensors header" in i for _, i in listed)


def test_a_real_file_with_non_finite_weights_is_refused_naming_the_tensor(tiny_files, tmp_path):
    from fluxgate.matrix import Combo
    from fluxgate.weights.real import RealSource

    model = MODELS["z-image-turbo"]
    state = load_file(str(tiny_files["z-image-turbo.bf16"]))
    key = next(k for k in state if k.endswith(".weight") and state[k].ndim == 2 and k.startswith("layers."))
    state[key] = state[key].clone()
    state[key][0, :3] = float("nan")
    save_file(state, str(tmp_path / "z_image_nan.safetensors"))
    pipeline = tmp_path / "pipeline"
    model.builder.pipeline_class(transformer=model.tiny_transformer(0), **model.builder.tiny_components(0)
                                ).save_pretrained(pipeline)
    (tmp_path / "models.toml").write_text(f'["z-image-turbo"]\npipeline = "{pipeline}"\n["z-image-turbo".checkpoints]\n'
                                          f'bf16 = {{ path = "{tmp_path / "z_image_nan.safetensors"}" }}\n')
    with pytest.raises(FixtureError, match=rf"z_image_nan.safetensors: {key} holds 3 NaN/Inf values"):
        RealSource(tmp_path / "models.toml").transformer(Combo("z-image-turbo", "bf16"), torch.device("cpu"))


def test_a_flux1_dev_or_kontext_file_is_placed_by_the_published_name_in_its_path_else_left_to_the_user():
    from fluxgate.weights import scan

    def alike(path):
        return identify.Identity(path, "flux1", "bf16", "bf16", candidates=("flux1-dev", "flux1-kontext-dev"))

    assert scan.model_of(alike("/cache/models--black-forest-labs--FLUX.1-Kontext-dev/snapshots/x/t.sft")) == \
        "flux1-kontext-dev"
    assert scan.model_of(alike("/models/flux1-dev.safetensors")) == "flux1-dev"
    assert scan.model_of(alike("/models/my-favourite.safetensors")) is None


def test_a_models_file_naming_some_models_skips_the_others_and_a_junk_file_is_one_line(tmp_path):
    from fluxgate.errors import SkipCombo
    from fluxgate.matrix import Combo
    from fluxgate.weights.real import RealSource

    (tmp_path / "models.toml").write_text('["flux1-dev"]\npipeline = "x"\n')
    with pytest.raises(SkipCombo, match=r"flux2-dev: not in .*models.toml; add a \[flux2-dev\] table to run it"):
        RealSource(tmp_path / "models.toml").transformer(Combo("flux2-dev", "bf16"), torch.device("cpu"))
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"\xff" * 5 + b"\x7f" * 8)  # a header length no file of this size can hold
    with pytest.raises(FixtureError, match=r"x.safetensors: truncated or corrupt safetensors header .*does not fit"):
        identify.identify(junk)


def test_merging_shards_in_the_history_folder_moves_them_aside(tmp_path):
    import json as _json

    from fluxgate import merge
    from fluxgate.storing.local import LocalFolderStore

    for shard, combo in (("20260101T000000Z-aaaaaa", "a[bf16]"), ("20260101T000001Z-bbbbbb", "a[nvfp4]")):
        (tmp_path / f"{shard}.json").write_text(_json.dumps({"schema": 1, "run_id": shard,
                                                              "records": [{"schema": 1, "combo": combo}]}))
    assert merge.main([str(p) for p in sorted(tmp_path.glob("*.json"))] + ["--history-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list((tmp_path / ".merged").glob("*.json"))) == 2
    assert sorted(r.combo for r in LocalFolderStore(tmp_path).load()) == ["a[bf16]", "a[nvfp4]"]  # each once
