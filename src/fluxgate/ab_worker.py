"""One side of an A/B run (`python -m fluxgate.ab`): a long-lived worker process that holds a combo's pipeline loaded
and makes one timed image whenever asked, so base and candidate can alternate image by image on one device.

The controller starts it through execnet (the library pytest-xdist uses): `gateway.remote_exec(ab_worker)` sends this
module's source to the side's own interpreter, where it runs as `__channelexec__`. The first message is the config;
the worker puts `paths` first on `sys.path` (the side's tree: its import root and its generated distribution, see
`fluxgate.ab_sides`), imports fluxgate from the folder `fluxgate` names (the same on both sides, or in fluxgate's own
repository the side's own), applies `env`, optionally imports an injector module, reads the side's hooks
(`fluxgate.hooks.worker_manager`: its `fluxgate.hooks` entry points) and builds a Runner whose pipelines go through
their `pytest_fluxgate_prepare_pipeline`, and answers:

    config {"tree", "paths": [dir, ...], "fluxgate": dir, "profile", "device", "prompts", "fixture_cache",
            "models_file", "cpu_threads", "cpus": [cpu, ...] (a CPU device's shared CPU set), "warmup_steps",
            "steps", "env": {name: value},
            "inject": {"path": dir, "module": name} | None}
        -> {"ok": True, "fluxgate": <its __file__>, "python": <sys.executable>, "device": "cuda:0", "gpu_class",
            "environment": fingerprint (with what the side's `pytest_fluxgate_environment` hooks add),
            "hooks": ["module:attribute [origin]", ...]}
    {"op": "load", "combo": "flux1-dev[bf16]", "steps": N (optional: this combo's denoising steps, over the
     config's)}  -> {"ok": True, "settings": {...}, "compile_s": s | None, "cases": [name...] (a side that makes
                     any case on request; absent: the first case only, a tree from before)}
    {"op": "image", "case": K (optional: the case number, 0-based, of the load's "cases"; default 0)}
        -> {"ok": True, "step_times_s": [s...], "first_steps_s", "run_wait_s", "peak_mem_gib": GiB, "mem_kind",
            "e2e_s": s, "pixels": {"size": [width, height], "rgb": bytes (8-bit RGB rows)}, "case": name}
    {"op": "judge", "baselines_dir": dir, "steps": N (optional; default: the model's own),
     "references_dir": dir (optional: references made at `steps`, with their similarity limits)}
        -> {"ok": True, "failures": [line...], "not_judged": [line...], "metrics": {ms_ssim, psnr_db, cases, ...},
            "thresholds": {...}, "images": {name: png bytes}, "steps": N, "references": dir | None,
            "made": N (images made for judging), "settings": {...}}
        the loaded combo judged as a one-sided run judges it (`fluxgate.gate`): one image per case at `steps` against
        the stored BF16 references under `<references_dir or baselines_dir>/<gpu class>` (similarity limits and the
        broken-image tripwire), and the fixed speed and memory limits of `<baselines_dir>/<gpu class>` on every image
        it made since its load (the blocks' and these), pooled. At the blocks' own steps, each case's first block
        image is the one judged: only the cases no block made are made (nothing is measured twice)
    {"op": "unload"}  -> {"ok": True, "teardown": {...} | None}
    {"op": "close"}   -> {"ok": True}, and the worker ends

Every failure is answered, never raised: {"ok": False, "error": "<Type>: <one line>", "oom": bool} (out of memory:
`oom` True, the combo unloaded). Only plain types cross the channel (execnet's serializer). Imports nothing at
module level but the standard library: it must run before its tree is on `sys.path`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys


def _error(error: BaseException) -> dict:
    oom = type(error).__name__ in ("OutOfMemory", "OutOfMemoryError")
    return {"ok": False, "oom": oom, "error": " ".join(f"{type(error).__name__}: {error}".split())[:500]}


class Worker:
    """The side's Runner and the combo it holds loaded (at most one)."""

    def __init__(self, config: dict):
        tree = os.path.abspath(config["tree"])
        for path in reversed(config.get("paths") or [os.path.join(tree, "src")]):
            sys.path.insert(0, path)
        if config.get("fluxgate"):
            _import_fluxgate(config["fluxgate"])
        os.environ.update({str(k): str(v) for k, v in (config.get("env") or {}).items()})
        inject = config.get("inject")
        if inject:
            sys.path.insert(0, inject["path"])
            __import__(inject["module"])
        import torch

        import fluxgate
        from fluxgate.measuring.environment import fingerprint, gpu_class, resolve_device
        from fluxgate.measuring.runner import Inputs, Runner
        from fluxgate.weights.sources import for_profile

        self.fluxgate_file = fluxgate.__file__
        self.device = resolve_device(config.get("device") or "auto")
        if self.device.type == "cpu" and config.get("cpus") and hasattr(os, "sched_setaffinity"):
            try:  # both sides on the same CPUs (`ab_sides.shared_cpus`)
                os.sched_setaffinity(0, config["cpus"])
            except OSError:
                pass  # a CPU set this process may not use: the scheduler's choice, as before
        if self.device.type == "cpu" and config.get("cpu_threads"):
            torch.set_num_threads(int(config["cpu_threads"]))
        inputs = Inputs.from_file(_path(tree, config.get("prompts") or "fixtures/prompts.toml"))
        profile = config.get("profile") or "auto"
        self.profile = profile if profile != "auto" else ("synthetic" if self.device.type == "cuda" else "tiny")
        cache = config.get("fixture_cache") or os.environ.get("FLUXGATE_CACHE") or os.path.join(tree, ".fluxgate-cache")
        source = for_profile(self.profile, _path(tree, cache), inputs.seed,
                             _path(tree, config.get("models_file") or "fixtures/models.toml"))
        kwargs = {"warmup_steps": int(config.get("warmup_steps", 1)), "steps": config.get("steps")}
        hooks, manager = _hooks()
        environment = fingerprint(self.device, __import__("pathlib").Path(tree))
        registered = []
        if manager is not None:  # the side's own hooks: its prepare_pipeline on every combo, its environment fields
            device = self.device
            prepare = getattr(manager.hook, "pytest_fluxgate_prepare_pipeline", None)  # None: a tree with other names
            if prepare is not None:
                kwargs["prepare_pipeline"] = lambda pipe, combo: prepare(pipe=pipe, combo=combo, device=device)
            environment = hooks.extended_environment(manager.hook, environment, self.device)
            from fluxgate.registry import HOOKS_GROUP, group_targets

            registered = [f"{target} [{origin}]" for origin, target in group_targets(HOOKS_GROUP)]
        self.runner = Runner(self.profile, self.device, source, inputs, **kwargs)
        # What the candidate's judging imports (the image comparison, torchmetrics), imported by both sides alike: on
        # a CPU a side's peak memory is its resident set, and these modules' ~60 MB in the candidate alone made an
        # A/A's memory ratio 1.10 (z-image-turbo[fp8-scaled], tiny profile).
        with contextlib.suppress(ImportError):  # a tree from before one-pass judging
            __import__("fluxgate.gate")
            __import__("fluxgate.judging.similarity")
        self.hello = {"ok": True, "fluxgate": self.fluxgate_file, "python": sys.executable, "device": str(self.device),
                      "gpu_class": gpu_class(self.device), "profile": self.profile, "environment": environment,
                      "hooks": registered}
        self.stack: contextlib.ExitStack | None = None
        self.held = None
        self.steps = kwargs["steps"]
        # (step_times_s, run_wait_s, peak GiB) of every image of the combo last loaded, across reloads of it
        # (alternating loads reload it for each image): the fixed limits are judged on all of them
        self.made: list[tuple] = []
        self.made_for: str | None = None
        # case name -> (image, non-finite latent values) of its first block image of the combo at its steps (kept
        # across alternating reloads of it; dropped at another combo, other steps, or once judged)
        self.case_images: dict = {}
        self.loaded_steps: int | None = None
        self.last_result = None  # the newest block image's Measurement

    def load(self, combo_id: str, steps: int | None = None) -> dict:
        from fluxgate.matrix import Combo

        self.unload()
        if combo_id != self.made_for:  # alternating loads reload the same combo for each image: kept across them
            self.made, self.made_for, self.case_images = [], combo_id, {}
        self.runner.steps = steps or self.steps  # Runner.settings and call_kwargs read it at load
        combo = Combo.parse(combo_id)
        stack = contextlib.ExitStack()
        loaded = getattr(self.runner, "loaded", None) or (lambda combo: _Legacy(self.runner, combo))
        self.held = stack.enter_context(loaded(combo))
        self.stack = stack
        settings = self.runner.settings(combo.model_spec)
        if settings.get("steps") != self.loaded_steps:  # the blocks' case images are of one step count
            self.case_images = {}
        self.loaded_steps = settings.get("steps")
        answer = {"ok": True, "settings": settings, "compile_s": self.held.compile_s}
        if _takes_first(self.held):
            answer["cases"] = [case.name for case in self.held.cases]
        return answer

    def image(self, case: int = 0) -> dict:
        if self.held is None:
            raise RuntimeError("no combo loaded: send {'op': 'load'} first")
        try:
            result = self.held.images(1, first=case) if case else self.held.images(1)
        except BaseException as error:
            self._unload_after(error)
            raise
        self.made.append((list(result.step_times_s), result.run_wait_s, result.peak_mem_gib))
        self.last_result = result
        name = (getattr(result, "case_names", None) or [None])[0]
        if name is not None and name not in self.case_images:
            self.case_images[name] = (result.case_images[0], result.case_nonfinite[0])
        rgb = result.image.convert("RGB")
        return {"ok": True, "step_times_s": list(result.step_times_s), "first_steps_s": result.first_steps_s,
                "run_wait_s": result.run_wait_s, "peak_mem_gib": result.peak_mem_gib, "mem_kind": result.mem_kind,
                "e2e_s": result.e2e_s, "pixels": {"size": list(rgb.size), "rgb": rgb.tobytes()}, "case": name}

    def judge(self, baselines_dir: str, steps: int | None = None, references_dir: str | None = None) -> dict:
        import dataclasses
        from pathlib import Path

        from fluxgate import gate
        from fluxgate.errors import BaselineError
        from fluxgate.judging import baselines

        if self.held is None:
            raise RuntimeError("no combo loaded: send {'op': 'load'} first")
        combo, runner = self.held.combo, self.runner

        def settings_at(at: int | None) -> dict:
            loaded_steps, runner.steps = runner.steps, at  # None: the model's own
            try:
                return runner.settings(combo.model_spec)
            finally:
                runner.steps = loaded_steps

        # the baseline first: a missing or stale one is said before a minute of images is spent
        gpu_class, environment, notes = self.hello["gpu_class"], self.hello["environment"], []
        settings = settings_at(steps)
        baseline = None
        if references_dir:  # references made at `steps`; the speed and memory limits stay the class's
            try:
                baseline = baselines.with_class_limits(
                    baselines.load(Path(references_dir), gpu_class, combo, settings, environment),
                    Path(baselines_dir), gpu_class, combo)
            except BaselineError as error:  # e.g. a combo, case or setting the PR changed: its own references
                notes.append(f"references at {settings['steps']} steps not usable ({error}): judged at the "
                             "model's own steps")
                settings = settings_at(None)
        if baseline is None:
            baseline = baselines.load(Path(baselines_dir), gpu_class, combo, settings, environment)
        # at the blocks' steps, the blocks' first image of each case is its judged image; the rest are made now
        names = [case.name for case in self.held.cases]
        kept = self.case_images if settings["steps"] == self.loaded_steps and _takes_first(self.held) else {}
        try:
            if kept:
                made_now = [self.held.images(1, steps=settings["steps"], first=index)
                            for index, name in enumerate(names) if name not in kept]
            else:
                made_now = [self.held.images(len(names), steps=settings["steps"])]
        except BaseException as error:
            self._unload_after(error)
            raise
        made = [*self.made, *((list(r.step_times_s), r.run_wait_s, r.peak_mem_gib) for r in made_now)]
        case_images = {**kept, **{name: (image, nonfinite) for r in made_now
                                  for name, image, nonfinite in zip(r.case_names, r.case_images, r.case_nonfinite)}}
        waits = [wait for _, wait, _ in made]
        pooled = dataclasses.replace(
            made_now[0] if made_now else self.last_result, step_times_s=[s for steps, _, _ in made for s in steps],
            run_wait_s=None if any(w is None for w in waits) else [s for w in waits for s in w],
            peak_mem_gib=max(peak for _, _, peak in made))
        result = _Cases(names, [case_images[name][0] for name in names], [case_images[name][1] for name in names])
        images, metrics = {}, {}

        def keep(name: str, image) -> str:
            png = io.BytesIO()
            image.save(png, format="PNG")
            images[name] = png.getvalue()
            return name

        summary, broken = gate.judge_cases(combo, result, baseline.references(list(result.case_names)), metrics,
                                           self.device, keep, baseline_ms_ssim=baseline.thresholds.measured_ms_ssim)
        not_judged = [] if self.device.type != "cuda" else None  # a busy CPU's speed is not judged (gate.py)
        failures = [f"broken image: {problem}" for problem in broken] + gate.limit_failures(
            pooled, summary, baseline, f'["{combo.model}"."{combo.variant}"]', not_judged)
        self.case_images, self.last_result = {}, None  # judged: the images went into the answer
        return {"ok": True, "failures": failures, "not_judged": [*notes, *(not_judged or [])], "metrics": metrics,
                "images": images, "steps": settings["steps"], "made": sum(len(r.case_names) for r in made_now),
                "references": str(baseline.folder) if references_dir and baseline.limits_folder else None,
                "thresholds": dataclasses.asdict(baseline.thresholds), "settings": settings}

    def _unload_after(self, error: BaseException) -> None:
        stack, self.stack, self.held = self.stack, None, None
        if stack is not None:
            stack.__exit__(type(error), error, error.__traceback__)  # raises OutOfMemory for out of memory

    def unload(self) -> dict:
        stack, self.stack, self.held = self.stack, None, None
        if stack is not None:
            stack.close()
        return {"ok": True, "teardown": self.runner.last_teardown}


