"""Point fluxgate at a folder: every checkpoint in it identified, and a models file the `real` profile runs as is.

    fluxgate scan DIR [--out models.toml]

DIR may be a ComfyUI `models/` tree, a folder of downloads or a Hugging Face cache. Files are identified from their
contents (`fluxgate.weights.identify`), down to the family member (`fluxgate.weights.members`): a relative of a
fluxgate model (FLUX.1-schnell, FLUX.2 [klein], Chroma, a FLUX.1 Fill/Depth/Canny) fills no slot. Where the contents
cannot tell two members apart (FLUX.1-dev and FLUX.1-Kontext-dev; Z-Image-Turbo and Z-Image), the tie is broken only
by the published name in the file's own name or its Hugging Face cache repository id, never another parent folder's
(`members.tie_break`), else the file is listed and left for the user to name.
Pipeline folders (a `model_index.json`) found in DIR are used for the model their transformer is; else the Hub id
fluxgate's own models file names. A file's blocks are compared with the transformer config of that pipeline (else,
when it is not downloaded, fluxgate's default config of the model) as the loader compares them (`blocks.refusal`): a
block-pruned variant or other relative fills no slot. For each slot a file told by its contents wins over one placed
by its name, then the first found; damaged and refused files are listed with the reason and never fill a slot.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fluxgate.errors import FixtureError
from fluxgate.models import MODELS
from fluxgate.weights import blocks
from fluxgate.weights.headers import SAFETENSORS_SUFFIXES
from fluxgate.weights.identify import Identity, identify, is_model_folder, model_shards
from fluxgate.weights.members import members, tie_break

DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[3] / "fixtures" / "models.toml"
COMMAND = "fluxgate scan"


@dataclass(frozen=True)
class Placement:
    """Where scan puts a file: `model` (None: no slot) and why, in words (`how`: how the model was told, or why
    none; `by_path`: True when only the path's published name broke a tie)."""

    model: str | None
    how: str
    by_path: bool = False


def place(identity: Identity) -> Placement:
    """The fluxgate model a checkpoint fills, from its member (module docs)."""
    if identity.member in members():
        return Placement(identity.member, "")
    if identity.member:
        return Placement(None, f"{identity.member} is a relative fluxgate has no slot for")
    if len(identity.candidates) > 1:
        chosen = tie_break(identity.candidates, identity.path)
        if chosen in members():
            return Placement(chosen, f"the contents fit {' and '.join(identity.candidates)}; its name says {chosen}",
                             by_path=True)
        return Placement(None, f"the contents cannot tell {' from '.join(identity.candidates)}; name it under the "
                               "model it is in the models file")
    return Placement(None, "no fluxgate model")


def model_of(identity: Identity) -> str | None:
    """The fluxgate model a checkpoint fills (`place`), None when it fills none."""
    return place(identity).model


def candidates(root: Path) -> list[Path]:
    """Checkpoint files (.safetensors, .sft, .gguf; dangling links too, so they are named) and diffusers model
    folders under `root`, sorted; the weight files of a model folder are represented by the folder, and of a pipeline
    folder only its transformer/ is one. A config.json beside single-file checkpoints makes no model folder."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            if is_model_folder(path) and (path.name == "transformer"
                                          or not (path.parent / "model_index.json").is_file()):
                found.append(path)  # a pipeline's text encoders and VAE are no checkpoints of the matrix
        elif path.suffix in (*SAFETENSORS_SUFFIXES, ".gguf") and not _folder_weight(path):
            found.append(path)
    return found


def _folder_weight(path: Path) -> bool:
    if not is_model_folder(path.parent):
        return False
    try:
        return path in model_shards(path.parent)
    except FixtureError:
        return True


def pipelines(root: Path) -> dict[str, Path]:
    """model -> the first diffusers pipeline folder under `root` whose transformer is that model (identified like any
    checkpoint: a FLUX.1-schnell pipeline is no FLUX.1-dev pipeline)."""
    found: dict[str, Path] = {}
    for index in sorted(root.rglob("model_index.json")):
        try:
            model = model_of(identify(index.parent / "transformer"))
        except FixtureError:
            continue
        if model:
            found.setdefault(model, index.parent)
    return found


def named_pipelines(found_pipelines: dict[str, Path], defaults: Path = DEFAULT_MODELS_FILE) -> dict[str, str]:
    """model -> the pipeline the models file names for it: one found under the scanned root, else the default models
    file's (a Hub id)."""
    default = tomllib.loads(defaults.read_text()) if defaults.is_file() else {}
    named = {model: str(entry.get("pipeline", "")) for model, entry in default.items() if isinstance(entry, dict)}
    return {**named, **{model: str(folder) for model, folder in found_pipelines.items()}}


def paired_config(model: str, pipelines_named: dict[str, str]) -> tuple[dict, str]:
    """The transformer config a file of `model` is run with and compared against, and whose it is in words: its
    pipeline's transformer/config.json (a local folder or the Hugging Face cache), else, when that is not here,
    fluxgate's default config of the model (the released transformer/config.json, `ModelBuilder`)."""
    pipeline = pipelines_named.get(model, "")
    config = blocks.transformer_config(pipeline) if pipeline else {}
    if config:
        return config, f"the {model} config of {pipeline}"
    return MODELS[model].builder.full_transformer_config, f"fluxgate's default {model} config"


def scan(root: Path, defaults: Path = DEFAULT_MODELS_FILE) -> tuple[list[tuple[Path, Identity | str]],
                                                                    dict[str, dict[str, Path]]]:
    """Every candidate with its identity (or the one-line reason it was skipped: unreadable, or blocks that differ
    from its model's config, `paired_config`), and the slots filled: {model: {precision: path}}, a file told by its
    contents before one placed by its name. `defaults`: the models file naming each model's pipeline."""
    pipelines_named = named_pipelines(pipelines(root), defaults)
    configs: dict[str, tuple[dict, str]] = {}
    listed: list[tuple[Path, Identity | str]] = []
    ranked: dict[tuple[str, str], tuple[bool, int, Path]] = {}
    for order, path in enumerate(candidates(root)):
        try:
            identity = identify(path)
        except FixtureError as error:
            listed.append((path, str(error)))
            continue
        placement = place(identity)
        if placement.model and identity.precision:  # a format with no slot is listed as what it is
            configs.setdefault(placement.model, paired_config(placement.model, pipelines_named))
            problem = blocks.refusal(identity, *configs[placement.model])
            if problem:
                listed.append((path, problem))
                continue
        listed.append((path, identity))
        if placement.model and identity.precision:
            slot = (placement.model, identity.precision)
            ranked[slot] = min(ranked.get(slot, (True, order, path)), (placement.by_path, order, path))
    slots: dict[str, dict[str, Path]] = {}
    for (model, precision), (_, _, path) in sorted(ranked.items()):
        slots.setdefault(model, {})[precision] = path
    return listed, slots


def models_toml(slots: dict[str, dict[str, Path]], found_pipelines: dict[str, Path],
                defaults: Path = DEFAULT_MODELS_FILE) -> str:
    """The models file text for the filled slots (pipeline: a found folder, else the default file's Hub id)."""
    pipelines_named = named_pipelines(found_pipelines, defaults)
    lines = [f"# Written by `{COMMAND}`: every checkpoint identified from its contents.", ""]
    for model, precisions in sorted(slots.items()):
        pipeline = pipelines_named.get(model, "")
        lines += [f'["{model}"]', f"pipeline = {json.dumps(str(pipeline))}", f'["{model}".checkpoints]']
        lines += [f"{precision} = {{ path = {json.dumps(str(path))} }}" for precision, path in sorted(precisions.items())]
        lines.append("")
    return "\n".join(lines)
