"""The real profile's source: the user's checkpoints and pipeline folders, named in fixtures/models.toml.

A checkpoint is identified from its contents (`identify`), refused when it is not what its slot says, adapted from its
layout (`layouts`) and loaded through diffusers (`loading`); a missing file or pipeline skips its combo and says how to
get it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import torch

from fluxgate.errors import FixtureError, SkipCombo
from fluxgate.matrix import Combo
from fluxgate.models import ModelSpec
from fluxgate.precisions import DTYPE
from fluxgate.precisions.spec import first_nonfinite
from fluxgate.weights import blocks, identify, layouts
from fluxgate.weights.headers import missing
from fluxgate.weights.loading import load_transformer


class RealSource:
    """The user's checkpoints (fixtures/models.toml); a missing file skips its combo and says how to get it."""

    def __init__(self, models_file: Path):
        self.models_file = models_file
        try:
            self.table = tomllib.loads(models_file.read_text())
        except FileNotFoundError:
            raise FixtureError(f"{models_file}: not found; the real profile needs it") from None
        except tomllib.TOMLDecodeError as error:
            raise FixtureError(f"{models_file}: malformed TOML ({error})") from None

    def _entry(self, model: ModelSpec) -> dict:
        entry = self.table.get(model.name)
        if entry is None:  # a models file may name only the models you have (what `fluxgate.weights.scan` writes)
            raise SkipCombo(f"{model.name}: not in {self.models_file}; add a [{model.name}] table to run it")
        if not isinstance(entry, dict) or "pipeline" not in entry:
            raise FixtureError(f"{self.models_file}: [{model.name}] needs `pipeline = <local folder or Hub id>`")
        return entry

    def transformer(self, combo: Combo, device: torch.device) -> tuple[torch.nn.Module, dict]:
        """The combo's transformer from the user's file: identified from its contents (`identify`), refused when it
        is not what its slot says, adapted from its layout (`layouts`), loaded through diffusers."""
        entry = self._entry(combo.model_spec)
        checkpoint = entry.get("checkpoints", {}).get(combo.precision)
        if not isinstance(checkpoint, dict) or "path" not in checkpoint:
            raise SkipCombo(f"{combo.id}: no checkpoint named in {self.models_file} "
                            f"[{combo.model}.checkpoints] {combo.precision} = {{ path = ... }}")
        raw = checkpoint["path"].replace("$FLUXGATE_MODELS", os.environ.get("FLUXGATE_MODELS", "~/models"))
        path = Path(os.path.expanduser(os.path.expandvars(raw)))
        if path.is_symlink() and not path.exists():
            raise FixtureError(f"{path}: {missing(path)}; mount it or fix the link named in {self.models_file}")
        if not path.exists():
            how = checkpoint.get("source", "see fixtures/models.toml")
            raise SkipCombo(f"{combo.id}: real checkpoint {path} not found; get it from {how} and set its path in "
                            f"{self.models_file}")
        found = identify.identify(path)  # FixtureError for an index json, one shard, an unreadable or damaged file
        identify.check_slot(found, combo.model, combo.precision)  # nothing is measured under a label it does not carry
        model, precision = combo.model_spec, combo.precision_spec
        self._check_structure(found, model)
        if found.layout == "diffusers-folder":
            transformer, how_loaded = _from_folder(model.builder.transformer_class, path, device), "diffusers folder"
        else:
            loadable, how_loaded = layouts.adapt(found, path)
            transformer = load_transformer(precision, model.builder, loadable,
                                           self._pipeline(model), device, config_subfolder="transformer",
                                           name=str(path))
        bad = first_nonfinite([*transformer.named_parameters(), *transformer.named_buffers()]) or nonfinite_gguf(
            transformer)
        if bad:
            raise FixtureError(f"{path}: {bad[0]} holds {bad[1]} NaN/Inf values (of {bad[2]})")
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
        return transformer, {"path": how_loaded, "file": str(path), "size_bytes": size,
                             "identity": found.to_json(), "sha256": identify.sha256(path)}

    def _check_structure(self, found: identify.Identity, model: ModelSpec) -> None:
        """Refuse a file whose blocks or guidance embedder differ from the slot's model config (the pipeline's
        transformer/config.json): a relative or a block-pruned variant of the model, one line saying what differs
        (`blocks.refusal`). Nothing to compare when the pipeline is not here yet (its combo is skipped later, saying
        so)."""
        try:
            pipeline = self._pipeline(model)
        except SkipCombo:
            return
        problem = blocks.refusal(found, blocks.transformer_config(pipeline), f"the {model.name} config of {pipeline}")
        if problem:
            raise FixtureError(problem)

    def _pipeline(self, model: ModelSpec) -> str:
        """The model's pipeline folder or cached Hub id; SkipCombo, saying how to get it, when it is not here."""
        pipeline = self._entry(model)["pipeline"]
        if not _pipeline_available(pipeline):
            raise SkipCombo(f"{model.name}: pipeline {pipeline} is neither a local folder nor in the Hugging Face "
                            f"cache; download it once (`hf download {pipeline}`) or point [{model.name}] pipeline "
                            f"in {self.models_file} at a local folder")
        return pipeline

    def components(self, model: ModelSpec, device: torch.device) -> dict[str, Any]:
        pipeline = self._pipeline(model)
        try:
            pipe = model.builder.pipeline_class.from_pretrained(pipeline, transformer=None, torch_dtype=DTYPE)
        except Exception as error:  # noqa: BLE001 - any loader failure is reported with the folder it concerns
            raise FixtureError(f"{pipeline}: cannot load the {model.name} pipeline components "
                               f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
        return {name: (c.to(device) if isinstance(c, torch.nn.Module) else c)
                for name, c in pipe.components.items() if name != "transformer"}

    def prompt_kwargs(self, model: ModelSpec, prompt: str, device: torch.device) -> dict:
        return {"prompt": prompt}


def _from_folder(transformer_class: type, folder: Path, device: torch.device) -> torch.nn.Module:
    """A diffusers model folder (sharded or not) through `from_pretrained`; FixtureError naming it on failure."""
    try:
        return transformer_class.from_pretrained(str(folder), torch_dtype=DTYPE, local_files_only=True).to(device)
    except Exception as error:  # noqa: BLE001 - the loader raises many types; the user needs the folder and reason
        raise FixtureError(f"{folder}: cannot load the diffusers folder ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]})") from None


def nonfinite_gguf(module: torch.nn.Module) -> tuple[str, int, int] | None:
    """The first GGUF-quantized parameter whose dequantized values hold NaN or Inf: (name, how many, of how many),
    else None. A NaN weight makes a Q8_0 block's fp16 scale NaN (gguf-py quants.py: d = max|x| / 127), which
    `first_nonfinite`, reading floats only, cannot see in the packed bytes."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    for name, parameter in module.named_parameters():
        if isinstance(parameter, GGUFParameter):
            values = dequantize_gguf_tensor(parameter.detach())
            count = int((~torch.isfinite(values)).sum())
            if count:
                return name, count, values.numel()
    return None


def _pipeline_available(pipeline: str) -> bool:
    """A local diffusers folder, or a Hub id whose model_index.json is in the local cache (nothing is fetched)."""
    if Path(pipeline).expanduser().is_dir():
        return (Path(pipeline).expanduser() / "model_index.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(pipeline, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False
