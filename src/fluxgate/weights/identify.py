"""What a checkpoint is, from its own contents: model family, fluxgate precision and on-disk layout.

One function, `identify(path)`, answers for a safetensors file, a GGUF file or a diffusers folder, reading headers
and the few small marker tensors only (never the weights). The layouts it tells apart, and where each comes from:

- `bf16` / `fp16` / `fp32`: plain tensors (BFL releases, Comfy-Org split files, ComfyUI ModelSave).
- `bfl-fp8`: e4m3 `weight` with an fp32 per-row `weight_scale` `[N]` (diffusers' BFL fp8r quantizer).
- `comfy-scaled-fp8`: ComfyUI's legacy "scaled fp8": e4m3 `weight`, scalar `scale_weight`, marker `scaled_fp8`.
- `comfy-mixed-fp8`: ComfyUI's mixed-precision files (Comfy-Org `*_fp8mixed`): a `<layer>.comfy_quant` uint8 JSON
  tensor `{"format": "float8_e4m3fn"}` per quantized linear, or `_quantization_metadata` in the header, with a
  scalar fp32 `weight_scale` (ComfyUI QUANTIZATION.md, comfy/ops.py).
- `comfy-nvfp4`: the same markers with `{"format": "nvfp4"}` (comfy-kitchen): packed E2M1 `weight` uint8 `[N, K/2]`,
  FIRST value of a pair in the HIGH nibble, E4M3 `weight_scale` in cuBLAS's 128x4-tile layout, fp32
  `weight_scale_2`, `input_scale` optional.
- `modelopt-nvfp4`: uint8 `weight` with `weight_scale` and `weight_scale_2` and no ComfyUI marker: ModelOpt's
  layout (first value in the LOW nibble, row-major block scales).
- `gguf`: city96 / llama.cpp GGUF; its precision follows the quantization types of its 2-D weights (Q8_0 -> `gguf-q8_0`,
  any other type -> no fluxgate precision), its family the tensor names (city96 writes FLUX.2 as arch `flux`).
- `diffusers-folder`: a diffusers model folder (`config.json` + one or more safetensors shards, an index json).

Key prefixes (`model.diffusion_model.` of ComfyUI checkpoints and ModelSave files, `diffusion_model.`, `model.`) are
found and reported, never part of the answer about the model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxgate.errors import FixtureError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
GGUF_Q8_0_COMPANIONS = {"F32", "F16", "BF16"}  # what stays high precision beside Q8_0 in a Q8_0 file
COMFY_FORMATS = {"float8_e4m3fn": ("fp8-scaled", "comfy-mixed-fp8"), "nvfp4": ("nvfp4", "comfy-nvfp4")}


@dataclass(frozen=True)
class Identity:
    """A checkpoint's identification. `family`: "flux1", "flux2", "z-image" or None (unrecognised); `precision`: the
    fluxgate precision it can fill ("bf16", "fp8-scaled", "gguf-q8_0", "nvfp4") or None; `layout`: the on-disk layout
    (module docs); `prefix`: the key prefix its tensors carry ("" for none); `tensor_types`: tensor count per dtype or
    GGUF type; `detail`: a short human description."""

    path: str
    family: str | None
    precision: str | None
    layout: str
    prefix: str = ""
    tensor_types: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    def describe(self) -> str:
        family = self.family or "unrecognised model"
        precision = self.precision or "no fluxgate precision"
        prefix = f", keys under '{self.prefix}'" if self.prefix else ""
        return f"{family}, {precision} ({self.layout}{prefix}{'; ' + self.detail if self.detail else ''})"

    def to_json(self) -> dict:
        return asdict(self)


MODEL_FAMILY = {"flux1-dev": "flux1", "flux1-kontext-dev": "flux1", "flux2-dev": "flux2", "z-image-turbo": "z-image"}


def family_of(keys: list[str]) -> str | None:
    """The model family from tensor names (original BFL/Tongyi keys or diffusers keys, any prefix)."""
    text = "\n".join(keys)
    if "double_stream_modulation" in text:
        return "flux2"  # FLUX.2 shares one modulation per stream (BFL and diffusers keys alike)
    if "cap_embedder" in text or "noise_refiner" in text or "context_refiner" in text:
        return "z-image"
    if ("double_blocks." in text and "single_blocks." in text) or "single_transformer_blocks." in text:
        return "flux1"
    return None


def common_prefix(keys: list[str]) -> str:
    """The first of PREFIXES that every key but metadata markers starts with, else ""."""
    named = [key for key in keys if key not in ("scaled_fp8",)]
    return next((p for p in PREFIXES if named and all(key.startswith(p) for key in named)), "")


def identify(path: Path) -> Identity:
    """Identify the checkpoint at `path` (a .safetensors or .gguf file, or a diffusers folder).

    Raises FixtureError, one line naming the path, for a missing path, an index json or a single shard of a
    sharded folder (give the folder), and an unreadable or unknown file."""
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise FixtureError(f"{path}: not found")
    if path.name.endswith(".index.json"):
        raise FixtureError(f"{path}: the index of a sharded diffusers folder; give the folder {path.parent} instead")
    if path.suffix == ".gguf":
        return _gguf(path)
    if path.suffix == ".safetensors":
        if "-of-" in path.stem and any(path.parent.glob("*.safetensors.index.json")):
            raise FixtureError(f"{path}: one shard of a sharded diffusers folder; give the folder {path.parent} "
                               "instead")
        return _safetensors(path)
    raise FixtureError(f"{path}: not a checkpoint fluxgate reads (.safetensors, .gguf or a diffusers folder)")


def safetensors_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's header, read without its tensor data: {key: {"dtype", "shape", "data_offsets"}}, its
    `__metadata__` ({} when absent), and the byte offset where the tensor data starts.

    The format (huggingface/safetensors, README "Format"): an unsigned 64-bit little-endian header length N, N bytes of
    JSON, then the data its `data_offsets` index. Raises OSError when the file cannot be read, ValueError
    (json.JSONDecodeError among them) when N does not fit the file (a truncated or corrupt file) or the JSON is not an
    object."""
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


