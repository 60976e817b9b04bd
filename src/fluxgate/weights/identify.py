"""What a checkpoint is, from its own contents: model family, fluxgate precision and on-disk layout.

One function, `identify(path)`, answers for a safetensors file, a GGUF file or a diffusers folder, reading headers
and the few small marker tensors only (never the weights). The layouts it tells apart, and where each comes from:

- `bf16` / `fp16` / `fp32`: plain tensors (BFL releases, Comfy-Org split files, ComfyUI ModelSave).
- `bfl-fp8`: e4m3 `weight` with an fp32 per-row `weight_scale` `[N]` (diffusers' BFL `fp8r` scheme).
- `scalar-scale-fp8`: e4m3 `weight` with one fp32 `weight_scale` per tensor and no ComfyUI marker (ModelOpt's FP8
  export; `fp8-unscaled`, a plain e4m3 cast without scales, fills no slot).
- `comfy-scaled-fp8`: ComfyUI's legacy "scaled fp8": e4m3 `weight`, scalar `scale_weight`, marker `scaled_fp8`
  (ComfyUI comfy/utils.py `convert_old_quants`).
- `comfy-mixed-fp8`: ComfyUI's mixed-precision checkpoint format (ComfyUI QUANTIZATION.md, comfy/utils.py
  `convert_old_quants`, comfy/ops.py): quantized linears listed in the header's `_quantization_metadata`
  (`{"format_version": "1.0", "layers": {<layer>: {"format": "float8_e4m3fn"}}}`) or marked by a `<layer>.comfy_quant`
  uint8 JSON tensor, with a scalar fp32 `weight_scale` (and optional `input_scale`). Comfy-Org's `*_fp8mixed` files,
  and BFL's own fp8 releases of FLUX.2, which ComfyUI loads as they are.
- `comfy-nvfp4`: the same markers with `{"format": "nvfp4"}` (comfy-kitchen `quantize_nvfp4(hi_first=True)`):
  packed E2M1 `weight` uint8 `[N, K/2]`, FIRST value of a pair in the HIGH nibble, E4M3 `weight_scale` in cuBLAS's
  128x4-tile layout, fp32 `weight_scale_2`, `input_scale` optional. Comfy-Org's and BFL's NVFP4 releases.
- `modelopt-nvfp4`: uint8 `weight` with `weight_scale` and `weight_scale_2` and no ComfyUI marker: ModelOpt's layout
  (first value in the LOW nibble, row-major block scales), diffusers' BFL `nvfp4` scheme.
- `gguf`: city96 / llama.cpp / sd.cpp GGUF whose quantized weights are all Q8_0 (`gguf-q8_0`); `gguf-<TYPES>` for
  any other: the quantized types of its 2-D weights by gguf-py's `GGMLQuantizationType` names, most common first
  (`gguf-Q4_0`, `gguf-Q4_K+Q6_K`, `gguf-IQ4_XS`, `gguf-NVFP4`, `gguf-BF16` when nothing is quantized), with
  `general.file_type` and the type histogram in `detail`; none of those fills a fluxgate slot. Its family follows the tensor names (city96 writes FLUX.2 as arch `flux`, Z-Image as
  `lumina2`).
- `diffusers-folder`: a diffusers model folder (`config.json` + one or more safetensors shards, an index json).

An fp8 file's layers that ComfyUI runs in full precision (`full_precision_matrix_mult` in their ComfyUI config, or
every layer of a legacy file whose `scaled_fp8` marker has two elements) are counted in `detail`: the same bytes as
their relatives, served through a bf16 GEMM there (`formats.full_precision_layers`).

Key prefixes (`model.diffusion_model.` of ComfyUI checkpoints and ModelSave files, `diffusion_model.`, `model.`) are
found and reported, never part of the answer about the model; a full ComfyUI checkpoint's other tensors (VAE, text
encoders) are left out of it, as ComfyUI-GGUF's tools/convert.py `strip_prefix` does.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxgate.errors import FixtureError
from fluxgate.weights.headers import (
    MAX_HEADER_BYTES,
    SAFETENSORS_SUFFIXES,
    missing,
    read_gguf,
    read_safetensors_header,
)
from fluxgate.weights.formats import (
    PREFIXES,
    COMFY_FORMATS,
    comfy_layer_configs,
    fp8_scales,
    layer_formats,
    full_precision_layers,
    legacy_full_precision,
    foreign_quantization,
    json_object,
    legacy_scaled_fp8,
)
from fluxgate.weights.members import Member, member_of, members

GGUF_Q8_0_COMPANIONS = {"F32", "F16", "BF16"}  # what stays high precision beside Q8_0 in a Q8_0 file
# What each slot of the models file takes, as the one-line refusal says it.
PRECISION_NEEDS = {
    "bf16": "bf16 weights (a safetensors file or a diffusers folder)",
    "fp8-scaled": "e4m3 weights with fp32 scales (fp8r, ComfyUI scaled or mixed fp8)",
    "gguf-q8_0": "a GGUF file whose quantized weights are all Q8_0",
    "nvfp4": "NVFP4 safetensors (ModelOpt or ComfyUI layout)",
}


@dataclass(frozen=True)
class Identity:
    """A checkpoint's identification. `family`: "flux1", "flux2", "z-image", "chroma" or None (unrecognised);
    `precision`: the fluxgate precision it can fill ("bf16", "fp8-scaled", "gguf-q8_0", "nvfp4") or None; `layout`:
    the on-disk layout (module docs); `prefix`: the key prefix its model's tensors carry ("" for none);
    `tensor_types`: tensor count per dtype or GGUF type (the model's tensors only); `detail`: a short human
    description; `member`: the family member (`members`: "flux1-dev", "flux1-schnell", "flux2-klein", ...), None
    when the contents leave several `candidates`; `evidence`: what told the member; `structure`: block counts and
    widths (`blocks.structure`); `full_precision_layers`: its fp8 layers ComfyUI runs in full precision (module
    docs)."""

    path: str
    family: str | None
    precision: str | None
    layout: str
    prefix: str = ""
    tensor_types: dict[str, int] = field(default_factory=dict)
    detail: str = ""
    member: str | None = None
    candidates: tuple[str, ...] = ()
    evidence: str = ""
    structure: dict = field(default_factory=dict)
    full_precision_layers: int = 0  # fp8 layers ComfyUI runs dequantized (`full_precision_matrix_mult`)

    def what(self) -> str:
        """The member, else the family and the members its contents cannot tell apart."""
        if self.member:
            return self.member
        if len(self.candidates) > 1:
            return f"{self.family} ({' or '.join(self.candidates)}: the contents cannot tell them apart)"
        return self.family or "unrecognised model"

    def describe(self) -> str:
        precision = self.precision or "no fluxgate precision"
        prefix = f", keys under '{self.prefix}'" if self.prefix else ""
        notes = "; ".join(n for n in (self.detail, self.evidence) if n)
        return f"{self.what()}, {precision} ({self.layout}{prefix}{'; ' + notes if notes else ''})"

    def to_json(self) -> dict:
        return asdict(self)




def family_of(keys: list[str]) -> str | None:
    """The model family from tensor names (original BFL/Tongyi keys or diffusers keys, any prefix). Chroma keeps
    FLUX.1's blocks but not its embedders: its `distilled_guidance_layer` makes it "chroma" (ComfyUI
    comfy/model_detection.py)."""
    text = "\n".join(keys)
    if "distilled_guidance_layer." in text:
        return "chroma"
    if "double_stream_modulation" in text:
        return "flux2"  # FLUX.2 shares one modulation per stream (BFL and diffusers keys alike)
    if "cap_embedder" in text or "noise_refiner" in text or "context_refiner" in text:
        return "z-image"
    if ("double_blocks." in text and "single_blocks." in text) or "single_transformer_blocks." in text:
        return "flux1"
    return None


def model_prefix(keys: list[str]) -> str:
    """The key prefix of the model's tensors: the first of PREFIXES under which the names are a flux1, flux2 or
    z-image model (a full ComfyUI checkpoint also holds a VAE and text encoders under other prefixes), else the first
    that every key carries, else ""."""
    for prefix in PREFIXES:
        under = [key[len(prefix):] for key in keys if key.startswith(prefix)]
        if under and family_of(under):
            return prefix
    return next((p for p in PREFIXES if keys and all(key.startswith(p) for key in keys)), "")


def identify(path: Path) -> Identity:
    """Identify the checkpoint at `path` (a .safetensors / .sft or .gguf file, or a diffusers folder).

    Raises FixtureError, one line naming the path, for a missing path (a dangling link named with its target), an
    index json or a single shard of a sharded folder (give the folder), and an unreadable, truncated, damaged or
    unknown file."""
    path = Path(path)
    if not path.exists():
        raise FixtureError(f"{path}: {missing(path)}")
    if path.name.endswith(".index.json"):
        raise FixtureError(f"{path}: the index of a sharded diffusers folder; give the folder {path.parent} instead")
    if path.suffix == ".safetensors" and "-of-" in path.stem and any(path.parent.glob("*.safetensors.index.json")):
        raise FixtureError(f"{path}: one shard of a sharded diffusers folder; give the folder {path.parent} instead")
    readers = {".gguf": _gguf, **{suffix: _safetensors for suffix in SAFETENSORS_SUFFIXES}}
    reader = _folder if path.is_dir() else readers.get(path.suffix)
    if reader is None:
        raise FixtureError(f"{path}: not a checkpoint fluxgate reads (.safetensors, .sft, .gguf or a diffusers "
                           "folder)")
    try:
        return reader(path)
    except FixtureError:
        raise
    except Exception as error:  # noqa: BLE001 - header parsers fail in many ways on a damaged file
        raise FixtureError(f"{path}: cannot identify it ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]})") from None


def _safetensors(path: Path) -> Identity:
    header, metadata = read_safetensors_header(path)
    prefix = model_prefix(list(header))
    model = {key[len(prefix):]: entry for key, entry in header.items() if key.startswith(prefix)}
    keys = list(model)
    dtypes = Counter(str(entry.get("dtype")) for entry in model.values())
    ignored = len(header) - len(model)
    family = family_of(keys)
    config = json_object(metadata.get("config"))  # nunchaku's merge_safetensors.py stores the diffusers config
    found = member_of(family, {key: tuple(entry["shape"]) for key, entry in model.items()}, metadata,
                      config.get("guidance_embeds"))

    def identity(precision, layout, detail=""):
        left_out = f"{ignored} tensors outside '{prefix}' (VAE, text encoders) left out" if ignored else ""
        # every fp8-scaled answer comes after `configs` is read below
        full = full_precision_layers(configs, header, metadata, prefix) if precision == "fp8-scaled" else set()
        why = "two-element scaled_fp8" if legacy_full_precision(header, metadata, prefix) else \
            "full_precision_matrix_mult"
        dequantized = f"{len(full)} layers full precision ({why}): ComfyUI runs them dequantized, a bf16 GEMM" \
            if full else ""
        notes = "; ".join(note for note in (detail, dequantized, left_out) if note)
        return _with_member(Identity(str(path), family, precision, layout, prefix, dict(dtypes), notes,
                                     full_precision_layers=len(full)), found)

    foreign = foreign_quantization(model, metadata)
    if foreign:
        return identity(None, *foreign)
    configs, marked_by = comfy_layer_configs(path, header, metadata, prefix)
    layers = layer_formats(configs)
    if layers:
        formats = Counter(layers.values())
        if len(formats) == 1 and next(iter(formats)) in COMFY_FORMATS:
            return identity(*COMFY_FORMATS[next(iter(formats))],
                            f"{len(layers)} layers marked {next(iter(formats))} in {marked_by}")
        return identity(None, "comfy-mixed", "layers: " + ", ".join(f"{n}x {f}" for f, n in formats.most_common()))
    weights = {key: entry for key, entry in model.items()
               if key.endswith(".weight") and len(entry.get("shape", ())) == 2}
    if "scaled_fp8" in keys or any(key.endswith(".scale_weight") for key in keys):
        return identity(*legacy_scaled_fp8(model, weights))
    weight_dtypes = Counter(str(entry["dtype"]) for entry in weights.values())
    if weight_dtypes.get("U8") and any(key.endswith(".weight_scale_2") for key in keys):
        return identity("nvfp4", "modelopt-nvfp4", f"{weight_dtypes['U8']} packed E2M1 weights")
    if weight_dtypes.get("F8_E4M3"):
        return identity(*fp8_scales(model, [key for key, entry in weights.items() if entry["dtype"] == "F8_E4M3"]))
    if weight_dtypes.get("F8_E5M2"):
        return identity(None, "fp8-e5m2", f"{weight_dtypes['F8_E5M2']} e5m2 weights (a plain cast, Kijai's "
                        "flux-fp8 e5m2 files); fluxgate's fp8 slot runs e4m3 with scales")
    plain = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
    if weight_dtypes and set(weight_dtypes) <= set(plain):
        dominant = weight_dtypes.most_common(1)[0][0]
        return identity("bf16" if dominant == "BF16" else None, plain[dominant])
    return identity(None, "unknown", "weights: " + ", ".join(f"{n}x {d}" for d, n in weight_dtypes.items()))


def _with_member(identity: Identity, found: Member) -> Identity:
    from dataclasses import replace

    return replace(identity, member=found.name, candidates=found.candidates, evidence=found.evidence,
                   structure=found.structure)


def _gguf(path: Path) -> Identity:
    import gguf

    index = read_gguf(path)  # bounded: a hostile header is one line before gguf-py sees it
    arch, file_type = index.fields.get("general.architecture"), index.fields.get("general.file_type")
    prefix = model_prefix([tensor.name for tensor in index.tensors])
    tensors = [tensor for tensor in index.tensors if tensor.name.startswith(prefix)]
    types = Counter(tensor.type_name for tensor in tensors)
    weight_types = Counter(tensor.type_name for tensor in tensors
                           if len(tensor.shape) >= 2 and tensor.name.endswith(".weight"))
    quantized = Counter({t: n for t, n in weight_types.items() if t not in GGUF_Q8_0_COMPANIONS})
    if set(quantized) == {"Q8_0"}:
        precision, layout = "gguf-q8_0", "gguf"
    else:  # by type name, most common first: "gguf-Q4_K+Q6_K" (a Q4_K_M file), "gguf-BF16" (unquantized)
        precision, layout = None, "gguf-" + ("+".join(t for t, _ in (quantized or weight_types).most_common()) or "empty")
    names = {t.value: t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType}
    kind = f", file type {names.get(file_type, file_type)}" if file_type is not None else ""
    detail = f"arch {arch or 'none (sd.cpp)'}{kind}, " + ", ".join(f"{n}x {t}" for t, n in types.most_common())
    family = family_of([t.name for t in tensors])
    shapes = {t.name[len(prefix):]: t.shape for t in tensors}
    return _with_member(Identity(str(path), family, precision, layout, prefix, dict(types), detail),
                        member_of(family, shapes))


def model_shards(path: Path) -> list[Path]:
    """The weight files of a diffusers model folder (`save_pretrained`): those its `*.safetensors.index.json`
    names, else `diffusion_pytorch_model.safetensors`; [] for any other folder (a folder of single-file
    checkpoints beside a config.json is none). Raises FixtureError for an index that cannot be read or names a
    shard that is not there."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        single = path / "diffusion_pytorch_model.safetensors"
        return [single] if single.is_file() else []
    index = indexes[0]
    if index.stat().st_size > MAX_HEADER_BYTES:
        raise FixtureError(f"{index}: an index of {index.stat().st_size} bytes; fluxgate reads at most "
                           f"{MAX_HEADER_BYTES}")
    weight_map = json_object(index.read_text(errors="replace")).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FixtureError(f"{index}: not a diffusers index (no weight_map)")
    shards = [path / name for name in sorted(set(map(str, weight_map.values())))]
    absent = [shard.name for shard in shards if not shard.is_file() or shard.parent != path]
    if absent:
        raise FixtureError(f"{index}: names shard {absent[0]}, which is not in {path} ({len(absent)} missing)")
    return shards


