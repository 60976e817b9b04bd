"""The tiny profile: fixture checkpoints made once from seeded random weights, cached by content hash, and its source
(`TinySource`), which loads them through the model's loader (`ModelBuilder.load_transformer`) beside toy-size text
encoders and VAE.

Cache layout (`--fixture-cache`, default `.fluxgate-cache/`, git-ignored):
    <cache>/<model>/<key>/config.json                   transformer config (the loader's `config` folder)
    <cache>/<model>/<key>/transformer-<precision><ext>  the checkpoint in that precision's real format
    <cache>/<model>/<key>/transformer-<precision>.json  provenance: sha256, size, seed, versions, source sha256
`key` hashes everything the bytes depend on (config, seed, format version), so a changed config never reuses a
stale file. Files are written to a temporary name and renamed, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fluxgate.errors import FixtureError
from fluxgate.files import atomic_write
from fluxgate.matrix import Combo
from fluxgate.models import ModelSpec
from fluxgate.precisions import DTYPE, PRECISIONS, PrecisionSpec
from fluxgate.weights.loading import load_transformer, loader_name

FORMAT_VERSION = 1  # bump when a writer's output changes for the same inputs


@dataclass(frozen=True)
class Checkpoint:
    """A transformer checkpoint file ready for the loader."""

    path: Path
    config_dir: Path
    sha256: str
    reused: bool  # True when the cache already held it


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex. Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checkpoint(path: Path, write) -> None:
    """`atomic_write` of a checkpoint; a tensor the writer refuses (NaN, out of the format's range) is a FixtureError
    naming the file as well as the tensor."""
    try:
        atomic_write(path, write)
    except FixtureError as error:
        raise FixtureError(f"{path}: cannot write this checkpoint ({error})") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def fixture_dir(model: ModelSpec, seed: int, cache_dir: Path) -> Path:
    """The cache folder of `model`'s fixtures from `seed`: its name hashes what their bytes depend on."""
    config = model.builder.tiny_transformer_config
    identity = json.dumps({"config": config, "seed": seed, "format": FORMAT_VERSION, "modulation": model.tiny_modulation,
                           "class": model.builder.transformer_class.__name__}, sort_keys=True, default=str)
    return cache_dir / model.name / hashlib.sha256(identity.encode()).hexdigest()[:16]


def _meta_transformer(model: ModelSpec) -> torch.nn.Module:
    """The tiny transformer's module tree without memory: for its config and layer shapes."""
    return model.meta_transformer(model.builder.tiny_transformer_config)


def quantized_keys(model: ModelSpec, state_dict: dict[str, torch.Tensor], block_size: int) -> set[str]:
    """`ModelSpec.quantized_linear_keys` of the tiny transformer at `block_size`, among the keys of `state_dict`."""
    return model.quantized_linear_keys(_meta_transformer(model), block_size) & state_dict.keys()


def _cached(path: Path) -> str | None:
    """The file's sha256 if the cache holds an intact copy; warns and returns None for a corrupt one."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        expected = json.loads(meta_path.read_text())["sha256"]
    except (ValueError, KeyError):
        expected = None
    actual = sha256_file(path)
    if actual != expected:
        warnings.warn(f"{path}: cached checkpoint is corrupt (sha256 {actual[:12]}, provenance says "
                      f"{str(expected)[:12]}); rebuilding it", stacklevel=2)
        return None
    return actual


def _provenance(path: Path, seed: int, source_sha: str | None) -> dict:
    import diffusers
    import gguf

    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size, "seed": seed,
            "made_from_bf16_sha256": source_sha, "format_version": FORMAT_VERSION, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "gguf": getattr(gguf, "__version__", "unknown")}


def _ensure_source(model: ModelSpec, seed: int, folder: Path) -> tuple[Path, str, bool]:
    """The bf16 transformer made from seeded random weights (also the `bf16` precision's checkpoint)."""
    path = folder / "transformer-bf16.safetensors"
    sha = _cached(path)
    if sha is not None:
        return path, sha, True
    transformer = model.tiny_transformer(seed)
    transformer.save_config(folder)
    state_dict = {key: value.detach() for key, value in transformer.state_dict().items()}
    _write_checkpoint(path, lambda tmp: PRECISIONS["bf16"].write(state_dict, set(), tmp, model.gguf_arch))
    provenance = _provenance(path, seed, None)
    _write_json(path.with_suffix(".json"), provenance)
    return path, provenance["sha256"], False


def ensure(model: ModelSpec, precision: PrecisionSpec, seed: int, cache_dir: Path) -> Checkpoint:
    """The checkpoint of `model` in `precision`, made (once) from the seeded bf16 weights, or reused from the cache
    when intact (a corrupt cached file is rebuilt, with a warning). Raises FixtureError naming the file when the
    precision's writer refuses a tensor."""
    folder = fixture_dir(model, seed, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    source, source_sha, source_reused = _ensure_source(model, seed, folder)
    if not (folder / "config.json").is_file():
        _meta_transformer(model).save_config(folder)
    if precision.name == "bf16":
        return Checkpoint(source, folder, source_sha, source_reused)

    path = folder / f"transformer-{precision.file_name or precision.name}{precision.suffix}"
    sha = _cached(path)
    if sha is not None:
        return Checkpoint(path, folder, sha, True)
    state_dict = load_file(str(source))
    keys = quantized_keys(model, state_dict, precision.block_size)
    _write_checkpoint(path, lambda tmp: precision.write(state_dict, keys, tmp, model.gguf_arch))
    provenance = _provenance(path, seed, source_sha)
    provenance["quantized_tensors"] = len(keys)
    _write_json(path.with_suffix(".json"), provenance)
    return Checkpoint(path, folder, provenance["sha256"], False)


class TinySource:
    """The tiny profile's `sources.Source`: toy-size real architectures, every precision a real file in the fixture
    cache (`ensure`), float32-initialized components cast to bf16."""

    def __init__(self, cache_dir: Path, seed: int):
        self.cache_dir, self.seed = cache_dir, seed

    def transformer(self, combo: Combo, device: torch.device) -> tuple[torch.nn.Module, dict]:
        model, precision = combo.model_spec, combo.precision_spec
        checkpoint = ensure(model, precision, self.seed, self.cache_dir)
        transformer = load_transformer(precision, model.builder, checkpoint.path, checkpoint.config_dir, device)
        return transformer, {"path": f"tiny checkpoint file -> {loader_name(model.builder)}",
                             "file": str(checkpoint.path), "sha256": checkpoint.sha256, "reused": checkpoint.reused}

    def components(self, model: ModelSpec, device: torch.device) -> dict[str, Any]:
        # Deployed pipelines run every component in bf16 (`torch_dtype=torch.bfloat16`); the pipelines do not cast
        # between components, so a float32 text encoder beside a bf16 transformer fails.
        components = model.builder.tiny_components(self.seed)
        for component in components.values():
            if isinstance(component, torch.nn.Module):
                component.to(device, DTYPE)
        return components

    def prompt_kwargs(self, model: ModelSpec, prompt: str, device: torch.device) -> dict:
        return {"prompt": prompt}
