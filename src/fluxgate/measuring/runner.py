"""Builds each combo's pipeline from its profile's source (a `fluxgate.weights.sources.Source`) and measures its
images."""

from __future__ import annotations

import contextlib
import tomllib
import traceback
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

    def loaded(self, combo: Combo) -> "Loaded":
        """A context manager holding the combo's pipeline loaded and warmed up: `with runner.loaded(combo) as pipe:
        pipe.images(count)` makes timed images on demand (an A/B worker alternates them with another process's).

        On entering: the model's shared components (built first, so the memory snapshot taken before the combo and
        the one after its teardown differ only by what the combo left behind: `last_teardown`), the transformer from
        the profile's source, the compile warm-up of a compiled runtime (`compile_s`), one untimed warm-up image.
        On leaving: every reference dropped, compiled code forgotten, device memory released, `last_teardown` set.
        Raises SkipCombo / FixtureError from the source, FixtureError when a user's file loads but the pipeline
        fails with it, memory.OutOfMemory (one line) when the device runs out, on entering or inside the block."""
        return Loaded(self, combo)

    def measure(self, combo: Combo) -> tuple[measure.Measurement, dict]:
        """Get the combo's transformer from the profile's source and measure images; returns where it came from.

        `loaded(combo)` with the profile's timed images, then (after them, so profiling never touches their times
        or peak memory) the kernel path and the step FLOPs. Raises what `loaded` raises."""
        model = combo.model_spec
        calls = None
        with self.loaded(combo) as held:
            try:
                result = held.images(model.settings(self.profile).timed_images)
                result.compile_s = held.compile_s
                calls = flops.capture_transformer_calls(held.pipe, held.kwargs)
                result.kernel_path = kernels.kernel_path(held.pipe, held.kwargs, combo.precision,
                                                         calls=calls).to_json()
                if model.name not in self._step_flops:
                    self._step_flops[model.name] = flops.count_step_flops(held.pipe, held.kwargs, calls=calls)
                result.step_flops = self._step_flops[model.name]
            finally:
                calls = None  # the captured calls hold the combo's activations: gone before memory is released
        return result, held.origin


class Loaded:
    """One combo's pipeline held loaded by a Runner (`Runner.loaded`): `images(count)` measures timed images.

    Attributes while entered: `pipe`, `kwargs` (the call's keyword arguments), `origin` (where the transformer came
    from), `compile_s` (seconds compiling, compiled runtimes; else None)."""

    def __init__(self, runner: Runner, combo: Combo):
        self.runner, self.combo = runner, combo
        self.pipe = self.kwargs = self.origin = self.compile_s = None
        self._before: memory.Snapshot | None = None

    def __enter__(self) -> "Loaded":
        runner, combo, model = self.runner, self.combo, self.combo.model_spec
        components = runner._shared_components(model)
        self._before = memory.Snapshot.take(runner.device)
        runner.last_teardown = None
        try:
            transformer, self.origin = runner.source.transformer(combo, runner.device)
            runtimes.prepare(transformer, combo.runtime, runner.compile_mode)
            self.pipe = model.builder.pipeline_class(transformer=transformer, **components)
            transformer = None
            self.pipe.set_progress_bar_config(disable=True)
            self.kwargs = runner.call_kwargs(model)
            with self._user_file_errors():  # the first forwards through a user's file
                if combo.runtime_spec.compiles:
                    self.compile_s = runtimes.warm_up(self.pipe, self.kwargs, runner.device)
                measure.warm_up_image(self.pipe, self.kwargs, runner.inputs.seed, runner.warmup_steps)
        except BaseException as error:
            transformer = None
            self._leave(error)  # raises memory.OutOfMemory for an out-of-memory error
            raise
        return self

    def images(self, count: int = 1) -> measure.Measurement:
        """`count` timed images (seeded alike, steps pooled), peak memory counted from their start. Raises
        FixtureError for a user's file the pipeline fails with; out of memory surfaces on leaving the block."""
        if self.pipe is None:
            raise RuntimeError(f"{self.combo.id}: images() outside `with runner.loaded(combo)`")
        runner = self.runner
        with self._user_file_errors():
            return measure.measure_timed(self.pipe, self.kwargs, runner.inputs.seed, runner.device, count,
                                         runner.baseline_used_bytes, runner.telemetry_interval_s)

    def __exit__(self, kind, error, traceback_) -> None:
        self._leave(error)

    @contextlib.contextmanager
    def _user_file_errors(self):
        try:
            yield
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as error:
            origin = self.origin or {}
            if not origin.get("identity") or isinstance(error, torch.OutOfMemoryError):
                raise  # fluxgate's own files (tiny, synthetic): a bug, with its traceback
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            failure = FixtureError(f"{origin['file']}: loaded as {origin['identity']['layout']}, but the "
                                   f"pipeline fails with it ({reason})")
            raise failure from error

    def _leave(self, error: BaseException | None) -> None:
        """Drop every reference to the combo's tensors (the pipeline, the prompt embeddings, the locals of the frames
        an error passed through), forget compiled code, release device memory; then set the runner's
        `last_teardown` (none after an error other than out of memory) and turn out of memory into OutOfMemory."""
        runner = self.runner
        out_of_memory = None
        if isinstance(error, torch.OutOfMemoryError):
            out_of_memory = memory.out_of_memory(error, runner.device, self.combo.id, self._before)
            # The frames the error passed through hold the combo's tensors (frames still running are left alone).
            traceback.clear_frames(error.__traceback__)
        self.pipe = self.kwargs = None
        runtimes.reset(self.combo.runtime)
        memory.release(runner.device)
        if error is not None and out_of_memory is None:
            return
        runner.last_teardown = memory.teardown(self._before, memory.Snapshot.take(runner.device))
        if out_of_memory is not None:
            raise out_of_memory from None
