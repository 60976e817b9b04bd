"""fluxgate's command-line options: their declarations, and the types that check each value as the command line is
parsed (a bad value is a usage error naming the option, before any combo runs).

Light on purpose: pytest imports this in every session of a repository that installs fluxgate, so nothing here
imports torch, diffusers or the registries' implementations; model and precision names are checked when the run
starts (`settings.Settings`), from the registries' light specs."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxgate import defaults
from fluxgate.environ import DEFAULT_ALLOC_CONF
from fluxgate.measuring.runtimes import COMPILE_MODES, DEFAULT_COMPILE_MODE

if TYPE_CHECKING:
    import pytest


def _converted(text: str, convert, noun: str):
    """`convert(text)`, or the usage error `'<text>' is not a <noun>`."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None


def _count(minimum: int):
    """An argparse type: an integer >= `minimum` (a bad value is a usage error naming the option before any combo)."""
    def parse(text: str) -> int:
        value = _converted(text, int, "whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _amount(positive: bool):
    """An argparse type: a finite number > 0 (`positive`) or >= 0."""
    def parse(text: str) -> float:
        value = _converted(text, float, "number")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'> 0' if positive else '>= 0'}")
        return value
    parse.__name__ = "number > 0" if positive else "number >= 0"
    return parse


def _threads(text: str) -> str:
    """An argparse type: 'auto' or a whole number >= 1 (kept as text; see `cpu_threads`)."""
    return text if text == "auto" else str(_count(1)(text))


def model_steps(text: str) -> dict[str, int]:
    """An argparse type: `MODEL=N[,MODEL=N...]` -> {model: steps}, each N >= 1 (the model names are checked against
    the registry when the run starts, where it is loaded)."""
    steps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        model, equals, count = item.partition("=")
        if not equals or not model.strip() or not count.strip().isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: want MODEL=N with N at least 1")
        steps[model.strip()] = int(count)
    return steps


