"""Headers anyone can write are read with bounds (issue 27 item 7) and damaged containers are named as what they are
(issue 30 item 3): each hostile or broken file is one line naming it, in bounded time and memory, never a hang.

Bounds (weights/headers.py, weights/gguf_index.py): a safetensors header of at most 16 MiB and 100,000 tensors; a
GGUF of at most 100,000 tensors and 10,000 fields, names of 64 KiB, arrays of 2^20 items, every count and length
no larger than the rest of the file can hold; a comfy_quant marker of at most 64 KiB, never read past that.
"""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import layouts_support as S
import pytest
import torch

from fluxgate.errors import FixtureError
from fluxgate.weights import identify

# Not a timing test: a hostile header must neither hang nor grow memory; these are orders of magnitude above need.
SECONDS = 5.0
PEAK_BYTES = 32 << 20


def one_line_refusal(path: Path) -> str:
    """identify's FixtureError for `path`, asserting one line naming the file, within SECONDS and PEAK_BYTES."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(FixtureError) as error:
            identify.identify(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < SECONDS and peak < PEAK_BYTES, (time.monotonic() - started, peak)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data) if length is None else length) + data


def gguf_file(path: Path, fields: bytes = b"", tensors: bytes = b"", n_fields: int = 0, n_tensors: int = 0,
              tail: bytes = b"") -> Path:
    """A GGUF v3 (ggml docs/gguf.md) with the given counts and raw field / tensor-index bytes, as a hostile writer
    would make it: nothing checks that the counts fit."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields) + fields + tensors + tail)
    return path


def tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


STRING, ARRAY, UINT32 = 8, 9, 4
HOSTILE_GGUF = {
    # the review's 121-byte file: a field count no file can hold
    "2^60 fields": dict(n_fields=1 << 60, fields=gguf_string("general.architecture") + struct.pack("<I", STRING)
                        + gguf_string("flux") + bytes(64)),
    "1M tensors claimed": dict(n_tensors=1_000_000, tail=bytes(64)),
    "a key of 2^62 bytes": dict(n_fields=1, fields=gguf_string(b"", length=1 << 62) + bytes(64)),
    "a string of 2^40 bytes": dict(n_fields=1, fields=gguf_string("k") + struct.pack("<I", STRING)
                                   + gguf_string(b"", length=1 << 40)),
    "an array of 2^50 items": dict(n_fields=1, fields=gguf_string("k") + struct.pack("<IIQ", ARRAY, UINT32, 1 << 50)),
    "an array of 2^21 strings": dict(n_fields=1, fields=gguf_string("k") + struct.pack("<IIQ", ARRAY, STRING, 1 << 21)
                                     + bytes(8 << 21)),
    "1000 dims": dict(n_tensors=1, tensors=gguf_string("t") + struct.pack("<I", 1000) + bytes(64)),
    "a tensor past the end": dict(n_tensors=1, tensors=tensor_info("t", (1 << 40,), gguf.GGMLQuantizationType.F32)),
    "an unknown value type": dict(n_fields=1, fields=gguf_string("k") + struct.pack("<I", 77) + bytes(16)),
}


@pytest.mark.parametrize("kind", list(HOSTILE_GGUF))
def test_a_hostile_gguf_header_is_one_line_in_bounded_time_and_memory(tmp_path, kind):
    message = one_line_refusal(gguf_file(tmp_path / "hostile.gguf", **HOSTILE_GGUF[kind]))
    assert "corrupt GGUF header" in message or "truncated" in message, message


def test_a_gguf_tensor_type_newer_than_gguf_py_is_named_as_such_not_as_corrupt(tmp_path):
    newer = max(t.value for t in gguf.GGMLQuantizationType) + 7
    path = gguf_file(tmp_path / "newer.gguf", n_tensors=1, tensors=tensor_info("double_blocks.0.x.weight", (32, 4),
                                                                                 newer), tail=bytes(256))
    message = one_line_refusal(path)
    assert f"GGML type {newer}" in message and "upgrade gguf" in message and "corrupt" not in message


def test_a_gguf_naming_one_tensor_twice_is_named_a_duplicate_entry_not_truncated(tmp_path):
    F32 = gguf.GGMLQuantizationType.F32
    twice = tensor_info("img_in.weight", (4,), F32) + tensor_info("img_in.weight", (4,), F32, 32)
    path = gguf_file(tmp_path / "twice.gguf", n_tensors=2, tensors=twice, tail=bytes(128))
    message = one_line_refusal(path)
    assert "a damaged GGUF container: its index names tensor img_in.weight twice (a duplicate entry" in message
    assert "truncated" not in message and "corrupt GGUF header" not in message