def is_model_folder(path: Path) -> bool:
    """A diffusers model folder: a diffusers `config.json` beside the weight files `model_shards` finds."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return "_class_name" in json_object((path / "config.json").read_text()) and bool(model_shards(path))
    except (OSError, FixtureError):
        return True  # a model folder whose index is damaged: identify says why


def _folder(path: Path) -> Identity:
    if not is_model_folder(path):
        raise FixtureError(f"{path}: a folder, but not a diffusers model folder (needs a diffusers config.json and "
                           "diffusion_pytorch_model*.safetensors); give a checkpoint file or a transformer/ folder")
    shards = model_shards(path)
    headers = [read_safetensors_header(shard)[0] for shard in shards]
    keys = [key for header in headers for key in header]
    dtypes = Counter(str(entry.get("dtype")) for header in headers for entry in header.values())
    weight_dtypes = Counter(str(entry.get("dtype")) for header in headers for key, entry in header.items()
                            if key.endswith(".weight") and len(entry.get("shape", ())) == 2)
    dominant = weight_dtypes.most_common(1)[0][0] if weight_dtypes else "?"
    config = json_object((path / "config.json").read_text())
    pipeline = path.parent / "model_index.json"
    pipeline_class = json_object(pipeline.read_text()).get("_class_name") if pipeline.is_file() else None
    family = family_of(keys)
    shapes = {key: tuple(entry["shape"]) for header in headers for key, entry in header.items()}
    found = member_of(family, shapes, None, config.get("guidance_embeds"), pipeline_class)
    return _with_member(Identity(str(path), family, "bf16" if dominant == "BF16" else None, "diffusers-folder",
                                 model_prefix(keys), dict(dtypes), f"{len(shards)} shard(s), weights {dominant}"),
                        found)


def check_slot(identity: Identity, model: str, precision: str) -> None:
    """Refuse a checkpoint that is not what its slot in the models file says (`model`, `precision`): FixtureError,
    one line naming the file, what it is and what the slot needs. Nothing is measured under a wrong label. A file
    whose contents cannot tell `model` from a relative (`Identity.candidates`) is taken on the models file's word."""
    facts = members().get(model)
    wanted = facts.family if facts else None
    problems = []
    if identity.precision != precision:
        problems.append(f"the {precision} slot needs {PRECISION_NEEDS.get(precision, precision)}")
    if identity.family is not None and wanted is not None and identity.family != wanted:
        problems.append(f"the {model} slot needs a {wanted} model")
    elif identity.member and identity.member != model and wanted is not None:
        problems.append(f"it is {identity.member} ({identity.evidence or 'its contents'}), not {model}")
    elif not identity.member and identity.candidates and model not in identity.candidates:
        problems.append(f"it is one of {', '.join(identity.candidates)}, not {model}")
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
