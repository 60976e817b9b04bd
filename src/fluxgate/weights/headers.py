"""A checkpoint file's header, read without its tensor data, and the one-line problem of a file that cannot be read.

Both `identify` (what a file is) and `loading` (why diffusers' loader failed on it) ask here, so a damaged file is
named the same way wherever it is met: "truncated: N bytes, but its header describes M", "corrupt safetensors header
(...)", "names tensor X twice" (a duplicate entry: a damaged container, in either format), "not a GGUF file (...)",
"truncated or corrupt GGUF header (...)", a GGUF type newer than the installed gguf-py, "a link to X, which does not
exist".

Formats: safetensors (huggingface/safetensors README "Format": an unsigned 64-bit little-endian header length N, N
bytes of JSON {key: {"dtype", "shape", "data_offsets": [begin, end]}} plus an optional "__metadata__" {str: str},
then the data the offsets index from the end of the header; every entry is checked: a known dtype, non-negative
offsets whose length is the shape's, no two tensors overlapping, all inside the file, no key twice); GGUF
(`gguf_index`: read with bounds before gguf-py's `GGUFReader` or diffusers ever see the file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fluxgate.errors import FixtureError
from fluxgate.weights.gguf_index import GGUFIndex, GGUFIndexError, GGUFNamedProblem, read_gguf_index, truncated

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")  # BFL's first releases (flux1-dev.sft, ae.sft) are safetensors
# Bounds on what a header may claim, far above any diffusion checkpoint (a full ComfyUI FLUX checkpoint: ~2,000
# tensors in a ~300 KiB header); safetensors' own limit on the header is 100 MB.
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
# safetensors dtype -> bits per value (huggingface/safetensors safetensors/src/tensor.rs `Dtype`)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
              "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}


class HeaderProblem(ValueError):
    """A safetensors header that cannot be what it claims; the message is one phrase."""


def missing(path: Path) -> str:
    """Why `path` is not there, one phrase: a link and its missing target (a disk not mounted), or not found."""
    if path.is_symlink():
        return f"a link to {os.readlink(path)}, which does not exist (its disk not mounted, or the file moved)"
    return "not found"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderProblem(f"names tensor {key} twice in its header (a damaged or hand-edited file)")
        seen[key] = value
    return seen


def _parse(path: Path) -> tuple[dict[str, dict], dict, int]:
    """(tensors, metadata, data start) of a safetensors file, every entry checked (module docs); HeaderProblem
    otherwise. Reads at most MAX_HEADER_BYTES."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length_field = handle.read(8)
        length = int.from_bytes(length_field, "little")
        if len(length_field) < 8:
            raise HeaderProblem(f"truncated or corrupt safetensors file ({size} bytes, shorter than its 8-byte "
                                "header length; download it again)")
        if not 2 <= length <= size - 8:
            raise HeaderProblem(f"truncated or corrupt safetensors header (header length {length} does not fit the "
                                f"file's {size} bytes)")
        if length > MAX_HEADER_BYTES:
            raise HeaderProblem(f"a header of {length} bytes; fluxgate reads at most {MAX_HEADER_BYTES} "
                                "(a diffusion checkpoint's is under 1 MiB)")
        raw = handle.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except HeaderProblem:
        raise
    except ValueError as error:
        raise HeaderProblem(f"corrupt safetensors header ({type(error).__name__}: {error})") from None
    if not isinstance(header, dict):
        raise HeaderProblem("corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderProblem("corrupt safetensors header (__metadata__ is not a map of strings)")
    if len(header) > MAX_TENSORS:
        raise HeaderProblem(f"a header of {len(header)} tensors; fluxgate reads at most {MAX_TENSORS}")
    extents = sorted((_extent(key, entry), key) for key, entry in header.items())
    for (before, after) in zip(extents, extents[1:]):
        if after[0][0] < before[0][1]:
            raise HeaderProblem(f"corrupt safetensors header (tensors {before[1]} and {after[1]} overlap: bytes "
                                f"{list(before[0])} and {list(after[0])})")
    end = extents[-1][0][1] if extents else 0
    if 8 + length + end > size:
        raise HeaderProblem(truncated(size, 8 + length + end))
    return header, metadata, 8 + length


def _extent(key: str, entry) -> tuple[int, int]:
    """A tensor entry's [begin, end) in the data section, checked against its dtype and shape."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as error:
        raise HeaderProblem(f"corrupt safetensors header ({key}: {type(error).__name__}: {error})") from None
    if dtype not in DTYPE_BITS:
        raise HeaderProblem(f"corrupt safetensors header ({key} has dtype {dtype!r}, which safetensors does not "
                            "define)")
    numbers = [begin, end, *shape]
    if not all(type(n) is int and n >= 0 for n in numbers) or begin > end:
        raise HeaderProblem(f"corrupt safetensors header ({key}: data_offsets {[begin, end]} and shape {shape} must "
                            "be non-negative integers, begin <= end)")
    count = 1
    for dim in shape:
        count *= dim
    if end - begin != -(-count * DTYPE_BITS[dtype] // 8):
        raise HeaderProblem(f"corrupt safetensors header ({key}: {end - begin} bytes for a {dtype} tensor of shape "
                            f"{shape})")
    return begin, end


def safetensors_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's header, read without its tensor data and checked: {key: {"dtype", "shape",
    "data_offsets"}}, its `__metadata__` ({} when absent), and the byte offset where the tensor data starts.

    Raises OSError when the file cannot be read, HeaderProblem (a ValueError; one phrase) when the header does not fit
    the file, names a tensor twice, has an unknown dtype, sizes that do not match or overlapping, negative or
    out-of-file offsets, or claims more than the bounds (MAX_HEADER_BYTES, MAX_TENSORS)."""
    return _parse(path)


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be read, one phrase (`safetensors_header`'s checks); None when it
    is whole."""
    try:
        _parse(path)
    except OSError as error:
        return f"unreadable ({error})"
    except HeaderProblem as error:
        return str(error)
    return None


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict]:
    """`safetensors_header`'s tensors and metadata of a whole file. Raises FixtureError, one line naming the file,
    for any `safetensors_problem`."""
    try:
        header, metadata, _ = _parse(path)
    except OSError as error:
        raise FixtureError(f"{path}: unreadable ({error})") from None
    except HeaderProblem as error:
        raise FixtureError(f"{path}: {error}") from None
    return header, metadata


def read_gguf(path: Path) -> GGUFIndex:
    """The GGUF file's bounded fields and tensor index (`gguf_index`), tensor data not read. Raises FixtureError, one
    line naming the file, for an unreadable file, a file that is not GGUF, or one cut, damaged or beyond the bounds;
    a tensor type newer than the installed gguf-py is said as such."""
    try:
        return read_gguf_index(path)
    except OSError as error:
        raise FixtureError(f"{path}: unreadable ({error})") from None
    except GGUFIndexError as error:
        named = isinstance(error, GGUFNamedProblem)
        raise FixtureError(f"{path}: {error if named else f'truncated or corrupt GGUF header ({error})'}") from None


def gguf_problem(path: Path) -> str | None:
    """Why the GGUF file at `path` cannot be read, one phrase (`read_gguf`); None when its header and index are
    sound."""
    try:
        read_gguf(path)
    except FixtureError as error:
        return str(error).removeprefix(f"{path}: ")
    return None