def _header(path: Path) -> tuple[dict[str, dict], dict]:
    """`safetensors_header`'s tensors and metadata; FixtureError naming the file when it cannot be read."""
    try:
        header, metadata, _ = safetensors_header(path)
    except (OSError, ValueError) as error:
        raise FixtureError(f"{path}: unreadable safetensors header ({type(error).__name__}: {error})") from None
    return header, metadata


def _comfy_formats(path: Path, header: dict, metadata: dict) -> Counter:
    """Layer count per ComfyUI quantization format, from `_quantization_metadata` or `comfy_quant` tensors."""
    formats: Counter = Counter()
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
            formats.update(str((conf or {}).get("format")) for conf in layers.values())
        except (ValueError, AttributeError) as error:
            raise FixtureError(f"{path}: unreadable _quantization_metadata ({error})") from None
    markers = [key for key in header if key.endswith(".comfy_quant")]
    if markers:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in markers:
                try:
                    formats[str(json.loads(bytes(handle.get_tensor(key).tolist())).get("format"))] += 1
                except (ValueError, AttributeError) as error:
                    raise FixtureError(f"{path}: {key} is not ComfyUI's JSON marker ({error})") from None
    return formats


def _safetensors(path: Path) -> Identity:
    header, metadata = _header(path)
    keys = list(header)
    dtypes = Counter(str(entry.get("dtype")) for entry in header.values())
    prefix = common_prefix(keys)
    family = family_of(keys)

    def identity(precision, layout, detail=""):
        return Identity(str(path), family, precision, layout, prefix, dict(dtypes), detail)

    formats = _comfy_formats(path, header, metadata)
    if formats:
        known = [COMFY_FORMATS[f] for f in formats if f in COMFY_FORMATS]
        if len(formats) == 1 and known:
            return identity(*known[0], f"{sum(formats.values())} layers marked {next(iter(formats))}")
        return identity(None, "comfy-mixed", "layers: " + ", ".join(f"{n}x {f}" for f, n in formats.items()))
    if "scaled_fp8" in keys or any(key.endswith(".scale_weight") for key in keys):
        return identity("fp8-scaled", "comfy-scaled-fp8")
    weights = {key: entry for key, entry in header.items()
               if key.endswith(".weight") and len(entry.get("shape", ())) == 2}
    weight_dtypes = Counter(str(entry["dtype"]) for entry in weights.values())
    if weight_dtypes.get("U8") and any(key.endswith(".weight_scale_2") for key in keys):
        return identity("nvfp4", "modelopt-nvfp4", f"{weight_dtypes['U8']} packed E2M1 weights")
    if weight_dtypes.get("F8_E4M3"):
        scales = [header.get(key.removesuffix(".weight") + ".weight_scale") for key, entry in weights.items()
                  if entry["dtype"] == "F8_E4M3"]
        if scales and all(s is not None and len(s.get("shape", ())) == 1 and s["shape"][0] > 1 for s in scales):
            return identity("fp8-scaled", "bfl-fp8", f"{len(scales)} e4m3 weights, per-row scales")
        return identity(None, "fp8-per-tensor", f"{weight_dtypes['F8_E4M3']} e4m3 weights without per-row scales")
    if weight_dtypes.get("F8_E5M2"):
        return identity(None, "fp8-e5m2")
    plain = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
    if weight_dtypes and set(weight_dtypes) <= set(plain):
        dominant = weight_dtypes.most_common(1)[0][0]
        return identity("bf16" if dominant == "BF16" else None, plain[dominant])
    return identity(None, "unknown", "weights: " + ", ".join(f"{n}x {d}" for d, n in weight_dtypes.items()))