def _device(text: str) -> str:
    """An argparse type: 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N (N a GPU number, e.g. cuda:1)")


@dataclass(frozen=True)
class Option:
    """One option, declared once: its flags and argparse attributes (type, default, metavar, help, choices, action),
    added alike to pytest's parser and to a `fluxgate` command's argparse parser (pytest-benchmark's
    `add_global_options`)."""

    flags: tuple[str, ...]
    attrs: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


OPTIONS: dict[str, Option] = {}  # dest -> Option, in --help order


def _option(*flags: str, **attrs: Any) -> None:
    option = Option(flags, attrs)
    OPTIONS[option.dest] = option


_option("--models", default=None, metavar="NAMES",
        help="comma-separated models to run [default: all registered; `fluxgate list` names them and "
             "who registered each]")
_option("--precisions", default=None, metavar="NAMES",
        help="comma-separated precisions (file formats and load-then-transform backends) to run "
             "[default: all registered; `fluxgate list`]")
_option("--runtimes", default="eager", metavar="NAMES",
        help="comma-separated runtimes: 'eager', 'compile' (torch.compile of the transformer's repeated "
             "blocks; compile time is measured apart from the timed steps and reported), or 'all'; "
             "compiled items are named like flux1-dev[fp8-scaled-compile] [default: eager]")
_option("--backends", default=None, metavar="NAMES",
        help="comma-separated backends that run each precision's file: 'diffusers' (the default of fluxgate's "
             "precisions: diffusers' own quantized layers), 'comfy' (fp8-scaled through ComfyUI's mixed-precision "
             "path on comfy-kitchen: per-tensor scales, static input scale, scaled_mm_v2; needs the 'comfy' extra, "
             "FP8 tensor cores on CUDA (compute capability 8.9+) or a CPU), or 'all'; a precision runs by those of "
             "them it has, and items of a non-default backend are named like flux1-dev[fp8-scaled@comfy] "
             "[default: each precision's default backend; `fluxgate list`]")
_option("--compile-mode", default=DEFAULT_COMPILE_MODE, choices=COMPILE_MODES,
        help=f"torch.compile mode of the 'compile' runtime [default: {DEFAULT_COMPILE_MODE}]")
_option("--shard", default=None, metavar="I/N",
        help="run only shard I of N of the selected combos (every N-th, starting at I), for splitting "
             "the matrix across runners; merge their histories with `python -m fluxgate.merge`")
_option("--profile", default="auto", choices=["auto", "tiny", "synthetic", "real"],
        help="where weights come from: 'tiny' = toy-size real architectures, seeded random weights, runs "
             "on CPU; 'synthetic' = full-size real architectures, seeded random weights made on the GPU, "
             "1024 px, default steps; 'real' = your checkpoints named in --models-file; 'auto' = "
             "synthetic on a CUDA device, tiny on CPU [default: auto]")
_option("--models-file", default=str(defaults.MODELS_FILE), metavar="FILE",
        help="where the real profile finds checkpoints and pipeline folders [default: "
             "fixtures/models.toml]")
_option("--device", default="auto", metavar="DEV", type=_device,
        help="torch device: 'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1'; with 'cuda' "
             "and no CUDA device every combo is skipped [default: auto]")
_option("--gpu-class", default=None, metavar="NAME",
        help="baseline folder under --baselines-dir [default: 'cpu' on CPU, else the GPU name as a slug]")
_option("--baselines-dir", default="baselines", metavar="DIR",
        help="stored baselines, one folder per GPU class [default: baselines]")
_option("--history-dir", default=".fluxgate/history", metavar="DIR",
        help="benchmark history: this run adds one JSON file (and its images) here. A folder, or a URL "
             "of an fsspec filesystem: an S3 or S3-compatible bucket s3://bucket/fluxgate/history "
             "(needs s3fs, the 's3' extra; endpoint and keys from fsspec's config or the environment, "
             "e.g. FSSPEC_S3_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... "
             "AWS_SECRET_ACCESS_KEY=...), Google Cloud Storage gs://bucket/fluxgate/history (pip install "
             "gcsfs), a Hugging Face dataset hf://datasets/org/name/history (HF_TOKEN; each write is a "
             "commit), memory://history (one process, for tests) [default: .fluxgate/history]")
_option("--fixture-cache", default=os.environ.get("FLUXGATE_CACHE", ".fluxgate-cache"), metavar="DIR",
        help="cache of generated checkpoints, keyed by content hash [default: $FLUXGATE_CACHE or "
             ".fluxgate-cache]")
_option("--prompts", default=None, metavar="FILE",
        help="the weight seed and each model's cases (prompt, noise seed, an editing model's input "
             f"image) [default: {defaults.describe('prompts')}]")
_option("--cases", type=_count(1), default=None, metavar="N",
        help="images per combo: the first N cases of each model's set (all it has when fewer), one timed "
             "image each, each compared with the BF16 image of its case. Default: the profile's (tiny 3; "
             "full size FLUX.1 3, Kontext 2, FLUX.2 1, Z-Image 4: the eager matrix fits 10 min on an "
             "H200). Baselines made with more cases serve runs that make fewer")
_option("--steps", type=_count(1), default=None, metavar="N",
        help="denoising steps per image, overriding the profile's default (makes baselines stale)")
_option("--model-steps", type=model_steps, default=None, metavar="MODEL=N[,MODEL=N...]",
        help="denoising steps per model, over --steps (e.g. flux1-dev=6,flux2-dev=4; makes baselines made at "
             "other steps stale): the PR pass's steps (`fluxgate ab`), and a one-sided run that writes the "
             "references `fluxgate ab --references-dir` judges at them (--write-baselines --baselines-dir DIR)")
_option("--warmup-steps", type=_count(0), default=1, metavar="N",
        help="steps of the untimed warm-up image made before a combo's timed images [default: 1]")
_option("--telemetry-interval-ms", type=_amount(positive=False), default=100.0, metavar="MS",
        help="NVML sampling period during the timed images (clocks, power, temperature, throttle "
             "reasons, process memory); 0 = no sampling thread, only the energy counter and one sample "
             "at the end [default: 100]")
_option("--cuda-alloc-conf", default=DEFAULT_ALLOC_CONF, metavar="CONF",
        help="torch's CUDA caching-allocator settings for the run, e.g. expandable_segments:True "
             "(sets PYTORCH_CUDA_ALLOC_CONF; one already set in the environment wins, with a warning). "
             "Recorded in each run's environment; the history gate does not compare runs with different "
             "settings [default: 'default', torch's own settings]")
_option("--report-dir", default=None, metavar="DIR",
        help="after the run, write this run's summary.md (PR comment), trend plots and image grids here "
             "(off by default; `nox -s report` makes the same from history alone)")
_option("--decision-file", default=None, metavar="FILE",
        help="$/GPU-hour per GPU class and quality floor per model for the report's 'which precision to "
             f"ship' section [default: {defaults.describe('decision')}]")
_option("--vram-budget-gib", type=_amount(positive=True), default=None, metavar="GIB",
        help="the report recommends only combos whose peak VRAM fits this budget [default: no budget]")
_option("--history-gate", default="on", choices=["on", "off"],
        help="also judge this run against the history (last --history-window comparable runs, or the runs "
             "of --base-commit) with a rank test plus a minimum effect; a suspected speed regression is "
             "re-measured and, if confirmed, fails the session. 'off': report verdicts, fail on none "
             "[default: on]")
_option("--history-window", type=_count(1), default=5, metavar="N",
        help="how many earlier comparable runs form the window [default: 5]")
_option("--min-speed-effect", default="auto", metavar="PCT",
        help="smallest step-time shift (percent of the window's median) the history gate calls a change. "
             "'auto': 2 on CUDA (the H100's run-to-run noise is under 1 %%), 50 elsewhere, e.g. CPU (tiny-profile "
             "steps of 10-25 ms swing ±25 %% between runs on a shared 2-core machine) [default: auto]")
_option("--history-rule", default="rank-test", metavar="NAME",
        help="the registered decision rule against history (`fluxgate list` names them; teams add their own "
             "through the fluxgate.rules entry-point group) [default: rank-test]")
_option("--base-commit", default=None, metavar="SHA",
        help="judge against the runs of this git commit (e.g. the PR's base) instead of the last N runs")
_option("--cpu-threads", default="auto", type=_threads, metavar="N",
        help="torch threads for a CPU device: a number, or 'auto' = half the cores this process may use, "
             "at least 1 (a busy neighbour on a 2-core machine then costs little); recorded in the run's "
             "environment [default: auto]")
_option("--history-images", default=20, type=_count(0), metavar="N",
        help="keep the combo images (PNGs, content-addressed under images/: an image equal to an earlier run's "
             "is stored once) of the newest N runs in --history-dir and delete, after the run, the images no newer "
             "run names (once an hour old); their records stay. 0 keeps none [default: 20]")
_option("--allow-empty", action="store_true",
        help="exit 0 when no combo was measured (every selected combo skipped: no CUDA device, no real "
             "checkpoints, ...). Without it such a run fails: a gate that measured nothing has passed "
             "nothing")
_option("--write-baselines", action="store_true",
        help="measure and write baselines for this GPU class (under --baselines-dir) instead of "
             "asserting against them")




RUN_ONLY = ("write_baselines", "allow_empty")  # options of a pytest run that no command shares


def add(parser: pytest.Parser) -> None:
    """Declare every fluxgate option (pytest's `pytest_addoption`)."""
    group = parser.getgroup("fluxgate", "fluxgate: model x precision perf gate")
    for option in OPTIONS.values():
        group.addoption(*option.flags, **option.attrs)


def declare(parser: argparse.ArgumentParser, *dests: str, **changes: dict[str, Any]) -> None:
    """Add the options named by `dests` (e.g. "history_dir") to a command's parser, each declared as for pytest;
    `changes` overrides attributes of one, e.g. `history_dir={"default": None}`. Raises KeyError for an unknown
    option."""
    for dest in dests:
        option = OPTIONS[dest]
        parser.add_argument(*option.flags, **{**option.attrs, **changes.get(dest, {})})


def cpu_threads(option: str) -> int:
    """torch's intra-op threads on a CPU device: the option's number, or for 'auto' half the cores this process may
    use (at least 1). On a shared 2-core CI machine two threads lose 4-6x to one busy process (each step waits for
    the preempted thread), one thread keeps most of its speed; the count is recorded as environment.cpu_threads."""
    if option != "auto":
        return int(option)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // 2)


def fraction(option: str, value: str) -> float | None:
    """A percentage option as a fraction; None for 'auto'."""
    if value == "auto":
        return None
    try:
        percent = float(value.removesuffix("%"))
    except ValueError:
        percent = float("nan")
    if not 0 < percent < float("inf"):
        raise ValueError(f"{option} {value!r}: expected 'auto' or a percentage > 0, e.g. 2 or 50%")
    return percent / 100
