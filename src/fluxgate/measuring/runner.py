"""Builds each combo's pipeline from its profile's source (a `fluxgate.weights.sources.Source`) and measures its
images."""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from fluxgate.errors import FixtureError
from fluxgate.inputs import Case, Inputs  # noqa: F401 - Inputs re-exported (scripts and tests import it here)
from fluxgate.matrix import Combo
from fluxgate.measuring import flops, kernels, measure, memory, quiet, runtimes, telemetry
from fluxgate.models import ModelSpec, pipeline
from fluxgate.weights.sources import Source, load_denoiser


class Runner:
    """Makes and measures images for one profile on one device; keeps one model's shared components at a time."""

    def __init__(self, profile: str, device: torch.device, source: Source, inputs: Inputs, warmup_steps: int = 1,
                 steps: int | None = None, compile_mode: str = runtimes.DEFAULT_COMPILE_MODE,
                 telemetry_interval_s: float = 0.1, cases: int | None = None, model_steps: dict | None = None,
                 prepare_pipeline: Callable[[Any, Combo], None] | None = None):
        quiet.quiet_libraries()
        memory.freeze_imports()
        self.prepare_pipeline = prepare_pipeline or (lambda pipe, combo: None)  # the hook before warm-up and timing
        self.profile, self.device, self.source, self.inputs = profile, device, source, inputs
        self.case_count = cases  # images per combo; None: the profile's (`ImageSettings.cases`)
        self.warmup_steps, self.steps, self.compile_mode = warmup_steps, steps, compile_mode
        self.model_steps = dict(model_steps or {})  # model name -> denoising steps, over `steps`
        self.telemetry_interval_s = telemetry_interval_s
        self.last_teardown: dict | None = None  # memory before the last combo and after its teardown
        self._components: tuple[str, dict[str, Any]] | None = None
        self._step_flops: dict[str, float] = {}  # per model: the same for every precision
        # Device memory in use before this run allocated anything: NVML's fallback when it cannot attribute
        # memory to this process (containers with their own pid namespace).
        self.baseline_used_bytes = telemetry.device_memory_used_bytes(device) if device.type == "cuda" else None

    def cases(self, model: ModelSpec) -> tuple[Case, ...]:
        """The cases this run makes for `model`: the first `cases` given to the runner (all the model has when
        fewer), else the first `ImageSettings.cases` of its set."""
        if self.case_count is not None:
            return self.inputs.cases(model.name)[:self.case_count]
        return self.inputs.cases(model.name, model.settings(self.profile).cases)

    def steps_of(self, model: ModelSpec) -> int:
        """Denoising steps of `model`'s images: its --model-steps, else --steps, else its profile's."""
        return self.model_steps.get(model.name) or self.steps or model.settings(self.profile).steps

    def settings(self, model: ModelSpec) -> dict:
        """Everything that decides the images (compared with the baseline's provenance to detect staleness): profile,
        weight seed, steps, size, guidance, and each case's name, prompt, noise seed and input image digest."""
        run = model.settings(self.profile)
        return {"profile": self.profile, "seed": self.inputs.seed, "steps": self.steps_of(model),
                "size_px": run.size_px, "guidance_scale": run.guidance_scale,
                "cases": [case.settings() for case in self.cases(model)]}

    def _shared_components(self, model: ModelSpec) -> dict[str, Any]:
        # Text encoders, VAE and scheduler are the same for every precision of a model: build them once.
        if self._components is None or self._components[0] != model.name:
            self._components = None
            memory.release(self.device)
            self._components = (model.name, self.source.components(model, self.device))
        return self._components[1]

    def call_kwargs(self, model: ModelSpec, case: Case | None = None) -> dict:
        """The pipeline call's keyword arguments for one image of `model` (default: its first case): the source's
        prompt kwargs, the size in pixels, steps and guidance of this profile, PIL output, and the input image of an
        editing model (the case's, else one drawn from the case's seed). The noise seed is `case.seed`."""
        case = case or self.cases(model)[0]
        settings, run = self.settings(model), model.settings(self.profile)
        kwargs = {**self.source.prompt_kwargs(model, case.prompt, self.device), "height": run.size_px,
                  "width": run.size_px, "num_inference_steps": settings["steps"],
                  "guidance_scale": run.guidance_scale, "output_type": "pil", **run.extra}
        if model.needs_input_image:
            kwargs["image"] = case.input_image(run.size_px) or model.builder.input_image(run.size_px, case.seed)
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
        """Get the combo's transformer from the profile's source and measure one timed image per case; returns where
        it came from.

        `loaded(combo)` with one timed image per case (`cases`), then (after them, so profiling never touches their
        times or peak memory) the kernel path and the step FLOPs. The Measurement's `phases_s` says where the
        combo's wall time went. Raises what `loaded` raises."""
        model = combo.model_spec
        calls = None
        with self.loaded(combo) as held:
            try:
                result = held.images(len(held.cases))
                result.compile_s = held.compile_s
                profiling = time.perf_counter()
                calls = flops.capture_transformer_calls(held.pipe, held.kwargs)
                result.kernel_path = kernels.kernel_path(held.pipe, held.kwargs, combo.precision,
                                                         calls=calls, backend=combo.backend).to_json()
                if model.name not in self._step_flops:
                    self._step_flops[model.name] = flops.count_step_flops(held.pipe, held.kwargs, calls=calls)
                result.step_flops = self._step_flops[model.name]
                profile_s = time.perf_counter() - profiling
            finally:
                calls = None  # the captured calls hold the combo's activations: gone before memory is released
            finished = time.perf_counter()
        result.phases_s = {**held.phases_s, "compile_s": held.compile_s or 0.0, "images_s": result.images_wall_s,
                           "profile_s": profile_s, "release_s": time.perf_counter() - finished}
        return result, held.origin


