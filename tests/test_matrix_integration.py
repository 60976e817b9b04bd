"""The tiny matrix end to end through pytest, as a user runs it: judged against a copy of baselines/cpu."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]


def run_matrix(tmp_path: Path, baselines: Path, *args: str) -> subprocess.CompletedProcess:
    """`pytest perf` in a subprocess with its own history dir; the fixture cache is the shared one."""
    command = [sys.executable, "-m", "pytest", "perf", "-q", "--device", "cpu", "--baselines-dir", str(baselines),
               "--history-dir", str(tmp_path / "history"), "-p", "no:warnings", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture
def baselines_copy(tmp_path: Path) -> Path:
    target = tmp_path / "baselines"
    shutil.copytree(ROOT / "baselines" / "cpu", target / "cpu")
    return target


def test_replaced_reference_image_fails_only_that_models_similarity(tmp_path, baselines_copy):
    reference = baselines_copy / "cpu" / "z-image-turbo" / "fox.png"  # one case of three
    with Image.open(reference) as image:
        size = image.size
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(reference)

    done = run_matrix(tmp_path, baselines_copy, "--models", "z-image-turbo,flux1-dev", "--precisions", "bf16,nvfp4")

    failed = sorted(line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith("FAILED"))
    assert failed == ["perf/test_matrix.py::z-image-turbo[bf16]", "perf/test_matrix.py::z-image-turbo[nvfp4]"], \
        done.stdout[-3000:]
    assert "MS-SSIM" in done.stdout and f"{reference.parent}/" in done.stdout and "worst fox" in done.stdout
    assert "2 failed, 2 passed" in done.stdout


def test_history_records_every_combo_with_its_outcome(tmp_path, baselines_copy):
    run_matrix(tmp_path, baselines_copy, "--models", "flux1-dev", "--precisions", "bf16,gguf-q8_0")

    (history_file,) = (tmp_path / "history").glob("*.json")
    document = json.loads(history_file.read_text())
    assert [r["combo"] for r in document["records"]] == ["flux1-dev[bf16]", "flux1-dev[gguf-q8_0]"]
    assert all(r["outcome"] == "passed" and r["metrics"]["it_s"] > 0 for r in document["records"])
    assert document["environment"]["torch"] and document["environment"]["device_type"] == "cpu"
