"""The runtime axis: a compiled combo measures its compile time apart from its timed steps and makes the same image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxgate import defaults
from fluxgate.judging import similarity
from fluxgate.matrix import Combo
from fluxgate.measuring.runner import Inputs, Runner
from fluxgate.weights.tiny import TinySource

pytestmark = pytest.mark.slow  # torch.compile on the CPU: ~30-40 s

ROOT = Path(__file__).resolve().parents[1]


def test_a_compiled_combo_reports_compile_time_outside_its_timed_steps_and_keeps_the_image(tmp_path):
    inputs = Inputs.from_file(defaults.PACKAGED["prompts"])
    runner = Runner("tiny", torch.device("cpu"), TinySource(tmp_path, inputs.seed), inputs)

    eager, _ = runner.measure(Combo("flux1-dev", "bf16"))
    compiled, _ = runner.measure(Combo("flux1-dev", "bf16", "compile"))

    assert eager.compile_s is None
    # Compiling the repeated blocks takes seconds; a timed step of the tiny model takes milliseconds, so a compile
    # that leaked into the timed steps would show as a step as long as the compile.
    assert compiled.compile_s > 1.0
    assert max(compiled.step_times_s) < compiled.compile_s / 10
    assert len(compiled.step_times_s) == len(eager.step_times_s)
    close = similarity.compare(compiled.image, eager.image)
    assert close.ms_ssim > 0.99, close  # inductor reorders float math; the image must not change visibly
