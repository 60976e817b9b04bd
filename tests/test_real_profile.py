"""The real profile on CPU: a local pipeline folder and checkpoint files named in a models.toml, including a
ComfyUI scaled-fp8 file, loaded and run end to end; missing files skip their combo with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS
from fluxgate.weights import identify, layouts, tiny

ROOT = Path(__file__).resolve().parents[1]


def comfy_scaled_fp8(fp8r_file: Path, target: Path) -> None:
    """Rewrite an fp8r file the way ComfyUI stores scaled fp8: one scale per tensor plus the marker key."""
    tensors = {}
    for key, value in load_file(str(fp8r_file)).items():
        if key.endswith(".weight_scale"):
            prefix = key.removesuffix(".weight_scale")
            weight = load_file(str(fp8r_file))[f"{prefix}.weight"]
            scale = value.max()  # one scale: requantize the rows onto it
            tensors[f"{prefix}.weight"] = (weight.float() * value[:, None] / scale).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.scale_weight"] = scale.reshape(1)
        elif key not in tensors:
            tensors[key] = value
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(target))


def test_comfy_scaled_fp8_becomes_per_row_fp8r_scales(tmp_path):
    model = MODELS["flux1-dev"]
    fp8r = tiny.ensure(model, PRECISIONS["fp8-scaled"], 0, tmp_path / "cache").path
    comfy_scaled_fp8(fp8r, tmp_path / "comfy.safetensors")

    found = identify.identify(tmp_path / "comfy.safetensors")
    assert (found.precision, found.layout) == ("fp8-scaled", "comfy-scaled-fp8")
    assert identify.identify(fp8r).layout == "bfl-fp8"
    state, note = layouts.adapt(found, tmp_path / "comfy.safetensors")
    scales = [key for key in state if key.endswith(".weight_scale")]
    assert scales and "scaled_fp8" not in state and not any(key.endswith(".scale_weight") for key in state)
    assert note == "comfy-scaled-fp8 -> fp8r: 7 per-tensor scales repeated per row -> from_single_file" or \
        note.startswith("comfy-scaled-fp8 -> fp8r: ")
    for key in scales:
        assert state[key].shape == (state[key.replace(".weight_scale", ".weight")].shape[0],)


@pytest.fixture(scope="module")
def real_setup(tmp_path_factory) -> Path:
    """A local flux1-dev pipeline folder plus bf16 and ComfyUI fp8 files, as a user would have them."""
    root = tmp_path_factory.mktemp("real")
    model = MODELS["flux1-dev"]
    bf16 = tiny.ensure(model, PRECISIONS["bf16"], 0, root / "cache")
    fp8r = tiny.ensure(model, PRECISIONS["fp8-scaled"], 0, root / "cache")
    pipe = model.builder.pipeline_class(transformer=model.tiny_transformer(0), **model.builder.tiny_components(0))
    pipe.save_pretrained(root / "pipeline")
    comfy_scaled_fp8(fp8r.path, root / "comfy.safetensors")
    (root / "models.toml").write_text(f"""
["flux1-dev"]
pipeline = "{root / 'pipeline'}"
["flux1-dev".checkpoints]
bf16 = {{ path = "{bf16.path}" }}
fp8-scaled = {{ path = "{root / 'comfy.safetensors'}" }}
gguf-q8_0 = {{ path = "{root / 'missing.gguf'}", source = "the moon" }}
""")
    return root


@pytest.mark.subprocess
def test_real_profile_runs_local_files_and_skips_missing_ones(real_setup):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "perf", "-q", "-rs", "--profile", "real", "--device", "cpu",
         "--models", "flux1-dev", "--models-file", str(real_setup / "models.toml"), "--steps", "2",
         "--baselines-dir", str(real_setup / "baselines"), "--history-dir", str(real_setup / "history"),
         "--write-baselines", "-m", "not faults"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)

    assert "2 passed, 2 skipped" in done.stdout, done.stdout[-3000:]
    assert f"{real_setup / 'missing.gguf'} not found; get it from the moon" in done.stdout
    assert "flux1-dev[nvfp4]: no checkpoint named in" in done.stdout
    history = next((real_setup / "history").glob("*.json")).read_text()
    assert "comfy-scaled-fp8 -> fp8r: " in history and '"layout": "comfy-scaled-fp8"' in history


def test_scripts_written_against_fluxgate_0_1_still_reach_the_real_source_and_builder_names():
    # ../shared/cases and users' scripts call fluxgate.sources.RealSource and MODELS[...].module.PIPELINE_CLASS
    from fluxgate import sources
    from fluxgate.models import MODELS
    from fluxgate.weights.real import RealSource

    assert sources.RealSource is RealSource
    module = MODELS["flux2-dev"].module
    assert module.PIPELINE_CLASS is MODELS["flux2-dev"].builder.pipeline_class
    assert module.tiny_components == MODELS["flux2-dev"].builder.tiny_components