def _takes_first(held) -> bool:
    """Whether `held.images` makes any case on request (`first`): a tree from before makes the first case only."""
    import inspect

    try:
        return "first" in inspect.signature(held.images).parameters
    except (TypeError, ValueError):
        return False


class _Cases:
    """The judged images, one per case in the fixture's order, as `gate.judge_cases` reads a Measurement's."""

    def __init__(self, case_names: list, case_images: list, case_nonfinite: list):
        self.case_names, self.case_images, self.case_nonfinite = case_names, case_images, case_nonfinite


class _Legacy:
    """`Runner.loaded` for a tree from before it existed (a base older than A/B runs): the same steps from the
    Runner's parts, the warm-up image through `measure_images` with its timed image discarded."""

    def __init__(self, runner, combo):
        self.runner, self.combo, self.pipe, self.kwargs, self.compile_s = runner, combo, None, None, None

    def __enter__(self):
        from fluxgate.measuring import measure, runtimes

        runner, model = self.runner, self.combo.model_spec
        components = runner._shared_components(model)
        try:
            transformer, _ = runner.source.transformer(self.combo, runner.device)
            runtimes.prepare(transformer, self.combo.runtime, runner.compile_mode)
            self.pipe = model.builder.pipeline_class(transformer=transformer, **components)  # an old tree's way
            self.pipe.set_progress_bar_config(disable=True)
            self.kwargs = runner.call_kwargs(model)
            if self.combo.runtime_spec.compiles:
                self.compile_s = runtimes.warm_up(self.pipe, self.kwargs, runner.device)
            measure.measure_images(self.pipe, self.kwargs, runner.inputs.seed, runner.device, runner.warmup_steps, 1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def images(self, count: int = 1):
        from fluxgate.measuring import measure

        runner = self.runner
        return measure.measure_images(self.pipe, self.kwargs, runner.inputs.seed, runner.device, 0, count,
                                      runner.baseline_used_bytes, runner.telemetry_interval_s)

    def __exit__(self, *exc) -> None:
        from fluxgate.measuring import memory, runtimes

        self.pipe = self.kwargs = None
        runtimes.reset(self.combo.runtime)
        memory.release(self.runner.device)


def _import_fluxgate(folder: str) -> None:
    """Import the fluxgate package from `folder` (its `__init__.py`), whatever `sys.path` holds: its submodules then
    come from the same folder (the package's `__path__`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fluxgate", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        raise ImportError(f"no fluxgate package in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fluxgate"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fluxgate"]
        raise


def _hooks():
    """(fluxgate.hooks, its worker_manager()) of the side's fluxgate; (None, None) for a fluxgate tree from before
    hooks (a base of fluxgate's own repository)."""
    try:
        from fluxgate import hooks
    except ImportError:
        return None, None
    return hooks, hooks.worker_manager()


def _path(tree: str, path: str) -> "os.PathLike":
    from pathlib import Path

    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else Path(tree) / path


def serve(channel) -> None:
    """Answer the controller's messages on `channel` until "close" or the channel closes."""
    try:
        worker = Worker(channel.receive())
    except BaseException as error:  # a broken tree, a bad config: one answer, then the worker ends
        channel.send(_error(error))
        return
    channel.send(_sanitize(worker.hello))
    for message in channel:
        op = message.get("op") if isinstance(message, dict) else None
        try:
            if op == "close":
                worker.unload()
                channel.send({"ok": True})
                return
            if op == "load":
                answer = worker.load(message["combo"], message.get("steps"))
            elif op == "image":
                answer = worker.image(int(message.get("case") or 0))
            elif op == "judge":
                answer = worker.judge(message["baselines_dir"], message.get("steps"), message.get("references_dir"))
            elif op == "unload":
                answer = worker.unload()
            else:
                answer = {"ok": False, "oom": False, "error": f"unknown message {message!r}"}
        except BaseException as error:
            answer = _error(error)
        channel.send(_sanitize(answer))


def _sanitize(value):
    """`value` as plain types execnet can send (exact types only): tuples as lists, others as their text."""
    if isinstance(value, dict):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    if value is None or type(value) in (bool, int, float, str, bytes):
        return value
    for kind in (bool, int, float, bytes):  # subclasses (torch's version string is a str) as their base type
        if isinstance(value, kind):
            return kind(value)
    return str(value)


if __name__ == "__channelexec__":
    serve(channel)  # noqa: F821 - execnet provides `channel`