def test_a_gguf_of_another_version_is_named_by_its_version_not_as_corrupt(tmp_path):
    path = tmp_path / "v4.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 4, 0, 0))
    message = one_line_refusal(path)
    assert "GGUF version 4; gguf-py and fluxgate read versions 2 and 3" in message and "corrupt" not in message


def safetensors_file(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(begin: int, end: int, shape=(2,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


DAMAGED_SAFETENSORS = {
    "negative offsets": ({"a": entry(-8, 0)}, "must be non-negative"),
    "overlapping tensors": ({"a": entry(0, 8), "b": entry(4, 12)}, "tensors a and b overlap"),
    "offsets past the end": ({"a": entry(0, 8), "b": entry(1 << 40, (1 << 40) + 8)}, "truncated"),
    "a size that is not the shape's": ({"a": entry(0, 12)}, "12 bytes for a F32 tensor of shape [2]"),
    "an unknown dtype": ({"a": entry(0, 8, dtype="F13")}, "dtype 'F13'"),
    "one tensor twice": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                         b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "names tensor a twice"),
}


@pytest.mark.parametrize("kind", list(DAMAGED_SAFETENSORS))
def test_a_damaged_safetensors_header_is_named_as_what_it_is(tmp_path, kind):
    header, says = DAMAGED_SAFETENSORS[kind]
    assert says in one_line_refusal(safetensors_file(tmp_path / "damaged.safetensors", header, bytes(16)))


def test_a_safetensors_header_longer_than_the_bound_is_refused_before_it_is_read(tmp_path):
    path = safetensors_file(tmp_path / "huge.safetensors", b"{" + b" " * ((16 << 20) + 8) + b"}")
    assert "fluxgate reads at most 16777216" in one_line_refusal(path)


def test_a_huge_comfy_quant_marker_is_refused_by_its_size_unread(tmp_path):
    size = 4 << 20
    header = {"double_blocks.0.img_attn.qkv.comfy_quant": entry(0, size, shape=(size,), dtype="U8")}
    path = safetensors_file(tmp_path / "marker.safetensors", header, b"{" * size)
    assert f"comfy_quant marker of {size} bytes" in one_line_refusal(path)


def test_a_dangling_link_is_named_with_its_missing_target(tmp_path):
    link = tmp_path / "flux1-dev.safetensors"
    os.symlink("/mnt/unmounted-disk/flux1-dev.safetensors", link)
    assert "a link to /mnt/unmounted-disk/flux1-dev.safetensors, which does not exist" in one_line_refusal(link)


def test_the_real_profile_names_a_dangling_link_and_its_target_instead_of_skipping(tmp_path):
    link = tmp_path / "flux2.safetensors"
    os.symlink(tmp_path / "gone" / "flux2.safetensors", link)
    with pytest.raises(FixtureError, match=rf"{link}: a link to {tmp_path}/gone/flux2.safetensors, which does not "):
        S.load_real(link, "flux2-dev", "bf16", Path("/nonexistent"))


def test_a_bfl_sft_file_loads_as_the_safetensors_it_is(tmp_path):
    pipeline = S.pipeline_folder("flux2-dev", tmp_path / "pipeline")
    path = S.write_safetensors(tmp_path / "flux2-dev.sft", S.flux2_to_original(S.reference("flux2-dev")))
    loaded, origin = S.load_real(path, "flux2-dev", "bf16", pipeline)
    assert origin["identity"]["precision"] == "bf16" and ".sft read as safetensors" in origin["path"]
    reference = S.reference("flux2-dev")
    assert all(torch.equal(value.to(torch.bfloat16), reference[key]) for key, value in loaded.state_dict().items())


def test_a_q8_0_gguf_holding_a_nan_weight_is_refused_naming_the_tensor(tmp_path):
    pipeline = S.pipeline_folder("flux2-dev", tmp_path / "pipeline")
    original = S.flux2_to_original(S.reference("flux2-dev"))
    key = "double_blocks.0.img_mlp.0.weight"
    original[key] = original[key].clone()
    original[key][3, :5] = float("nan")
    path = S.city96_gguf(tmp_path / "nan-Q8_0.gguf", original, "flux")
    with pytest.raises(FixtureError, match=r"nan-Q8_0.gguf: transformer_blocks.0.ff.linear_in.weight holds \d+ NaN"):
        S.load_real(path, "flux2-dev", "gguf-q8_0", pipeline)
