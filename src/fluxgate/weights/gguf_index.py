"""A GGUF file's key-value fields and tensor index, read with bounds before any other reader sees the file.

Format (ggml docs/gguf.md, versions 2 and 3, little-endian): magic b"GGUF", u32 version, u64 tensor count, u64
key-value count; each key-value: a string key (u64 length + UTF-8 bytes), a u32 value type, the value (scalars of
1/2/4/8 bytes, a string, or an array: u32 item type, u64 item count, the items); each tensor: a string name, u32
n_dims, n_dims u64 dims (innermost first), u32 GGML type, u64 offset into the data section, which starts at the next
multiple of `general.alignment` (default 32) after the index.

gguf-py's `GGUFReader` trusts every count and length: a 121-byte file claiming 2^60 key-values makes it loop and
grow memory for ever. Here every count and length is checked against what the rest of the file can hold and against
caps far above any diffusion checkpoint, so a hostile header is one `GGUFIndexError` phrase after reading at most
the file's own bytes: at most `MAX_TENSORS` tensors (a FLUX.2 GGUF has ~600, a full sd.cpp checkpoint a few
thousand), `MAX_FIELDS` key-values, keys and names of `MAX_NAME_BYTES`, arrays of `MAX_ARRAY_ITEMS` items, at most
`MAX_DIMS` dims (ggml's GGML_MAX_DIMS), every tensor's bytes inside the file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

MAX_TENSORS = 100_000
MAX_FIELDS = 10_000
MAX_NAME_BYTES = 1 << 16
MAX_ARRAY_ITEMS = 1 << 20
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# value type -> struct format of its scalar (gguf.GGUFValueType: 8 is STRING, 9 ARRAY)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFIndexError(ValueError):
    """A GGUF header that cannot be what it claims; the message is one phrase naming what is wrong."""


class GGUFNamedProblem(GGUFIndexError):
    """A problem whose phrase already says what the file is (not GGUF, another GGUF version, truncated, a duplicate
    entry, a type newer than gguf-py): reported as it is, never as "truncated or corrupt"."""


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor index. `shape`: outermost first (numpy order; the file stores innermost first);
    `type_id`: the raw GGML type number; `type_name`: gguf-py's name for it, None when the installed gguf-py does
    not know the number (a type newer than it)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str | None
    offset: int


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's version, its scalar and string fields ({key: value}; arrays left out) and its tensor index."""

    version: int
    fields: dict[str, object]
    tensors: list[GGUFTensor]


class _Cursor:
    """Reads little-endian values from a file, never past its end, and never more than the caps allow."""

    def __init__(self, handle, size: int):
        self.handle, self.size, self.pos = handle, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, count: int, what: str) -> None:
        if count > self.left():
            raise GGUFIndexError(f"{what} needs {count} bytes at offset {self.pos}, but the file ends "
                                 f"{self.left()} bytes later (truncated or corrupt)")

    def take(self, count: int, what: str) -> bytes:
        self.need(count, what)
        self.pos += count
        return self.handle.read(count)

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.scalar("<Q", what)
        if limit is not None and length > limit:
            raise GGUFIndexError(f"{what} claims {length} bytes (at most {limit} read)")
        return self.take(length, what).decode("utf-8", "replace")

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count
        self.handle.seek(self.pos)


def _count(cursor: _Cursor, what: str, cap: int, min_bytes_each: int) -> int:
    count = cursor.scalar("<Q", what)
    if count > cap:
        raise GGUFIndexError(f"claims {count} {what}; fluxgate reads at most {cap}")
    if count * min_bytes_each > cursor.left():
        raise GGUFIndexError(f"claims {count} {what}, but the {cursor.left()} bytes after the count hold at most "
                             f"{cursor.left() // min_bytes_each}")
    return count


