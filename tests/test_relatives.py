"""A file is measured only as the model it really is (issue 30): the family member is told from the contents
(guidance embedder, image widths, Chroma's layer, a folder's config and pipeline class), relatives and formats with no
slot are refused in one line naming them, and scan never fills a slot with a relative or a guess.

Files are fluxgate's tiny transformers at a relative's shape (`weights.members` names the sources of each fact).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import layouts_support as S
import pytest
import torch
from safetensors.torch import save_file

from fluxgate import scan as scan_command
from fluxgate.errors import FixtureError
from fluxgate.models import MODELS
from fluxgate.weights import identify, scan

NO_PIPELINE = Path("/nonexistent/pipeline")


def relative(model: str, **config) -> dict[str, torch.Tensor]:
    """The tiny `model`'s bf16 weights (diffusers keys) with `config` entries changed: a relative's shape."""
    builder = MODELS[model].builder
    torch.manual_seed(S.SEED)
    module = builder.transformer_class(**{**builder.tiny_transformer_config, **config})
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}


def write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def refusal(path: Path, model: str, precision: str, pipeline: Path = NO_PIPELINE) -> str:
    with pytest.raises(FixtureError) as error:
        S.load_real(path, model, precision, pipeline)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.fixture
def tiny_pipelines(tmp_path_factory, monkeypatch) -> Path:
    """The pipelines fluxgate's models file names, in a Hugging Face cache, with the tiny transformers' configs."""
    return S.tiny_hub_cache(tmp_path_factory.mktemp("hub-cache"), monkeypatch)


@pytest.mark.parametrize("model, config, member", [
    ("flux1-dev", {"guidance_embeds": False}, "flux1-schnell"),
    ("flux2-dev", {"guidance_embeds": False, "num_layers": 1}, "flux2-klein"),
    ("flux1-dev", {"in_channels": 384, "out_channels": 64}, "flux1-fill/depth/canny"),
], ids=["flux1-schnell", "flux2-klein", "flux1-fill"])
def test_a_relative_is_identified_as_its_member_from_its_tensors(tmp_path, model, config, member):
    found = identify.identify(write(tmp_path / "model.safetensors", relative(model, **config)))
    assert found.member == member and found.describe().startswith(f"{member}, bf16")


def test_flux1_dev_and_kontext_files_are_said_to_be_indistinguishable_not_guessed(tmp_path):
    found = identify.identify(write(tmp_path / "flux1-kontext-dev.safetensors", S.reference("flux1-dev")))
    assert found.member is None and found.candidates == ("flux1-dev", "flux1-kontext-dev")
    assert "the contents cannot tell them apart" in found.describe()


def test_modelspec_architecture_metadata_tells_dev_from_kontext(tmp_path):
    path = write(tmp_path / "model.safetensors", S.reference("flux1-dev"),
                 {"modelspec.architecture": "Flux.1-Kontext-dev"})
    assert identify.identify(path).member == "flux1-kontext-dev"


def test_chroma_is_its_own_family_not_flux1(tmp_path):
    tensors = {k: v for k, v in S.reference("flux1-dev").items() if "time_text_embed" not in k}
    tensors["distilled_guidance_layer.in_proj.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    found = identify.identify(write(tmp_path / "chroma.safetensors", tensors))
    assert (found.family, found.member) == ("chroma", "chroma")
    assert "the flux1-dev slot needs a flux1 model" in refusal(Path(found.path), "flux1-dev", "bf16")


def test_a_schnell_file_is_refused_from_the_dev_slot_naming_what_it_is(tmp_path):
    path = write(tmp_path / "flux1-dev.safetensors", relative("flux1-dev", guidance_embeds=False))
    assert "it is flux1-schnell (no guidance embedder), not flux1-dev" in refusal(path, "flux1-dev", "bf16")


def test_a_block_pruned_file_is_refused_naming_its_blocks_against_the_slots_config(tmp_path):
    pipeline = S.pipeline_folder("flux1-dev", tmp_path / "pipeline")
    path = write(tmp_path / "pruned.safetensors", relative("flux1-dev", num_layers=1))
    message = refusal(path, "flux1-dev", "bf16", pipeline)
    assert "1 double + 2 single blocks and a guidance embedder" in message
    assert "config of" in message and "has 2 double + 2 single blocks" in message


def test_a_block_pruned_file_is_refused_against_a_hub_pipeline_in_the_cache(tmp_path, tiny_pipelines):
    path = write(tmp_path / "flux1-dev.safetensors", relative("flux1-dev", num_layers=1))
    message = refusal(path, "flux1-dev", "bf16", "black-forest-labs/FLUX.1-dev")
    assert "the flux1-dev config of black-forest-labs/FLUX.1-dev has 2 double + 2 single blocks" in message, message


@pytest.mark.parametrize("config, says", [
    ({"n_layers": 1}, "1 layers, 2 noise_refiner and 2 context_refiner blocks"),
    ({"n_refiner_layers": 1}, "2 layers, 1 noise_refiner and 1 context_refiner blocks"),
], ids=["layers", "refiners"])
def test_a_block_pruned_z_image_file_is_refused_naming_its_blocks(tmp_path, config, says):
    """Tongyi's keys, as z_image_turbo_bf16.safetensors holds them; before, loading ended in a meta-tensor error."""
    pipeline = S.pipeline_folder("z-image-turbo", tmp_path / "pipeline")
    path = write(tmp_path / "z_image_turbo_bf16.safetensors", S.zimage_to_original(relative("z-image-turbo", **config)))
    message = refusal(path, "z-image-turbo", "bf16", pipeline)
    assert f"with {says}; the z-image-turbo config of {pipeline} has 2 layers, 2 noise_refiner and 2 context_refiner " \
           "blocks (a relative or a block-pruned variant)" in message, message


