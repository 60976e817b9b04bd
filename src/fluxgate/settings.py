"""The fluxgate options of one pytest session, read and checked once (`Settings.from_config`): the selected combos,
the input files (a repository's own or the packaged ones), the output locations, the history rule. A bad value is a
pytest.UsageError naming the option before any combo runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fluxgate import defaults, options
from fluxgate.matrix import RUNTIMES, Combo, combos, parse_backends, parse_names, parse_shard, shard
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.storing.fsio import is_url, resolve


@dataclass(frozen=True)
class Settings:
    """The fluxgate options of one pytest session, read and checked once (paths resolved against the rootdir)."""

    combos: tuple[Combo, ...]  # the selected (and sharded) matrix
    device: str
    profile: str  # auto | tiny | synthetic | real
    gpu_class: str | None
    prompts: Path
    models_file: Path
    fixture_cache: Path
    baselines_dir: Path
    history_dir: str  # a folder (resolved against the rootdir) or a URL, as given (`storing.open_store`)
    report_dir: Path | None
    decision_file: Path
    decision_file_given: bool  # False: the default file, which may be missing
    vram_budget_gib: float | None
    steps: int | None
    model_steps: dict  # model -> denoising steps, over `steps` (--model-steps)
    cases: int | None  # images per combo; None: the profile's
    warmup_steps: int
    compile_mode: str
    telemetry_interval_s: float
    cpu_threads: str
    history_gate: bool  # a confirmed regression against history fails the run
    history_window: int
    base_commit: str | None
    min_speed_effect: float | None  # a fraction; None: the device type's default
    history_rule: str  # the registered history rule (`judging.rules`)
    history_images: int
    allow_empty: bool
    write_baselines: bool

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        """Raises pytest.UsageError for a bad selection, percentage, a named input file that is missing or a
        --history-dir URL that no installed fsspec backend serves."""
        get = config.getoption

        def path(option: str) -> Path:
            value = Path(get(option))
            return value if value.is_absolute() else config.rootpath / value

        def history_location(value: str) -> str:
            """A folder resolved against the rootdir, or a URL as given, once fsspec knows its backend."""
            if not is_url(value):
                return str(path("history_dir"))
            from fluxgate.errors import HistoryError

            try:
                resolve(value)  # an unknown protocol or a backend not installed: a usage error before any combo
            except HistoryError as error:
                raise pytest.UsageError(f"--history-dir {error}") from None
            return value

        named = [("--prompts", "prompts", None), ("--decision-file", "decision_file", None)]
        if get("profile") == "real":
            named.append(("--models-file", "models_file", str(defaults.MODELS_FILE)))
        for flag, option, default in named:  # a file named on the command line: missing is a usage error
            if get(option) != default and not path(option).is_file():
                raise pytest.UsageError(f"{flag} {path(option)}: not found")
        prompts = path("prompts") if get("prompts") else defaults.input_file("prompts", config.rootpath)
        from fluxgate.errors import FixtureError, RegistryError
        from fluxgate.inputs import Inputs

        try:
            selected = combos(parse_names("--models", get("models"), MODELS),
                              parse_names("--precisions", get("precisions"), PRECISIONS),
                              parse_names("--runtimes", get("runtimes"), RUNTIMES), parse_backends(get("backends")))
            shard_of = parse_shard(get("shard"))
            from fluxgate.judging.rules import RULES

            parse_names("--history-rule", get("history_rule"), RULES)
            min_speed_effect = options.fraction("--min-speed-effect", get("min_speed_effect"))
            for model in get("model_steps") or {}:
                parse_names("--model-steps", model, MODELS)
        except (ValueError, RegistryError) as error:
            raise pytest.UsageError(str(error)) from None
        try:  # the prompts file, and the cases and input images of the models selected: one line, before any combo
            models = sorted({combo.model for combo in selected})
            profile = get("profile")
            # the profile's case count (auto, --cases: every case the model has; --cases takes as many as there are)
            counts = {model: None if profile == "auto" or get("cases") else MODELS[model].settings(profile).cases
                      for model in models}
            Inputs.from_file(prompts).check(models, counts)
        except FixtureError as error:
            raise pytest.UsageError(f"--prompts {error}") from None
        return cls(
            combos=tuple(shard(selected, *shard_of) if shard_of else selected), device=get("device"),
            profile=get("profile"), gpu_class=get("gpu_class"), prompts=prompts,
            models_file=path("models_file"), fixture_cache=path("fixture_cache"), baselines_dir=path("baselines_dir"),
            history_dir=history_location(get("history_dir")),
            report_dir=path("report_dir") if get("report_dir") else None,
            decision_file=path("decision_file") if get("decision_file") else defaults.input_file("decision",
                                                                                                config.rootpath),
            decision_file_given=get("decision_file") is not None,
            vram_budget_gib=get("vram_budget_gib"), steps=get("steps"), model_steps=dict(get("model_steps") or {}),
            cases=get("cases"),
            warmup_steps=get("warmup_steps"),
            compile_mode=get("compile_mode"), telemetry_interval_s=get("telemetry_interval_ms") / 1000,
            cpu_threads=get("cpu_threads"), history_gate=get("history_gate") == "on",
            history_window=get("history_window"), base_commit=get("base_commit"), min_speed_effect=min_speed_effect,
            history_rule=get("history_rule"),
            history_images=get("history_images"), allow_empty=get("allow_empty"),
            write_baselines=get("write_baselines"))