def _value(cursor: _Cursor, kind: int, key: str, depth: int = 0):
    """A field's value: a scalar or str; arrays are skipped within bounds (None)."""
    if kind in SCALARS:
        return cursor.scalar(SCALARS[kind], f"field {key}")
    if kind == STRING:
        return cursor.string(f"string of field {key}", limit=cursor.left())
    if kind == ARRAY and depth < 2:
        item = cursor.scalar("<I", f"array type of field {key}")
        count = cursor.scalar("<Q", f"array length of field {key}")
        size = struct.calcsize(SCALARS[item]) if item in SCALARS else 8  # a string or array item is at least 8 bytes
        if count > MAX_ARRAY_ITEMS or count * size > cursor.left():
            raise GGUFIndexError(f"field {key} claims an array of {count} items, more than "
                                 f"{'fluxgate reads' if count > MAX_ARRAY_ITEMS else 'the file holds'}")
        if item in SCALARS:
            cursor.skip(count * size, f"array of field {key}")
        else:
            for _ in range(count):
                _value(cursor, item, key, depth + 1)
        return None
    raise GGUFIndexError(f"field {key} has value type {kind}, which GGUF does not define")


def read_gguf_index(path: Path) -> GGUFIndex:
    """The bounded header of the GGUF file at `path` (module docs). Raises OSError when it cannot be read and
    GGUFIndexError, one phrase, for anything that does not fit: bad magic or version, a count, length or offset past
    the file or the caps, an unknown value type, a tensor named twice."""
    import gguf

    known = {t.value: t.name for t in gguf.GGMLQuantizationType}
    size = path.stat().st_size
    with path.open("rb") as handle:
        cursor = _Cursor(handle, size)
        magic = handle.read(4)
        cursor.pos = len(magic)
        if magic != b"GGUF":
            raise GGUFNamedProblem(f"not a GGUF file (starts with {magic!r}, not b'GGUF')")
        version = cursor.scalar("<I", "version")
        if version not in (2, 3):
            raise GGUFNamedProblem(f"GGUF version {version}; gguf-py and fluxgate read versions 2 and 3")
        n_tensors = _count(cursor, "tensors", MAX_TENSORS, 8 + 4 + 8 + 4 + 8)
        n_fields = _count(cursor, "key-value fields", MAX_FIELDS, 8 + 4 + 1)
        fields = {}
        for _ in range(n_fields):
            key = cursor.string("field key", limit=MAX_NAME_BYTES)
            fields[key] = _value(cursor, cursor.scalar("<I", f"type of field {key}"), key)
        tensors, seen = [], set()
        for _ in range(n_tensors):
            name = cursor.string("tensor name", limit=MAX_NAME_BYTES)
            if name in seen:
                raise GGUFNamedProblem(f"a damaged GGUF container: its index names tensor {name} twice (a "
                                       "duplicate entry: a hand-edited file or a faulty writer, not a cut download)")
            seen.add(name)
            n_dims = cursor.scalar("<I", f"dims of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFIndexError(f"tensor {name} claims {n_dims} dims (GGUF has 1 to {MAX_DIMS})")
            dims = struct.unpack(f"<{n_dims}Q", cursor.take(8 * n_dims, f"dims of {name}"))
            type_id = cursor.scalar("<I", f"type of {name}")
            offset = cursor.scalar("<Q", f"offset of {name}")
            tensors.append(GGUFTensor(name, tuple(reversed(dims)), type_id, known.get(type_id), offset))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFIndexError(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    _check_extents(tensors, data_start, size)
    return GGUFIndex(version, fields, tensors)


def truncated(size: int, described: int) -> str:
    """The phrase for a file shorter than its header says (`headers` and this module)."""
    return f"truncated: {size} bytes, but its header describes {described}; download it again"


def _check_extents(tensors: list[GGUFTensor], data_start: int, size: int) -> None:
    """Every tensor of a type gguf-py knows lies inside the file; a type it does not know is named as newer."""
    import gguf

    newer = [t for t in tensors if t.type_name is None]
    if newer:
        raise GGUFNamedProblem(f"tensor {newer[0].name} has GGML type {newer[0].type_id}, which the installed gguf-py "
                               f"{_gguf_version()} does not know ({len(newer)} tensor(s)); a newer GGUF type: "
                               "upgrade gguf (pip install -U gguf), the file may be sound")
    end = data_start
    for tensor in tensors:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.type_id)]
        count = 1
        for dim in tensor.shape:
            count *= dim
        if tensor.shape and tensor.shape[-1] % block:
            raise GGUFIndexError(f"tensor {tensor.name} has rows of {tensor.shape[-1]} values, not whole "
                                 f"{tensor.type_name} blocks of {block}")
        end = max(end, data_start + tensor.offset + count // block * type_size)
    if end > size:
        raise GGUFNamedProblem(truncated(size, end))


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