def pipeline_tree(root: Path, pipeline_class: str, weights: dict, config: dict) -> Path:
    """A pipeline folder as `hf download` leaves it: model_index.json and transformer/ (config + weights)."""
    (root / "transformer").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    write(root / "transformer" / "diffusion_pytorch_model.safetensors", weights)
    return root / "transformer"


@pytest.mark.parametrize("pipeline_class, guidance, member", [
    ("FluxPipeline", False, "flux1-schnell"), ("FluxKontextPipeline", True, "flux1-kontext-dev"),
    ("FluxPipeline", True, "flux1-dev")])
def test_a_pipeline_folder_is_told_by_its_config_and_pipeline_class(tmp_path, pipeline_class, guidance, member):
    weights = relative("flux1-dev", guidance_embeds=guidance)
    folder = pipeline_tree(tmp_path / "snapshot", pipeline_class, weights, {"guidance_embeds": guidance})
    assert identify.identify(folder).member == member


def svdq_file(path: Path, kind: str) -> Path:
    """nunchaku's SVDQuant FLUX.1 layout (nunchaku/models/linear.py SVDQW4A4Linear, merge_safetensors.py metadata):
    quantized linears as qweight/wscales/smooth_factor/proj_down/proj_up, embedders bf16 in diffusers keys."""
    tensors = {k: v for k, v in S.reference("flux1-dev").items() if not k.startswith(("transformer_blocks.",
                                                                                        "single_transformer_blocks."))}
    scales = torch.zeros(2, 64, dtype=torch.float8_e4m3fn if kind == "fp4" else torch.bfloat16)
    for block in ("transformer_blocks.0.qkv_proj", "single_transformer_blocks.0.qkv_proj"):
        tensors |= {f"{block}.qweight": torch.zeros(64, 64, dtype=torch.int8), f"{block}.wscales": scales.clone(),
                    f"{block}.smooth_factor": torch.ones(128, dtype=torch.bfloat16),
                    f"{block}.proj_down": torch.zeros(128, 32, dtype=torch.bfloat16),
                    f"{block}.proj_up": torch.zeros(64, 32, dtype=torch.bfloat16)}
    dtype = {"int4": "int4", "fp4": "fp4_e2m1_all"}[kind]
    return write(path, tensors, {"model_class": "NunchakuFluxTransformer2dModel", "quantization_config": json.dumps(
        {"method": "svdquant", "weight": {"dtype": dtype}, "rank": 32})})


@pytest.mark.parametrize("kind", ["int4", "fp4"])
def test_a_nunchaku_svdquant_file_is_named_as_its_format_in_every_slot(tmp_path, kind):
    path = svdq_file(tmp_path / f"svdq-{kind}_r32-flux.1-dev.safetensors", kind)
    found = identify.identify(path)
    assert (found.precision, found.layout) == (None, f"nunchaku-svdq-{kind}_r32")
    for slot in identify.PRECISION_NEEDS:
        message = refusal(path, "flux1-dev", slot)
        assert f"no fluxgate precision (nunchaku-svdq-{kind}_r32; nunchaku SVDQuant" in message and "bf16 (" not in message


