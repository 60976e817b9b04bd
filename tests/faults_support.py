"""What tests/test_faults.py (the end-to-end runs) and tests/test_fault_units.py (the in-process faults) share: the
repository's paths, the prompts, the shared fixture cache, a flux1-dev linear to damage, a copy of the CPU baselines
without speed and memory limits (also used by tests/test_history_gate.py), and the pytester project with the real
matrix test."""

from __future__ import annotations

import os
import shutil
import tomllib
import warnings
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from fluxgate import defaults
from fluxgate.judging import baselines
from fluxgate.measuring.runner import Inputs
from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.storing.local import LocalFolderStore
from fluxgate.storing.record import Record
from fluxgate.weights import tiny

ROOT = Path(__file__).resolve().parents[1]
MATRIX = "perf/test_matrix.py"
SHARED_CACHE = Path(os.environ.get("FLUXGATE_CACHE", ROOT / ".fluxgate-cache")).resolve()
INPUTS = Inputs.from_file(defaults.PACKAGED["prompts"])
CPU = torch.device("cpu")
FLUX1_LINEAR = "single_transformer_blocks.0.attn.to_k.weight"


def copy_baselines(target: Path) -> Path:
    """A private copy of baselines/cpu (the root to pass as --baselines-dir) without speed and memory limits: what
    is under test with it is how a run treats broken inputs or judges history, not how fast a shared 2-core machine
    is today."""
    shutil.copytree(ROOT / "baselines" / "cpu", target / "cpu")
    path = target / "cpu" / baselines.THRESHOLDS_FILE
    table = tomllib.loads(path.read_text())
    for model in MODELS:
        for entry in table.get(model, {}).values():
            entry.update(min_it_s=0.0, max_peak_mem_gib=1e6)
    path.write_text(tomli_w.dumps(table))
    return target


def bf16_weights(cache: Path, model: str) -> dict[str, torch.Tensor]:
    spec = MODELS[model]
    return load_file(str(tiny.ensure(spec, PRECISIONS["bf16"], INPUTS.seed, cache).path))


def with_rows_cut(weights: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """`weights` with 16 output rows of `key` missing: a checkpoint whose shapes do not fit the model config."""
    return {**weights, key: weights[key][:-16].contiguous()}


def no_temporary_files(*folders: Path) -> list[Path]:
    """Whatever `atomic_write` (or anything else) left behind half-written under `folders`."""
    return [path for folder in folders for path in folder.rglob("*") if path.name.endswith(".tmp")]


def read_history_strictly(directory: Path) -> list[Record]:
    """Every history record under `directory`; a file the reader would skip with a warning fails the test instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return LocalFolderStore(directory).load()


@pytest.fixture
def plugin_project(pytester):
    """A pytester project with the real matrix test and the fluxgate plugin."""
    pytester.makeconftest('pytest_plugins = ["fluxgate.plugin"]')
    pytester.makepyfile(test_matrix=(ROOT / MATRIX).read_text())
    return pytester
