"""Builds each combo's pipeline (checkpoint -> diffusers loader -> real pipeline) and measures one image."""

from __future__ import annotations

import gc
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxgate import checkpoints, measure
from fluxgate.checkpoints import Checkpoint
from fluxgate.errors import FixtureError
from fluxgate.matrix import Combo
from fluxgate.models import ModelSpec
from fluxgate.precisions import load_transformer


@dataclass(frozen=True)
class Inputs:
    """The seed and prompts every image is made from (fixtures/prompts.toml)."""

    seed: int
    prompts: dict[str, str]

    @classmethod
    def from_file(cls, path: Path) -> "Inputs":
        try:
            data = tomllib.loads(path.read_text())
            return cls(seed=int(data["seed"]), prompts=dict(data["prompts"]))
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
            raise FixtureError(f"{path}: needs `seed = <int>` and a [prompts] table with `default` ({error})") from None

    def prompt(self, model: str) -> str:
        return self.prompts.get(model, self.prompts["default"])


class Runner:
    """Makes and measures images for one profile on one device; keeps one model's shared components at a time."""

    def __init__(self, profile: str, device: torch.device, cache_dir: Path, inputs: Inputs, warmup_steps: int = 1,
                 steps: int | None = None):
        self.profile, self.device, self.cache_dir, self.inputs = profile, device, cache_dir, inputs
        self.warmup_steps, self.steps = warmup_steps, steps
        self._components: tuple[str, dict[str, Any]] | None = None

    def settings(self, model: ModelSpec) -> dict:
        """Everything that decides the image (compared with the baseline's provenance to detect staleness)."""
        run = model.settings(self.profile)
        return {"profile": self.profile, "seed": self.inputs.seed, "steps": self.steps or run.steps,
                "size_px": run.size_px, "guidance_scale": run.guidance_scale, "prompt": self.inputs.prompt(model.name)}

    def _shared_components(self, model: ModelSpec) -> dict[str, Any]:
        # Text encoders, VAE and scheduler are the same for every precision of a model: build them once. They run in
        # bf16 like the transformer, as deployed pipelines do (`torch_dtype=torch.bfloat16`).
        if self._components is None or self._components[0] != model.name:
            self._components = None
            gc.collect()
            components = model.module.tiny_components(self.inputs.seed)
            for component in components.values():
                if isinstance(component, torch.nn.Module):
                    component.to(self.device, torch.bfloat16)
            self._components = (model.name, components)
        return self._components[1]

    def call_kwargs(self, model: ModelSpec) -> dict:
        settings, run = self.settings(model), model.settings(self.profile)
        kwargs = {"prompt": settings["prompt"], "height": run.size_px, "width": run.size_px,
                  "num_inference_steps": settings["steps"], "guidance_scale": run.guidance_scale,
                  "output_type": "pil", **run.extra}
        if model.needs_input_image:
            kwargs["image"] = model.module.input_image(run.size_px, self.inputs.seed)
        return kwargs

    def run(self, combo: Combo) -> tuple[measure.RunResult, Checkpoint]:
        """Make (or reuse) the checkpoint, load it through diffusers, and measure one image."""
        model, precision = combo.model_spec, combo.precision_spec
        checkpoint = checkpoints.ensure(model, precision, self.inputs.seed, self.cache_dir)
        transformer = load_transformer(precision, model.module.TRANSFORMER_CLASS, checkpoint.path,
                                       checkpoint.config_dir, self.device)
        pipe = model.module.PIPELINE_CLASS(transformer=transformer, **self._shared_components(model))
        pipe.set_progress_bar_config(disable=True)
        try:
            result = measure.run(pipe, self.call_kwargs(model), self.inputs.seed, self.device, self.warmup_steps,
                                 model.settings(self.profile).timed_images)
        finally:
            del pipe, transformer
            release_memory(self.device)
        return result, checkpoint


def release_memory(device: torch.device) -> None:
    """Free what the last combo left behind so the next one starts from a clean device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
