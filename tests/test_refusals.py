"""A file that is not what its slot says, that no slot takes, or that is damaged is refused through the real profile in
one line naming the file, what it is and what the slot needs (issue 16, items 2 and 4), never with a traceback: every
kind of fault, not one case each. Files are written in the tools' exact layouts (tests/layouts_support.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import layouts_support as S
import pytest
import torch

from fluxgate.weights.members import members
from fluxgate.errors import FixtureError
from fluxgate.models import MODELS
from fluxgate.weights import identify

GGUF_TYPES = [t for t in gguf.GGMLQuantizationType if t.name not in ("F32", "F16", "BF16", "Q8_0")]
# Slots need not exist for a refusal: it comes before the pipeline is looked for.
NO_PIPELINE = Path("/nonexistent/pipeline")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("refusals")


def refusal(path: Path, model: str, precision: str) -> str:
    """The real profile's one-line refusal of `path` in the `model` x `precision` slot (fails on anything else)."""
    with pytest.raises(FixtureError) as error:
        S.load_real(path, model, precision, NO_PIPELINE)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def _flux2(root: Path, name: str, layer_fn=None, marking=None) -> Path:
    original = S.flux2_to_original(S.reference("flux2-dev"))
    tensors, metadata = S.quantized_tensors(original, layer_fn, marking) if layer_fn else (original, None)
    return S.write_safetensors(root / f"{name}.safetensors", tensors, metadata)


# kind -> (writer, the precision the file is)
KINDS = {
    "bf16": (lambda root: _flux2(root, "bf16"), "bf16"),
    "bfl-fp8r": (lambda root: _flux2(root, "fp8r", S.fp8r), "fp8-scaled"),
    "bfl-flux2-fp8-release": (lambda root: _flux2(root, "bfl-fp8", S.comfy_fp8, "metadata"), "fp8-scaled"),
    "bfl-flux2-nvfp4-release": (lambda root: _flux2(root, "bfl-nvfp4", S.comfy_nvfp4, "metadata"), "nvfp4"),
    "comfy-nvfp4-comfy_quant": (lambda root: _flux2(root, "comfy-nvfp4", S.comfy_nvfp4, "tensors"), "nvfp4"),
    "modelopt-nvfp4": (lambda root: _flux2(root, "modelopt-nvfp4", S.modelopt_nvfp4), "nvfp4"),
    "city96-gguf-q8_0": (lambda root: S.city96_gguf(root / "q8_0.gguf", S.flux2_to_original(S.reference("flux2-dev")),
                                                    "flux"), "gguf-q8_0"),
}
WRONG_SLOTS = [(kind, slot) for kind, (_, precision) in KINDS.items() for slot in identify.PRECISION_NEEDS
               if slot != precision]


@pytest.mark.parametrize("kind, slot", WRONG_SLOTS, ids=[f"{kind}-in-{slot}" for kind, slot in WRONG_SLOTS])
def test_a_file_of_another_precision_is_refused_naming_what_it_is_and_what_the_slot_needs(root, kind, slot):
    write, precision = KINDS[kind]
    message = refusal(write(root), "flux2-dev", slot)
    assert f"is flux2-dev, {precision} (" in message
    assert f"the {slot} slot needs {identify.PRECISION_NEEDS[slot]}" in message


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("model", ["z-image-turbo", "flux1-dev", "flux1-kontext-dev"])
def test_a_file_of_another_model_is_refused_naming_the_family_the_slot_needs(root, kind, model):
    write, precision = KINDS[kind]
    message = refusal(write(root), model, precision)
    assert f"the {model} slot needs a {members()[model].family} model" in message and "is flux2" in message


@pytest.mark.parametrize("kind", GGUF_TYPES, ids=[t.name for t in GGUF_TYPES])
def test_every_gguf_type_but_q8_0_is_named_and_refused_from_the_q8_0_slot(root, kind):
    """city96's repos ship every size under one name stem; gguf-py's every type, read from the tensor index."""
    path = S.raw_gguf(root / f"flux2-dev-{kind.name}.gguf", "flux", {
        "double_blocks.0.img_attn.qkv.weight": kind, "single_blocks.0.linear1.weight": kind,
        "double_stream_modulation_img.lin.weight": gguf.GGMLQuantizationType.BF16})
    message = refusal(path, "flux2-dev", "gguf-q8_0")
    assert "is flux2 (" in message and f"no fluxgate precision (gguf-{kind.name}; arch flux" in message
    assert "the gguf-q8_0 slot needs a GGUF file whose quantized weights are all Q8_0" in message
    if kind.name == "NVFP4":  # GGUF's own NVFP4 is not the safetensors layouts the nvfp4 slot loads
        assert "the nvfp4 slot needs NVFP4 safetensors" in refusal(path, "flux2-dev", "nvfp4")