def gptq(layer: str, weight: torch.Tensor, g_idx: bool = True) -> dict:
    """AutoGPTQ's QuantLinear buffers, 4 bits, group 64 (auto_gptq/nn_modules/qlinear): qweight int32 [K/8, N]
    packed along the input, qzeros int32 [K/64, N/8], scales fp16 [K/64, N], g_idx int32 [K]; no `weight`."""
    n, k = weight.shape
    out = {f"{layer}.qweight": torch.zeros(k // 8, n, dtype=torch.int32),
           f"{layer}.qzeros": torch.zeros(k // 64, n // 8, dtype=torch.int32),
           f"{layer}.scales": torch.ones(k // 64, n, dtype=torch.float16)}
    return out | ({f"{layer}.g_idx": torch.arange(k, dtype=torch.int32) // 64} if g_idx else {})


def gptq_without_g_idx(layer: str, weight: torch.Tensor) -> dict:
    return gptq(layer, weight, g_idx=False)


def autoawq(layer: str, weight: torch.Tensor) -> dict:
    """AutoAWQ's WQLinear_GEMM (awq/modules/linear/gemm.py), 4 bits, group 64: qweight int32 [K, N/8] packed along
    the output, qzeros int32 [K/64, N/8], scales fp16 [K/64, N], no g_idx."""
    n, k = weight.shape
    return {f"{layer}.qweight": torch.zeros(k, n // 8, dtype=torch.int32),
            f"{layer}.qzeros": torch.zeros(k // 64, n // 8, dtype=torch.int32),
            f"{layer}.scales": torch.ones(k // 64, n, dtype=torch.float16)}


def bnb_4bit(kind: str, nested: bool):
    """bitsandbytes' Linear4bit state dict (`QuantState.as_dict(packed=True)`): weight uint8 [K*N/2, 1], absmax,
    quant_map [16], nested_absmax / nested_quant_map with double quantization, and the JSON quant_state tensor
    `weight.quant_state.bitsandbytes__<kind>`."""
    def write(layer: str, weight: torch.Tensor) -> dict:
        n, k = weight.shape
        state = {"quant_type": kind, "blocksize": 64, "dtype": "bfloat16", "shape": [n, k]}
        if nested:
            state |= {"nested_blocksize": 256, "nested_offset": 0.0, "nested_dtype": "float32"}
        out = {f"{layer}.weight": torch.zeros(n * k // 2, 1, dtype=torch.uint8),
               f"{layer}.weight.absmax": torch.ones(n * k // 64, dtype=torch.uint8 if nested else torch.float32),
               f"{layer}.weight.quant_map": torch.zeros(16),
               f"{layer}.weight.quant_state.bitsandbytes__{kind}": torch.tensor(list(json.dumps(state).encode()),
                                                                               dtype=torch.uint8)}
        nested_tensors = {f"{layer}.weight.nested_absmax": torch.ones(-(-n * k // 64 // 256)),
                          f"{layer}.weight.nested_quant_map": torch.zeros(256)}
        return out | (nested_tensors if nested else {})
    return write


def bnb_int8(layer: str, weight: torch.Tensor) -> dict:
    """bitsandbytes' Linear8bitLt state dict: int8 weight [N, K] and its fp32 row scales SCB [N]."""
    return {f"{layer}.weight": torch.zeros(weight.shape, dtype=torch.int8), f"{layer}.SCB": torch.ones(weight.shape[0])}


@pytest.mark.parametrize("writer, layout, says", [
    (gptq, "gptq", "GPTQ 4-bit linears"), (gptq_without_g_idx, "gptq", "GPTQ linears"),
    (autoawq, "awq-w4a16", "AWQ W4A16 linears (AutoAWQ"), (bnb_4bit("nf4", nested=True), "bnb-nf4", "4-bit NF4"),
    (bnb_4bit("fp4", nested=False), "bnb-fp4", "4-bit FP4"), (bnb_int8, "bnb-int8", "LLM.int8"),
], ids=["gptq", "gptq-without-g_idx", "autoawq", "bnb-nf4", "bnb-fp4", "bnb-int8"])
def test_a_foreign_quantized_format_is_named_by_its_own_tensors_in_every_slot(tmp_path, writer, layout, says):
    tensors, _ = S.quantized_tensors(S.reference("flux1-dev"), writer)
    path = write(tmp_path / "flux1-dev.safetensors", tensors)
    found = identify.identify(path)
    assert (found.family, found.precision, found.layout) == ("flux1", None, layout) and says in found.detail
    for slot in identify.PRECISION_NEEDS:
        message = refusal(path, "flux1-dev", slot)
        assert f"no fluxgate precision ({layout}; " in message and "bf16 (" not in message, message


def test_an_e5m2_cast_is_refused_from_the_fp8_slot_naming_e5m2(tmp_path):
    tensors = {k: v.to(torch.float8_e5m2) if S.is_block_linear(k, v) else v for k, v in S.reference("flux1-dev").items()}
    message = refusal(write(tmp_path / "e5m2.safetensors", tensors), "flux1-dev", "fp8-scaled")
    assert re.search(r"no fluxgate precision \(fp8-e5m2; \d+ e5m2 weights", message), message


# --- scan --------------------------------------------------------------------------------------------------------

def test_scan_fills_no_slot_with_a_relative_and_says_what_it_is(tmp_path, capsys):
    pipeline_tree(tmp_path / "hub" / "schnell", "FluxPipeline", relative("flux1-dev", guidance_embeds=False),
                  {"guidance_embeds": False})
    write(tmp_path / "hub" / "klein.safetensors", S.flux2_to_original(relative("flux2-dev", guidance_embeds=False)))
    listed, slots = scan.scan(tmp_path / "hub")
    assert slots == {} and len(listed) == 2
    assert scan_command.main([str(tmp_path / "hub")]) == 0
    out = capsys.readouterr().out
    assert "[flux1-schnell is a relative fluxgate has no slot for]" in out
    assert "[flux2-klein is a relative fluxgate has no slot for]" in out


def test_scan_leaves_a_file_whose_member_neither_contents_nor_name_tell_to_the_user(tmp_path):
    write(tmp_path / "my-favourite.safetensors", S.reference("flux1-dev"))
    listed, slots = scan.scan(tmp_path)
    assert slots == {} and "cannot tell flux1-dev from flux1-kontext-dev" in scan.place(listed[0][1]).how


@pytest.mark.parametrize("model, name, placed", [
    ("flux1-dev", "kontext/my-model.safetensors", None),
    ("flux1-dev", "kontext-experiments/flux1-dev.safetensors", "flux1-dev"),
    ("flux1-dev", "hub/models--black-forest-labs--FLUX.1-Kontext-dev/snapshots/0a1b/model.safetensors",
     "flux1-kontext-dev"),
    ("z-image-turbo", "turbo/z_image_bf16.safetensors", None),
    ("z-image-turbo", "base/z_image_turbo_bf16.safetensors", "z-image-turbo"),
], ids=["kontext-folder", "dev-file-in-kontext-folder", "hf-cache-repo-id", "turbo-folder", "turbo-file"])
def test_the_tie_is_broken_by_the_files_own_name_or_cache_repo_never_a_parent_folder(tmp_path, tiny_pipelines, model,
                                                                                      name, placed):
    write(tmp_path / name, S.reference(model))
    (path, identity), = scan.scan(tmp_path)[0]
    assert identity.member is None and scan.place(identity).model == placed, scan.place(identity)


def test_a_pipelines_transformer_folder_is_told_by_its_pipeline_folders_name(tmp_path):
    folder = pipeline_tree(tmp_path / "Z-Image-Turbo", "ZImagePipeline", S.reference("z-image-turbo"),
                           {"_class_name": "ZImageTransformer2DModel"})
    assert scan.place(identify.identify(folder)).model == "z-image-turbo"


def test_scan_prefers_a_file_told_by_its_contents_over_one_placed_by_its_name(tmp_path):
    write(tmp_path / "a" / "flux1-dev.safetensors", S.reference("flux1-dev"))
    folder = pipeline_tree(tmp_path / "z", "FluxPipeline", S.reference("flux1-dev"), {"guidance_embeds": True})
    assert scan.scan(tmp_path)[1] == {"flux1-dev": {"bf16": folder}}


def test_scan_prefers_the_intact_file_over_a_damaged_copy_and_lists_why(tmp_path, tiny_pipelines):
    intact = write(tmp_path / "b" / "flux2-dev.safetensors", S.reference("flux2-dev"))
    damaged = tmp_path / "a" / "flux2-dev.safetensors"
    damaged.parent.mkdir()
    data = intact.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    first = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)[:-1] + f', "{first}": {json.dumps(header[first])}}}'  # the first tensor named twice
    damaged.write_bytes(len(text).to_bytes(8, "little") + text.encode() + data[8 + length:])
    listed, slots = scan.scan(tmp_path)
    assert slots == {"flux2-dev": {"bf16": intact}}
    assert any(path == damaged and isinstance(why, str) and f"names tensor {first} twice" in why for path, why in listed)


def test_scan_fills_no_slot_with_a_block_pruned_file_and_lists_it_skipped_with_the_reason(tmp_path, tiny_pipelines):
    pruned = write(tmp_path / "a" / "flux1-dev.safetensors", relative("flux1-dev", num_single_layers=1))
    zimage = write(tmp_path / "a" / "z_image_turbo_bf16.safetensors",
                   S.zimage_to_original(relative("z-image-turbo", n_layers=1)))
    intact = write(tmp_path / "b" / "flux1-dev.safetensors", S.reference("flux1-dev"))
    listed, slots = scan.scan(tmp_path)
    assert slots == {"flux1-dev": {"bf16": intact}}
    why = {path: reason for path, reason in listed if isinstance(reason, str)}
    assert set(why) == {pruned, zimage}
    assert why[pruned].startswith(f"{pruned}: is flux1 (flux1-dev or flux1-kontext-dev: ")
    assert "with 2 double + 1 single blocks and a guidance embedder; the flux1-dev config of " in why[pruned]
    assert why[pruned].endswith("has 2 double + 2 single blocks and a guidance embedder (a relative or a block-pruned "
                                "variant)")
    assert "with 1 layers, 2 noise_refiner and 2 context_refiner blocks; the z-image-turbo config of" in why[zimage]


def test_scan_compares_a_file_with_the_pipeline_folder_it_pairs_it_with(tmp_path):
    """The pipeline found in the tree, not the default models file's, is the one the written models file names."""
    config = MODELS["flux1-dev"].builder.tiny_transformer_config
    pipeline_tree(tmp_path / "pipe", "FluxPipeline", relative("flux1-dev", num_layers=1), {**config, "num_layers": 1})
    path = write(tmp_path / "flux1-dev.safetensors", S.reference("flux1-dev"))
    listed, slots = scan.scan(tmp_path)
    assert slots == {"flux1-dev": {"bf16": tmp_path / "pipe" / "transformer"}}
    (why,) = [reason for listed_path, reason in listed if listed_path == path]
    assert why.endswith(f"with 2 double + 2 single blocks and a guidance embedder; the flux1-dev config of "
                        f"{tmp_path / 'pipe'} has 1 double + 2 single blocks and a guidance embedder (a relative or a "
                        "block-pruned variant)"), why


def test_without_its_pipeline_scan_compares_a_file_with_the_models_default_config(tmp_path, monkeypatch):
    """The models file would name black-forest-labs/FLUX.1-dev, which this Hugging Face cache does not hold."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    path = write(tmp_path / "models" / "flux1-dev.safetensors", S.reference("flux1-dev"))
    listed, slots = scan.scan(tmp_path / "models")
    (listed_path, why), = listed
    assert slots == {} and listed_path == path and why.startswith(f"{path}: is ")
    assert why.endswith("with 2 double + 2 single blocks and a guidance embedder; fluxgate's default flux1-dev config "
                        "has 19 double + 38 single blocks and a guidance embedder (a relative or a block-pruned "
                        "variant)"), why


def test_a_folder_of_single_files_beside_a_config_is_not_a_sharded_folder(tmp_path, tiny_pipelines):
    """fluxgate's own fixture cache: config.json beside transformer-<precision> files, each its own checkpoint."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    bf16 = write(tmp_path / "transformer-bf16.safetensors", S.flux2_to_original(S.reference("flux2-dev")))
    q8 = S.city96_gguf(tmp_path / "transformer-gguf-q8_0.gguf", S.flux2_to_original(S.reference("flux2-dev")), "flux")
    assert scan.candidates(tmp_path) == [bf16, q8]
    assert scan.scan(tmp_path)[1] == {"flux2-dev": {"bf16": bf16, "gguf-q8_0": q8}}


def test_the_models_file_scan_writes_names_a_command_that_runs():
    command = scan.models_toml({}, {}).split("`")[1]
    assert command.startswith("fluxgate ")  # the console script; `python -m fluxgate.cli` is the same command
    done = subprocess.run([sys.executable, "-m", "fluxgate.cli", *command.split()[1:], "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "usage:" in done.stdout
