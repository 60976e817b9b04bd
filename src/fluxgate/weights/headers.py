"""A checkpoint file's header, read without its tensor data, and the one-line problem of a file that cannot be read.

Both `identify` (what a file is) and `loading` (why diffusers' loader failed on it) ask here, so a damaged file is
named the same way wherever it is met: "truncated: N bytes, but its header describes M", "corrupt safetensors header
(...)", "not a GGUF file (...)", "truncated or corrupt GGUF file (...)".

Formats: safetensors (huggingface/safetensors README "Format": an unsigned 64-bit little-endian header length N, N
bytes of JSON {key: {"dtype", "shape", "data_offsets": [begin, end]}} plus an optional "__metadata__" {str: str},
then the data the offsets index from the end of the header); GGUF (ggml docs/gguf.md, read with llama.cpp's gguf-py
`GGUFReader`: magic b"GGUF", key-value fields, a tensor index, then aligned tensor data).
"""

from __future__ import annotations

import json
from pathlib import Path

from fluxgate.errors import FixtureError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def safetensors_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's header, read without its tensor data: {key: {"dtype", "shape", "data_offsets"}}, its
    `__metadata__` ({} when absent), and the byte offset where the tensor data starts.

    Raises OSError when the file cannot be read, ValueError (json.JSONDecodeError among them) when the header length
    does not fit the file (a truncated or corrupt file) or the JSON is not an object."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length_field = handle.read(8)
        length = int.from_bytes(length_field, "little")
        if len(length_field) < 8 or not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"truncated or corrupt: header length {length} does not fit the file's {size} bytes")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file at `path` cannot be read, one phrase: unreadable, a corrupt header, tensor offsets
    that are not numbers, or truncated (its header describes more bytes than the file holds); None when it is whole."""
    try:
        header, _, data_start = safetensors_header(path)
    except OSError as error:
        return f"unreadable ({error})"
    except ValueError as error:
        return f"corrupt safetensors header ({type(error).__name__}: {error})"
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as error:
        return f"corrupt safetensors header ({type(error).__name__}: {error})"
    size = path.stat().st_size
    if data_start + end > size:
        return f"truncated: {size} bytes, but its header describes {data_start + end}; download it again"
    return None


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict]:
    """`safetensors_header`'s tensors and metadata of a whole file. Raises FixtureError, one line naming the file,
    for any `safetensors_problem`."""
    problem = safetensors_problem(path)
    if problem:
        raise FixtureError(f"{path}: {problem}")
    header, metadata, _ = safetensors_header(path)
    return header, metadata


def gguf_reader(path: Path):
    """gguf-py's `GGUFReader` over the file (memory-mapped: tensor data is not read). Raises FixtureError, one line
    naming the file, for an unreadable file, a file that is not GGUF, or one cut or damaged (`gguf_problem`)."""
    import gguf

    problem = _gguf_magic_problem(path)
    if problem is None:
        try:
            return gguf.GGUFReader(str(path))
        except Exception as error:  # noqa: BLE001 - the reader fails in many ways on a cut or damaged file
            problem = _gguf_read_problem(path, error)
    raise FixtureError(f"{path}: {problem}")


def gguf_problem(path: Path) -> str | None:
    """Why the GGUF file at `path` cannot be read, one phrase; None when gguf-py reads its header and index."""
    try:
        gguf_reader(path)
    except FixtureError as error:
        return str(error).removeprefix(f"{path}: ")
    return None


def gguf_field(reader, name: str):
    """A GGUF key-value field's value (a str for strings, else the first scalar), None when absent."""
    import gguf

    found = reader.fields.get(name)
    if found is None or not found.data:
        return None
    part = found.parts[found.data[0]]
    if found.types and found.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0] if hasattr(part, "tolist") else part


def _gguf_magic_problem(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        return f"unreadable ({error})"
    return None if magic == b"GGUF" else f"not a GGUF file (starts with {magic!r}, not b'GGUF')"


def _gguf_read_problem(path: Path, error: Exception) -> str:
    reason = " ".join(str(error).split())[:160]
    return f"truncated or corrupt GGUF file ({path.stat().st_size} bytes; {type(error).__name__}: {reason})"