@pytest.mark.parametrize("block_type, others, layout", [
    ("Q4_K", "Q6_K", "gguf-Q4_K+Q6_K"),  # llama-quantize's Q4_K_M: some tensors one size up
    ("Q8_0", "Q4_0", "gguf-Q8_0+Q4_0"),  # a Q8_0 file with a few smaller layers is no Q8_0 file
], ids=["Q4_K_M", "Q8_0-with-Q4_0-layers"])
def test_a_gguf_mixing_quant_types_is_named_by_all_of_them(root, block_type, others, layout):
    Q = gguf.GGMLQuantizationType
    names = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(3)] + ["single_blocks.0.linear1.weight"]
    path = S.raw_gguf(root / f"mixed-{layout}.gguf", "flux", {
        **{name: Q[block_type] for name in names[:3]}, names[3]: Q[others],
        "double_stream_modulation_img.lin.weight": Q.BF16})
    assert f"no fluxgate precision ({layout}; arch flux, 3x {block_type}, 1x {others}, 1x BF16)" in refusal(
        path, "flux2-dev", "gguf-q8_0")


def _cut(fraction: float):
    return lambda data: data[:int(len(data) * fraction)]


DAMAGE = {"empty": lambda data: b"", "cut-in-header": lambda data: data[:40], "cut-in-data": _cut(0.6),
          "last-byte-missing": lambda data: data[:-1], "zeros": lambda data: bytes(len(data))}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_damaged_file_is_one_line_naming_it_and_what_is_wrong(root, tmp_path, kind, damage):
    write, precision = KINDS[kind]
    good = write(root)
    broken = tmp_path / good.name
    broken.write_bytes(DAMAGE[damage](good.read_bytes()))
    message = refusal(broken, "flux2-dev", precision)
    assert re.search(r"truncated|corrupt|not a GGUF file", message), message


def test_an_index_json_or_one_shard_is_refused_naming_the_folder_to_give(tmp_path):
    """Shared case diffusers_sharded_folder_zimage: the index or the first shard given instead of the folder."""
    folder = tmp_path / "transformer"
    MODELS["z-image-turbo"].tiny_transformer(S.SEED).to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    for part in [folder / "diffusion_pytorch_model.safetensors.index.json",
                 sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[0]]:
        assert f"give the folder {folder} instead" in refusal(part, "z-image-turbo", "bf16")


def test_a_file_no_slot_takes_is_refused_from_every_slot_saying_what_it_is(root, tmp_path):
    original = S.flux2_to_original(S.reference("flux2-dev"))
    fp8, _ = S.quantized_tensors(original, S.comfy_fp8, "tensors")
    nvfp4, _ = S.quantized_tensors(original, S.comfy_nvfp4, "tensors")
    mixed = {**{k: v for k, v in fp8.items() if k.startswith("double_blocks.")},
             **{k: v for k, v in nvfp4.items() if not k.startswith("double_blocks.")}}
    files = {
        "comfy-mixed; layers: 16x float8_e4m3fn, 4x nvfp4": S.write_safetensors(tmp_path / "mixed.safetensors", mixed),
        "fp8-unscaled": S.write_safetensors(tmp_path / "cast.safetensors", {
            k: v.to(torch.float8_e4m3fn) if S.is_block_linear(k, v) else v for k, v in original.items()}),
        "fp16": S.write_safetensors(tmp_path / "fp16.safetensors", {k: v.half() for k, v in original.items()}),
    }
    for what, path in files.items():
        for slot in identify.PRECISION_NEEDS:
            assert f"is flux2-dev, no fluxgate precision ({what}" in refusal(path, "flux2-dev", slot)
    unknown = S.write_safetensors(tmp_path / "llm.safetensors", {
        "model.layers.0.mlp.up_proj.weight": torch.ones(4, 4, dtype=torch.bfloat16)})
    assert "its tensor names match none of flux1, flux2, z-image" in refusal(unknown, "flux2-dev", "bf16")


def test_comfy_markers_that_cannot_be_read_or_name_no_tensor_are_refused(tmp_path):
    original = S.flux2_to_original(S.reference("flux2-dev"))
    tensors, metadata = S.quantized_tensors(original, S.comfy_nvfp4, "metadata")
    elsewhere = S.write_safetensors(tmp_path / "elsewhere.safetensors", tensors, {
        "_quantization_metadata": metadata["_quantization_metadata"].replace('"double_blocks', '"net.double_blocks')
        .replace('"single_blocks', '"net.single_blocks')})
    assert "name none of its tensors" in refusal(elsewhere, "flux2-dev", "nvfp4")
    garbled = S.write_safetensors(tmp_path / "garbled.safetensors", tensors, {"_quantization_metadata": "{layers"})
    assert "unreadable _quantization_metadata" in refusal(garbled, "flux2-dev", "nvfp4")
    marker = S.write_safetensors(tmp_path / "marker.safetensors", {
        **tensors, "double_blocks.0.img_attn.qkv.comfy_quant": torch.tensor([1, 2, 3], dtype=torch.uint8)})
    assert "double_blocks.0.img_attn.qkv.comfy_quant is not ComfyUI's JSON marker" in refusal(marker, "flux2-dev",
                                                                                             "nvfp4")
