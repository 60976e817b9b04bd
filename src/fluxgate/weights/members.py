"""Which member of a model family a checkpoint is, told from what its contents hold, never from its name.

Facts per member (`ModelSpec.member` of each registered model, `members()`; `RELATIVES`: members fluxgate has no slot
for), and their sources:
- FLUX.1-dev carries a guidance embedder, FLUX.1-schnell none: BFL flux src/flux/util.py `configs` (`guidance_embed`
  True for flux-dev, False for flux-schnell), so only dev files hold `guidance_in.*` (diffusers:
  `time_text_embed.guidance_embedder.*`, config `guidance_embeds`); diffusers loaders/single_file_utils.py
  `infer_diffusers_model_type` tells "flux-dev" from "flux-schnell" by `guidance_in.in_layer.bias` alone.
- FLUX.1 Fill / Depth / Canny: `img_in` takes 384 / 128 channels while the output has 64 (`infer_diffusers_model_type`
  "flux-fill", "flux-depth"); here: the image input wider than the output.
- FLUX.1-Kontext-dev has FLUX.1-dev's tensors, names, shapes and config (diffusers `FluxKontextPipeline` runs the
  same `FluxTransformer2DModel` config; neither `infer_diffusers_model_type` nor ComfyUI comfy/model_detection.py has
  a Kontext case): only a pipeline folder's model_index.json (`FluxKontextPipeline`) or `modelspec.architecture`
  metadata tells them apart.
- Chroma (lodestones/Chroma) replaces the embedders and modulations with `distilled_guidance_layer` (ComfyUI
  comfy/model_detection.py): family "chroma" (`identify.family_of`), never FLUX.1.
- FLUX.2 [klein] has no guidance embedder (diffusers pipelines/flux2/pipeline_flux2_klein.py calls the transformer
  with `guidance=None`; `Flux2KleinPipeline`), FLUX.2-dev has one; klein's blocks are fewer (4B: 5 + 20, 9B: 8 + 24,
  dev: 8 + 48).
- Z-Image-Turbo is distilled from Z-Image with the same architecture and tensors (Tongyi-MAI; `ZImagePipeline`
  both): nothing in a file tells them apart.

Where the contents leave more than one member, the answer says so (`Member.name` None, `candidates` all of them);
`tie_break` then takes the member whose published name the checkpoint's own name carries (`path_words` in
`own_names`: the file name flux1-kontext-dev.safetensors or z_image_turbo_bf16.safetensors, a pipeline folder's name
for its transformer/, an HF cache's repository id models--black-forest-labs--FLUX.1-dev; never another parent
folder), as README's "Real checkpoints" documents, and only when exactly one member's word is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxgate.models import MODELS, MemberFacts
from fluxgate.weights import blocks


def members() -> dict[str, MemberFacts]:
    """The registered models' member facts (`ModelSpec.member`), by model name: the slots scan may fill."""
    return {name: spec.member for name, spec in MODELS.items() if spec.member is not None}


# Members fluxgate has no slot for: a file identified as one is refused from every slot, naming what it is.
RELATIVES = {
    "flux1-schnell": MemberFacts("flux1", False, ("FluxPipeline",), ("schnell",)),
    "flux2-klein": MemberFacts("flux2", False, ("Flux2KleinPipeline",), ("klein",)),
    "z-image": MemberFacts("z-image", None, ("ZImagePipeline",), ()),
    "chroma": MemberFacts("chroma", None, ("ChromaPipeline",), ("chroma",)),
}
CONDITIONED_FLUX1 = "flux1-fill/depth/canny"

@dataclass(frozen=True)
class Member:
    """What the contents say: `name` (a key of members() or RELATIVES, or CONDITIONED_FLUX1), None when they leave
    several `candidates`; `evidence`: the facts that decided, in words; `structure`: `blocks.structure` (block counts;
    FLUX: also guidance embedder, image input/output widths)."""

    name: str | None
    candidates: tuple[str, ...]
    evidence: str
    structure: dict


def member_of(family: str | None, shapes: dict[str, tuple[int, ...]], metadata: dict | None = None,
              guidance_embeds: bool | None = None, pipeline_class: str | None = None) -> Member:
    """The member a checkpoint of `family` is (module docs), from its tensors' `shapes`, its safetensors
    `metadata`, a folder config's `guidance_embeds` and its pipeline's model_index.json `pipeline_class`."""
    facts = blocks.structure(family, shapes)
    everyone = {**members(), **RELATIVES}
    candidates = [name for name, f in everyone.items() if f.family == family]
    evidence = []
    guidance = guidance_embeds if guidance_embeds is not None else facts.get("guidance_embedder")
    if facts.get("image_in") and facts.get("image_out") and facts["image_in"] != facts["image_out"]:
        return Member(CONDITIONED_FLUX1 if family == "flux1" else None, (), f"image input {facts['image_in']} wide, "
                      f"output {facts['image_out']} (a conditioned variant)", facts)
    if "guidance_embedder" in facts and guidance is not None:
        candidates = [n for n in candidates if everyone[n].guidance_embedder in (None, guidance)]
        evidence.append("a guidance embedder" if guidance else "no guidance embedder")
    if pipeline_class:
        kept = [n for n in candidates if pipeline_class in everyone[n].pipelines]
        if kept:
            candidates = kept
            evidence.append(f"pipeline {pipeline_class}")
    architecture = str((metadata or {}).get("modelspec.architecture", "")).lower()
    if architecture and len(candidates) > 1:
        kept = [n for n in candidates if any(w in architecture for w in everyone[n].path_words)]
        if len(kept) == 1:
            candidates = kept
            evidence.append(f"modelspec.architecture {architecture!r}")
    name = candidates[0] if len(candidates) == 1 else None
    return Member(name, tuple(candidates), ", ".join(evidence), facts)


def own_names(path: str) -> list[str]:
    """The names a checkpoint itself carries: its file (or model folder) name, for a pipeline's `transformer/`
    folder the pipeline folder's name, and the repository id of the Hugging Face cache it sits in
    (`models--org--name`). Never any other parent folder's: a folder named "kontext" or "turbo" says nothing about
    the files in it."""
    file = Path(path)
    names = [file.name, *([file.parent.name] if file.name == "transformer" else [])]
    return names + [part for part in file.parts if part.startswith("models--")]


def tie_break(candidates: tuple[str, ...], path: str) -> str | None:
    """The one candidate whose published name's words the checkpoint's own names carry (`own_names`, module docs),
    else None."""
    text = "\n".join(own_names(path)).lower()
    everyone = {**members(), **RELATIVES}
    named = [n for n in candidates if any(word in text for word in everyone[n].path_words)]
    return named[0] if len(named) == 1 else None