def _gguf(path: Path) -> Identity:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 - the reader fails in many ways on a cut or damaged file
        raise FixtureError(f"{path}: unreadable GGUF file ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:160]})") from None

    def field_value(name: str):
        found = reader.fields.get(name)
        if found is None or not found.data:
            return None
        part = found.parts[found.data[0]]
        return bytes(part).decode("utf-8", "replace") if found.types and found.types[0] == gguf.GGUFValueType.STRING \
            else part.tolist()[0] if hasattr(part, "tolist") else part

    arch = field_value("general.architecture")
    names = [tensor.name for tensor in reader.tensors]
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    weight_types = Counter(tensor.tensor_type.name for tensor in reader.tensors
                           if len(tensor.shape) >= 2 and tensor.name.endswith(".weight"))
    quantized = {t: n for t, n in weight_types.items() if t not in GGUF_Q8_0_COMPANIONS}
    detail = f"arch {arch}, " + ", ".join(f"{n}x {t}" for t, n in types.most_common())
    if quantized and set(quantized) == {"Q8_0"}:
        precision, layout = "gguf-q8_0", "gguf"
    else:
        dominant = max(quantized, key=quantized.get) if quantized else "unquantized"
        precision, layout = None, f"gguf-{dominant}"
    return Identity(str(path), family_of(names), precision, layout, common_prefix(names), dict(types), detail)


def is_model_folder(path: Path) -> bool:
    """A diffusers model folder: `config.json` beside one or more safetensors shards."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _folder(path: Path) -> Identity:
    shards = sorted(path.glob("*.safetensors"))
    if not is_model_folder(path):
        raise FixtureError(f"{path}: a folder, but not a diffusers model folder (needs config.json and *.safetensors)"
                           "; give a checkpoint file or a transformer/ folder")
    headers = [_header(shard)[0] for shard in shards]
    keys = [key for header in headers for key in header]
    dtypes = Counter(str(entry.get("dtype")) for header in headers for entry in header.values())
    weight_dtypes = Counter(str(entry.get("dtype")) for header in headers for key, entry in header.items()
                            if key.endswith(".weight") and len(entry.get("shape", ())) == 2)
    dominant = weight_dtypes.most_common(1)[0][0] if weight_dtypes else "?"
    return Identity(str(path), family_of(keys), "bf16" if dominant == "BF16" else None, "diffusers-folder",
                    common_prefix(keys), dict(dtypes), f"{len(shards)} shard(s), weights {dominant}")


def check_slot(identity: Identity, model: str, precision: str) -> None:
    """Refuse a checkpoint that is not what its slot in the models file says (`model`, `precision`): FixtureError,
    one line naming the file, what it is and what the slot needs. Nothing is measured under a wrong label."""
    wanted = MODEL_FAMILY.get(model)
    problems = []
    if identity.precision != precision:
        problems.append(f"the {precision} slot needs {precision}")
    if identity.family is not None and wanted is not None and identity.family != wanted:
        problems.append(f"the {model} slot needs a {wanted} model")
    if identity.family is None and identity.precision is not None:
        problems.append("its tensor names match none of flux1, flux2, z-image")
    if problems:
        raise FixtureError(f"{identity.path}: is {identity.describe()}; {'; '.join(problems)}")


def sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file (for a folder: of its shards' hashes in name order), cached by path, size and
    modification time in $XDG_CACHE_HOME/fluxgate/sha256.json so a 24 GB file is hashed once, not every run."""
    import hashlib
    import os

    path = Path(path).resolve()
    if path.is_dir():
        combined = hashlib.sha256()
        for shard in sorted(path.glob("*.safetensors")):
            combined.update(sha256(shard).encode())
        return combined.hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fluxgate" / "sha256.json"
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    known[key] = digest.hexdigest()
    try:
        from fluxgate.files import atomic_write

        atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(known, indent=0, sort_keys=True)))
    except OSError:
        pass  # a read-only home: hash again next time
    return known[key]
