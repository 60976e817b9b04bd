"""Point fluxgate at a folder: every checkpoint in it identified, and a models file the `real` profile runs as is.

    python -m fluxgate.weights.scan DIR [--out models.toml]

DIR may be a ComfyUI `models/` tree, a folder of downloads or a Hugging Face cache. Files are identified from their
contents (`fluxgate.weights.identify`), never from their names, except that FLUX.1-dev and FLUX.1-Kontext-dev share one
architecture: a FLUX.1 file whose path says "kontext" (its name, or a folder such as an HF cache's
`models--black-forest-labs--FLUX.1-Kontext-dev`) goes to flux1-kontext-dev. Pipeline folders (a
`model_index.json`) found in DIR are used for their model; else the Hub id fluxgate's own models file names.
For each slot the first file found wins; the others are listed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fluxgate.errors import FixtureError
from fluxgate.weights.identify import Identity, identify, is_model_folder

DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[3] / "fixtures" / "models.toml"
PIPELINE_CLASSES = {"FluxPipeline": "flux1-dev", "FluxKontextPipeline": "flux1-kontext-dev",
                    "Flux2Pipeline": "flux2-dev", "ZImagePipeline": "z-image-turbo"}
FAMILY_MODEL = {"flux2": "flux2-dev", "z-image": "z-image-turbo"}


def model_of(identity: Identity) -> str | None:
    """The fluxgate model a checkpoint fills (module docs), None for an unrecognised family."""
    if identity.family == "flux1":
        return "flux1-kontext-dev" if "kontext" in str(identity.path).lower() else "flux1-dev"
    return FAMILY_MODEL.get(identity.family or "")


def candidates(root: Path) -> list[Path]:
    """Checkpoint files and diffusers model folders under `root`, sorted; shards and index files of a folder are
    represented by the folder, and of a pipeline folder only its transformer/ is one."""
    found = []
    for path in sorted(root.rglob("*")):
        if is_model_folder(path):
            if path.name == "transformer" or not (path.parent / "model_index.json").is_file():
                found.append(path)  # a pipeline's text encoders and VAE are no checkpoints of the matrix
        elif path.is_file() and path.suffix in (".safetensors", ".gguf") and not (path.parent / "config.json").is_file():
            found.append(path)
    return found


def pipelines(root: Path) -> dict[str, Path]:
    """model -> the first diffusers pipeline folder under `root` whose model_index.json names its pipeline class."""
    found: dict[str, Path] = {}
    for index in sorted(root.rglob("model_index.json")):
        try:
            model = PIPELINE_CLASSES.get(json.loads(index.read_text()).get("_class_name", ""))
        except (OSError, ValueError):
            continue
        if model:
            found.setdefault(model, index.parent)
    return found


def scan(root: Path) -> tuple[list[tuple[Path, Identity | str]], dict[str, dict[str, Path]]]:
    """Every candidate with its identity (or the one-line reason it could not be read), and the slots filled:
    {model: {precision: path}}."""
    listed: list[tuple[Path, Identity | str]] = []
    slots: dict[str, dict[str, Path]] = {}
    for path in candidates(root):
        try:
            identity = identify(path)
        except FixtureError as error:
            listed.append((path, str(error)))
            continue
        listed.append((path, identity))
        model = model_of(identity)
        if model and identity.precision:
            slots.setdefault(model, {}).setdefault(identity.precision, path)
    return listed, slots


def models_toml(slots: dict[str, dict[str, Path]], found_pipelines: dict[str, Path],
                defaults: Path = DEFAULT_MODELS_FILE) -> str:
    """The models file text for the filled slots (pipeline: a found folder, else the default file's Hub id)."""
    default = tomllib.loads(defaults.read_text()) if defaults.is_file() else {}
    lines = ["# Written by `python -m fluxgate.weights.scan`: every checkpoint identified from its contents.", ""]
    for model, precisions in sorted(slots.items()):
        pipeline = found_pipelines.get(model) or default.get(model, {}).get("pipeline", "")
        lines += [f'["{model}"]', f"pipeline = {json.dumps(str(pipeline))}", f'["{model}".checkpoints]']
        lines += [f"{precision} = {{ path = {json.dumps(str(path))} }}" for precision, path in sorted(precisions.items())]
        lines.append("")
    return "\n".join(lines)