class Loaded:
    """One combo's pipeline held loaded by a Runner (`Runner.loaded`): `images(count)` measures timed images.

    Attributes while entered: `pipe`, `cases` (the profile's cases of the model), `kwargs` (the first case's call
    keyword arguments), `origin` (where the transformer came from), `compile_s` (seconds compiling, compiled
    runtimes; else None), `phases_s` (seconds building the shared components, the transformer, warming up)."""

    def __init__(self, runner: Runner, combo: Combo):
        self.runner, self.combo = runner, combo
        self.pipe = self.kwargs = self.origin = self.compile_s = None
        self.cases: tuple[Case, ...] = ()
        self.phases_s: dict[str, float] = {}
        self._calls: list[tuple[dict, int]] = []  # per case: (call kwargs, noise seed)
        self._before: memory.Snapshot | None = None

    def __enter__(self) -> "Loaded":
        runner, combo, model = self.runner, self.combo, self.combo.model_spec
        clock = time.perf_counter()
        components = runner._shared_components(model)
        self.phases_s["components_s"] = time.perf_counter() - clock
        self._before = memory.Snapshot.take(runner.device)
        runner.last_teardown = None
        try:
            clock = time.perf_counter()
            transformer, self.origin = load_denoiser(runner.source, combo, runner.device)
            runtimes.prepare(transformer, combo.runtime, runner.compile_mode)
            self.pipe = pipeline(model, transformer, components)
            transformer = None
            self.pipe.set_progress_bar_config(disable=True)
            runner.prepare_pipeline(self.pipe, combo)
            self.cases = runner.cases(model)
            self._calls = [(runner.call_kwargs(model, case), case.seed) for case in self.cases]
            self.kwargs = self._calls[0][0]
            self.phases_s["transformer_s"] = time.perf_counter() - clock
            with self._user_file_errors():  # the first forwards through a user's file
                if combo.runtime_spec.compiles:
                    self.compile_s = runtimes.warm_up(self.pipe, self.kwargs, runner.device)
                clock = time.perf_counter()
                measure.warm_up_image(self.pipe, self.kwargs, self._calls[0][1], runner.warmup_steps)
                self.phases_s["warmup_s"] = time.perf_counter() - clock
        except BaseException as error:
            transformer = None
            self._leave(error)  # raises memory.OutOfMemory for an out-of-memory error
            raise
        return self

    def images(self, count: int = 1, steps: int | None = None, first: int = 0) -> measure.Measurement:
        """`count` timed images, one per case in the fixture's order from case number `first` (0-based; again from
        the first case after the last), steps pooled, peak memory counted from their start; `steps`: denoising steps
        of each (None: those it was loaded with). Raises FixtureError for a user's file the pipeline fails with; out
        of memory surfaces on leaving the block."""
        if self.pipe is None:
            raise RuntimeError(f"{self.combo.id}: images() outside `with runner.loaded(combo)`")
        runner = self.runner
        calls = [self._calls[(first + index) % len(self._calls)] for index in range(count)]
        if steps is not None:
            calls = [({**kwargs, "num_inference_steps": steps}, seed) for kwargs, seed in calls]
        names = [self.cases[(first + index) % len(self.cases)].name for index in range(count)]
        with self._user_file_errors():
            result = measure.measure_calls(self.pipe, calls, runner.device, runner.baseline_used_bytes,
                                           runner.telemetry_interval_s)
        result.case_names = names
        return result

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
        self._calls = []
        runtimes.reset(self.combo.runtime)
        memory.release(runner.device)
        if error is not None and out_of_memory is None:
            return
        runner.last_teardown = memory.teardown(self._before, memory.Snapshot.take(runner.device))
        if out_of_memory is not None:
            raise out_of_memory from None
