"""A transformer checkpoint's block structure, read from its tensor names and shapes and from a diffusers
`transformer/config.json`, and the one comparison the loader (`real`) and scan (`scan`) both make: a file whose
blocks or guidance embedder differ from the config it would run with is a relative or a block-pruned variant, refused
in one line naming both.

Facts and their sources:
- FLUX.1 / FLUX.2 (diffusers FluxTransformer2DModel / Flux2Transformer2DModel config `num_layers`,
  `num_single_layers`, `guidance_embeds`): double blocks `double_blocks.N.` (BFL) / `transformer_blocks.N.`
  (diffusers), single blocks `single_blocks.N.` / `single_transformer_blocks.N.`; a guidance embedder `guidance_in.`
  / `guidance_embedder.` beside the timestep embedder `time_in.` / `timestep_embedder.`; the image input `img_in` /
  `x_embedder` and output `final_layer.linear` / `proj_out` widths (told apart by `members`).
- Z-Image (diffusers models/transformers/transformer_z_image.py `ZImageTransformer2DModel`: `layers` holds
  `n_layers` blocks, `noise_refiner` and `context_refiner` `n_refiner_layers` each; Tongyi's keys name them the same,
  diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` keeps the names): `layers.N.`, `noise_refiner.N.`,
  `context_refiner.N.`.

A count is the number of distinct block indices the file holds, so a pruned file that kept its numbering counts the
blocks it has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_FLUX_BLOCKS = {"double_blocks": re.compile(r"(?:^|\.)(?:double_blocks|transformer_blocks)\.(\d+)\."),
                "single_blocks": re.compile(r"(?:^|\.)(?:single_blocks|single_transformer_blocks)\.(\d+)\.")}
_ZIMAGE_BLOCKS = {name: re.compile(rf"(?:^|\.){name}\.(\d+)\.") for name in ("layers", "noise_refiner",
                                                                             "context_refiner")}
_IMAGE_IN = ("img_in.weight", "x_embedder.weight")
_IMAGE_OUT = ("final_layer.linear.weight", "proj_out.weight")
_FLUX_CONFIG = {"double_blocks": "num_layers", "single_blocks": "num_single_layers",
                "guidance_embedder": "guidance_embeds"}
# family -> {structure fact: the diffusers transformer config key that gives it}
CONFIG_KEYS = {"flux1": _FLUX_CONFIG, "flux2": _FLUX_CONFIG,
               "z-image": {"layers": "n_layers", "noise_refiner": "n_refiner_layers",
                           "context_refiner": "n_refiner_layers"}}


def _count(shapes: dict, pattern: re.Pattern) -> int:
    return len({m.group(1) for key in shapes if (m := pattern.search(key))})


def structure(family: str | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    """A checkpoint's structure facts from its tensor names and shapes (module docs), {} for a family without any.
    FLUX: double and single block counts, whether it holds a guidance embedder (None when it holds no timestep
    embedder either), the image input and output widths (None when absent). Z-Image: its `layers`,
    `noise_refiner` and `context_refiner` block counts."""
    if family == "z-image":
        return {name: _count(shapes, pattern) for name, pattern in _ZIMAGE_BLOCKS.items()}
    if family not in ("flux1", "flux2"):
        return {}
    image_in = next((shapes[k][1] for k in _IMAGE_IN if len(shapes.get(k, ())) == 2), None)
    image_out = next((shapes[k][0] for k in _IMAGE_OUT if len(shapes.get(k, ())) == 2), None)
    guidance = any("guidance_in." in k or "guidance_embedder." in k for k in shapes)
    timestep = any("time_in." in k or "timestep_embedder." in k for k in shapes)
    # no guidance embedder beside a timestep embedder is a fact; beside none, a part of a file says nothing
    return {**{name: _count(shapes, pattern) for name, pattern in _FLUX_BLOCKS.items()},
            "guidance_embedder": guidance if guidance or timestep else None,
            "image_in": image_in, "image_out": image_out}


def describe(family: str | None, facts: dict) -> str:
    """The compared facts in words: "19 double + 38 single blocks and a guidance embedder", "30 layers, 2
    noise_refiner and 2 context_refiner blocks" ("?" for a count not known)."""
    n = {key: "?" if facts.get(key) is None else facts[key] for key in CONFIG_KEYS.get(family, {})}
    if family == "z-image":
        return (f"{n['layers']} layers, {n['noise_refiner']} noise_refiner and {n['context_refiner']} "
                "context_refiner blocks")
    guidance = {True: " and a guidance embedder", False: " and no guidance embedder"}.get(
        facts.get("guidance_embedder"), "")
    return f"{n['double_blocks']} double + {n['single_blocks']} single blocks{guidance}"


def refusal(identity, config: dict, whose: str) -> str | None:
    """The one-line refusal of a checkpoint (`identify.Identity`) whose structure differs from a transformer
    `config` (a diffusers config.json's keys, `CONFIG_KEYS`) that `whose` names ("the flux1-dev config of DIR"),
    None when every fact both know agrees."""
    keys = CONFIG_KEYS.get(identity.family, {})
    have = identity.structure or {}
    wants = {fact: config.get(key) for fact, key in keys.items()}
    if not any(have.get(fact) is not None and want is not None and have[fact] != want for fact, want in wants.items()):
        return None
    return (f"{identity.path}: is {identity.what()} with {describe(identity.family, have)}; {whose} has "
            f"{describe(identity.family, wants)} (a relative or a block-pruned variant)")


def transformer_config(pipeline: str) -> dict:
    """A pipeline's transformer/config.json (a local folder or a Hub id in the Hugging Face cache; nothing is
    fetched), {} when it is not there or unreadable."""
    local = Path(pipeline).expanduser() / "transformer" / "config.json"
    if not local.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(pipeline, "transformer/config.json")  # it takes no `subfolder`
        except ValueError:
            return {}
        local = Path(cached) if isinstance(cached, str) else local
    try:
        config = json.loads(local.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
