"""fluxgate's hooks: what a team's conftest.py, pytest plugin or `fluxgate.hooks` entry point may change without
forking (pytest-benchmark's `hookspec.py`, pyperf's `pyperf.hook` group). `plugin.pytest_addhooks` adds them to
pytest's plugin manager; modules named by a `fluxgate.hooks` entry point are registered there too, and in each A/B
worker (which runs no pytest), so a packaged hook changes both kinds of run. Implement one as a plain function of
that name (`def pytest_fluxgate_prepare_pipeline(pipe, combo, device): ...`; the `pytest_` prefix is what pytest
recognises in a conftest.py, as pytest-benchmark's `pytest_benchmark_*` hooks) or with `@pytest.hookimpl`.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("pytest")
# The environment key under which a run records the union of `pytest_fluxgate_comparable_fields` (`judging.window` reads it).
COMPARABLE_FIELDS = "comparable_fields"


@hookspec
def pytest_fluxgate_prepare_pipeline(pipe, combo, device) -> None:
    """Change a combo's pipeline before it is warmed up and timed: an attention backend, a step cache, fused LoRA
    weights, `pipe.transformer.set_attention_backend(...)`. Called once per combo (per side of an A/B run), after the
    denoiser is loaded in its precision and wrapped for its runtime, before compilation and the warm-up image.

    `pipe`: the diffusers pipeline (its denoiser is `pipe.<ModelSpec.denoiser>`); `combo`: the `fluxgate.matrix.Combo`;
    `device`: the `torch.device`. Change `pipe` in place; the return value is ignored. An exception fails the combo's
    item (the others run on)."""


@hookspec
def pytest_fluxgate_environment(environment: dict, device) -> None:
    """Add fields to the run's environment fingerprint (stored on every record), e.g. `environment["attention"] =
    "sage"` or a kernel library's version. Called once per run when the gate opens. Values must be JSON-serialisable;
    fluxgate's own keys (`torch`, `device_name`, ...) may not be replaced."""


@hookspec
def pytest_fluxgate_comparable_fields() -> list[str]:
    """Environment fields (top-level keys, typically ones `pytest_fluxgate_environment` adds) that must be equal for two runs
    to be compared by the history gate: a run whose value differs is "not comparable", naming the field. Each
    implementation returns a list of names; the run records their union (`environment["comparable_fields"]`), so
    readers of the history judge by what the run declared, without the hook."""
