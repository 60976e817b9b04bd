"""examples/sdxl-torchao installed into a fresh venv beside fluxgate, as a team's repository would use it: its model,
precision and hook arrive through entry points alone (non-editable installs, so they come from the installed
metadata), and its tiny matrix runs from its own folder against its own baselines.

Marked `external` (`-m "not external"` leaves it out): it builds a venv and installs torch, fluxgate and the example
with pip (the index pip is configured with; FLUXGATE_TORCH overrides `torch==2.13.0`, as in the noxfile), a few
minutes with a warm pip cache.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sdxl-torchao"
TORCH = os.environ.get("FLUXGATE_TORCH", "torch==2.13.0")
MATRIX = ("--device", "cpu", "--profile", "tiny", "--models", "sdxl-base")

pytestmark = pytest.mark.external


def _run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` without this process's PYTHONPATH (which puts this checkout's src/ first) or venv, plus `env`."""
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env={**clean, **(env or {})})
    done.output = done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict:
    """A fresh venv (no system site-packages: the outer fluxgate must stay invisible) with torch, fluxgate from this
    checkout and the example package with torchao; and a copy of the example's folder (its tests and baselines) to
    run from, so runs write nothing into the checkout."""
    root = tmp_path_factory.mktemp("team")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    folder = root / "sdxl-torchao"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("build", "*.egg-info", ".fluxgate", "__pycache__"))
    pip = [python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    for packages in (shlex.split(TORCH), [str(REPO), f"{folder}[torchao]"]):
        done = _run([*pip, *packages], root)
        assert done.returncode == 0, done.output[-3000:]
    return {"python": python, "folder": folder, "cache": root / "fixtures"}


def _pytest(team: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return _run([team["python"], "-m", "pytest", *args], team["folder"], env)


def test_the_outer_fluxgate_is_not_what_the_venv_imports(team):
    done = _run([team["python"], "-c", "import fluxgate; print(fluxgate.__file__)"], team["folder"])
    assert done.returncode == 0 and "site-packages" in done.stdout and str(REPO / "src") not in done.stdout


def test_the_example_tiny_matrix_runs_from_its_folder_and_passes_against_its_baselines(team):
    done = _pytest(team, *MATRIX, f"--fixture-cache={team['cache']}", "-v", "-rs")
    assert done.returncode == 0, done.output[-4000:]
    assert "tests/test_matrix.py::sdxl-base[bf16] PASSED" in done.output
    # torchao 0.18 quantizes float8 only for CUDA compute capability 8.9+ (MI300+, XPU): a skip naming why
    assert "tests/test_matrix.py::sdxl-base[torchao-fp8-row] SKIPPED" in done.output
    assert re.search(r"precision torchao-fp8-row cannot run on cpu: .*CUDA compute capability 8\.9", done.output)
    # judged (not written) against the example's own baselines, the BF16 image its reference's: bit for bit on the
    # CPU that made it, within float rounding on another (this VM's CPU made it at MS-SSIM 0.9998, 50 dB)
    assert f"(baselines: {team['folder'] / 'baselines' / 'cpu'})" in done.output
    row = re.search(r"sdxl-base\[bf16\]\s+PASS\s+\S+\s+\S+\s+\S+\s+(\d\.\d{4})\s+(inf|\d+\.\d+)\s", done.output)
    assert row and float(row[1]) >= 0.999 and float(row[2]) >= 40, done.output[-3000:]
    history = sorted((team["folder"] / ".fluxgate" / "history").glob("*.json"))
    run = json.loads(history[-1].read_text())
    # the packaged hook's environment field, declared comparable
    assert run["environment"]["sdxl_attention"] == "sdpa"
    assert "sdxl_attention" in run["environment"]["comparable_fields"]
    outcomes = {record["combo"]: record["outcome"] for record in run["records"]}
    assert outcomes["sdxl-base[bf16]"] == "passed", outcomes


def test_the_packaged_pipeline_hook_runs_before_timing(team):
    # An attention choice the hook refuses: the combo's item fails with the hook's message, so the hook ran on it.
    done = _pytest(team, *MATRIX, "--precisions", "bf16", f"--fixture-cache={team['cache']}",
                   "--history-dir=.fluxgate/refused", env={"FLUXGATE_SDXL_ATTENTION": "flash"})
    assert done.returncode == 1, done.output[-4000:]
    assert "$FLUXGATE_SDXL_ATTENTION='flash': choose sdpa or classic" in done.output


def test_the_example_marks_select_its_combos_and_its_backend_reaches_fluxgates_models(team):
    done = _pytest(team, "--collect-only", "-q", "-m", "sdxl_base")
    assert done.returncode == 0, done.output[-3000:]
    assert _items(done) == {"sdxl-base[bf16]", "sdxl-base[torchao-fp8-row]"}

    done = _pytest(team, "--collect-only", "-q", "-m", "torchao_fp8_row")
    assert done.returncode == 0, done.output[-3000:]
    assert _items(done) == {f"{model}[torchao-fp8-row]" for model in
                            ("flux1-dev", "flux1-kontext-dev", "flux2-dev", "z-image-turbo", "sdxl-base")}


def _items(done: subprocess.CompletedProcess) -> set[str]:
    return {line.split("::", 1)[1] for line in done.stdout.splitlines() if line.startswith("tests/test_matrix.py::")}


def test_help_lists_fluxgates_options_unchanged_and_the_examples_option(team):
    inside = _pytest(team, "--help")
    outside = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert inside.returncode == outside.returncode == 0, inside.output[-3000:] + outside.stderr[-3000:]
    assert _fluxgate_options(inside.stdout) == _fluxgate_options(outside.stdout) | {"--sdxl-attention"}
    assert "attention processor of UNet denoisers (fluxgate-sdxl-example)" in " ".join(inside.stdout.split())


def _fluxgate_options(help_text: str) -> set[str]:
    """The option names of the "fluxgate" group of `pytest --help`."""
    section = help_text.split("\nfluxgate:", 1)[1]
    section = re.split(r"\n\S", section, maxsplit=1)[0]  # up to the next group's heading
    return set(re.findall(r"^\s{2}(--[a-z][\w-]*)", section, flags=re.MULTILINE))
