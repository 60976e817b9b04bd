"""Builds each combo's pipeline from its profile's source (a `fluxgate.weights.sources.Source`) and measures its
images."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxgate.errors import FixtureError
from fluxgate.matrix import Combo
from fluxgate.measuring import flops, kernels, measure, memory, runtimes, telemetry
from fluxgate.models import ModelSpec
from fluxgate.weights.sources import Source


@dataclass(frozen=True)
class Inputs:
    """The seed and prompts every image is made from (fixtures/prompts.toml)."""

    seed: int
    prompts: dict[str, str]

    @classmethod
    def from_file(cls, path: Path) -> "Inputs":
        """The inputs in a prompts file; FixtureError naming it when it is unreadable or lacks `seed` or [prompts]."""
        try:
            data = tomllib.loads(path.read_text())
            return cls(seed=int(data["seed"]), prompts=dict(data["prompts"]))
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
            raise FixtureError(f"{path}: needs `seed = <int>` and a [prompts] table with `default` ({error})") from None

    def prompt(self, model: str) -> str:
        return self.prompts.get(model, self.prompts["default"])


class Runner:
    """Makes and measures images for one profile on one device; keeps one model's shared components at a time."""

    def __init__(self, profile: str, device: torch.device, source: Source, inputs: Inputs, warmup_steps: int = 1,
                 steps: int | None = None, compile_mode: str = runtimes.DEFAULT_COMPILE_MODE,
                 telemetry_interval_s: float = 0.1):
        self.profile, self.device, self.source, self.inputs = profile, device, source, inputs
        self.warmup_steps, self.steps, self.compile_mode = warmup_steps, steps, compile_mode
        self.telemetry_interval_s = telemetry_interval_s
        self.last_teardown: dict | None = None  # memory before the last combo and after its teardown
        self._components: tuple[str, dict[str, Any]] | None = None
        self._step_flops: dict[str, float] = {}  # per model: the same for every precision
        # Device memory in use before this run allocated anything: NVML's fallback when it cannot attribute
        # memory to this process (containers with their own pid namespace).
        self.baseline_used_bytes = telemetry.device_memory_used_bytes(device) if device.type == "cuda" else None

    def settings(self, model: ModelSpec) -> dict:
        """Everything that decides the image (compared with the baseline's provenance to detect staleness)."""
        run = model.settings(self.profile)
        return {"profile": self.profile, "seed": self.inputs.seed, "steps": self.steps or run.steps,
                "size_px": run.size_px, "guidance_scale": run.guidance_scale, "prompt": self.inputs.prompt(model.name)}

    def _shared_components(self, model: ModelSpec) -> dict[str, Any]:
        # Text encoders, VAE and scheduler are the same for every precision of a model: build them once.
        if self._components is None or self._components[0] != model.name:
            self._components = None
            memory.release(self.device)
            self._components = (model.name, self.source.components(model, self.device))
        return self._components[1]

    def call_kwargs(self, model: ModelSpec) -> dict:
        """The pipeline call's keyword arguments for one image of `model`: the source's prompt kwargs, the size in
        pixels, steps and guidance of this profile, PIL output, and the input image of an editing model."""
        settings, run = self.settings(model), model.settings(self.profile)
        kwargs = {**self.source.prompt_kwargs(model, settings["prompt"], self.device), "height": run.size_px,
                  "width": run.size_px, "num_inference_steps": settings["steps"],
                  "guidance_scale": run.guidance_scale, "output_type": "pil", **run.extra}
        if model.needs_input_image:
            kwargs["image"] = model.builder.input_image(run.size_px, self.inputs.seed)
        return kwargs

    def measure(self, combo: Combo) -> tuple[measure.Measurement, dict]:
        """Get the combo's transformer from the profile's source and measure images; returns where it came from.

        The model's shared components are built first, so the memory snapshot taken before the combo and the one
        after its teardown differ only by what the combo left behind (`last_teardown`)."""
        model = combo.model_spec
        components = self._shared_components(model)
        before = memory.Snapshot.take(self.device)
        self.last_teardown = None
        transformer = pipe = calls = kwargs = out_of_memory = origin = None
        try:
            transformer, origin = self.source.transformer(combo, self.device)
            runtimes.prepare(transformer, combo.runtime, self.compile_mode)
            pipe = model.builder.pipeline_class(transformer=transformer, **components)
            pipe.set_progress_bar_config(disable=True)
            kwargs = self.call_kwargs(model)
            try:  # the first forwards through a user's file: where a file that loads but does not fit shows
                compile_s = runtimes.warm_up(pipe, kwargs, self.device) if combo.runtime_spec.compiles else None
                result = measure.measure_images(pipe, kwargs, self.inputs.seed, self.device, self.warmup_steps,
                                     model.settings(self.profile).timed_images, self.baseline_used_bytes,
                                     self.telemetry_interval_s)
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as error:
                if not (origin or {}).get("identity") or isinstance(error, torch.OutOfMemoryError):
                    raise  # fluxgate's own files (tiny, synthetic): a bug, with its traceback
                reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                failure = FixtureError(f"{origin['file']}: loaded as {origin['identity']['layout']}, but the "
                                       f"pipeline fails with it ({reason})")
                raise failure from error
            result.compile_s = compile_s
            # After the timed images, so profiling never touches their times or peak memory.
            calls = flops.capture_transformer_calls(pipe, kwargs)
            result.kernel_path = kernels.kernel_path(pipe, kwargs, combo.precision, calls=calls).to_json()
            if model.name not in self._step_flops:
                self._step_flops[model.name] = flops.count_step_flops(pipe, kwargs, calls=calls)
            result.step_flops = self._step_flops[model.name]
        except torch.OutOfMemoryError as error:
            # Handled here, so by `finally` the exception and the frames holding the combo's tensors are gone.
            out_of_memory = memory.out_of_memory(error, self.device, combo.id, before)
        finally:
            pipe = transformer = calls = kwargs = None  # drop every reference (prompt embeddings too) before freeing
            runtimes.reset(combo.runtime)
            memory.release(self.device)
        self.last_teardown = memory.teardown(before, memory.Snapshot.take(self.device))
        if out_of_memory is not None:
            raise out_of_memory
        return result, origin
