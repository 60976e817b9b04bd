"""Extending fluxgate from outside its repository: a conftest.py's hooks reach the run, a broken entry point of a
team's package stops pytest with one line naming it (exit 4), never a traceback, and a model family whose diffusers
class has no single-file loader (PixArt-Sigma, tests/pixart_support.py) runs. The example package's own run in a
fresh venv is tests/test_example_package.py."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fluxgate
import pixart_support
from fluxgate.errors import FixtureError
from fluxgate.matrix import Combo
from fluxgate.models.loading import has_single_file_loader, load_state_dict_into_class
from fluxgate.weights.loading import load_transformer, loader_name
from fluxgate.weights.sources import load_denoiser
from fluxgate.weights.tiny import TinySource, ensure

SRC = str(Path(fluxgate.__file__).resolve().parents[1])


def test_a_conftests_fluxgate_hooks_reach_the_runs_environment(pytester):
    # pytest's own plugin manager takes functions named pytest_*: fluxgate's hooks are named so.
    pytester.makeconftest("""
        import pytest

        pytest_plugins = ["fluxgate.plugin"]

        def pytest_fluxgate_environment(environment, device):
            environment["team_attention"] = "sage"

        @pytest.hookimpl
        def pytest_fluxgate_comparable_fields():
            return ["team_attention"]
    """)
    pytester.makepyfile(test_hooks="""
        from fluxgate import hooks

        def test_environment(pytestconfig):
            hook = pytestconfig.hook
            environment = hooks.extended_environment(hook, {"torch": "2.13.0"}, None)
            assert environment == {"torch": "2.13.0", "team_attention": "sage", "comparable_fields": ["team_attention"]}
    """)
    pytester.runpytest("test_hooks.py").assert_outcomes(passed=1)


@pytest.fixture
def broken_team(tmp_path):
    """A folder holding an installed distribution `broken-team` (its dist-info only, as pip writes it) whose entry
    point names a module that does not exist, and a repository with one matrix test."""
    site = tmp_path / "site"
    info = site / "broken_team-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-team\nVersion: 0.1\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "test_matrix.py").write_text("from fluxgate.plugin import matrix_test\n\n@matrix_test\n"
                                         "def test_combo(combo):\n    pass\n")

    def run(group: str, target: str) -> subprocess.CompletedProcess:
        (info / "entry_points.txt").write_text(f"[{group}]\nteam = {target}\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), SRC])}
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    return run


@pytest.mark.parametrize("group, target", [("fluxgate.models", "team_models.specs:MODELS"),
                                           ("fluxgate.precisions", "team_precisions:PRECISIONS"),
                                           ("fluxgate.hooks", "team_hooks")])
def test_a_broken_entry_point_is_one_line_naming_it_and_exit_4(broken_team, group, target):
    done = broken_team(group, target)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    assert errors == [f"ERROR: broken-team (entry point team): {target}: cannot import {target.split(':')[0]} "
                      f"(ModuleNotFoundError: No module named '{target.split('.')[0].split(':')[0]}')"], output[-3000:]
    assert "Traceback" not in output and "RegistryError" not in output


@pytest.fixture
def pixart(monkeypatch):
    """tests/pixart_support.py's model and precision registered in this process after the built-ins, as its entry
    points would register them; the registries are read again after the test."""
    from fluxgate import registry
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS

    for group, target in ((registry.MODELS_GROUP, "pixart_support:MODELS"),
                          (registry.PRECISIONS_GROUP, "pixart_support:PRECISIONS")):
        monkeypatch.setitem(registry.BUILTINS, group, (*registry.BUILTINS[group], target))
    MODELS.forget(), PRECISIONS.forget()
    yield MODELS[pixart_support.NAME]
    monkeypatch.undo()
    MODELS.forget(), PRECISIONS.forget()


CPU = torch.device("cpu")


def test_a_model_without_a_single_file_loader_runs_its_tiny_combos_to_images(pixart, pytester, tmp_path):
    assert not has_single_file_loader(pixart.builder.transformer_class)
    pytester.makepyfile(test_perf="""
        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo, judge):
            judge(combo)
    """)
    baselines = tmp_path / "baselines"
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "--device", "cpu", "--profile", "tiny",
                                "--models", pixart.name, "--precisions", f"bf16,fp8-scaled,{pixart_support.INT8_ROWS}",
                                "--write-baselines", f"--baselines-dir={baselines}",
                                f"--history-dir={tmp_path / 'history'}", f"--fixture-cache={tmp_path / 'cache'}")
    output = result.stdout.str() + result.stderr.str()
    # bf16 and the load-then-transform backend (which loads the bf16 file) are measured and judged
    result.assert_outcomes(passed=2, skipped=1)
    # a format that needs diffusers' single-file converters: one line naming the class and why, no AttributeError
    assert "cannot load as fp8-scaled: PixArtTransformer2DModel has no diffusers single-file loader" in output
    assert "AttributeError" not in output and "Traceback" not in output
    (reference,) = (baselines / "cpu" / pixart.name).glob("*.png")
    with Image.open(reference) as image:
        assert image.size == (256, 256) and np.asarray(image).std() > 10  # a made image, not a flat one


def test_its_bf16_file_and_a_load_then_transform_backend_load_by_state_dict(pixart, tmp_path):
    source = TinySource(tmp_path, seed=0)
    bf16, origin = load_denoiser(source, Combo(pixart.name, "bf16"), CPU)
    assert origin["path"] == "tiny checkpoint file -> load_state_dict" and not bf16.training
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {t.device.type for t in [*bf16.parameters(), *bf16.buffers()]} == {"cpu"}  # nothing left on meta
    stored = load_file(str(ensure(pixart, Combo(pixart.name, "bf16").precision_spec, 0, tmp_path).path))
    assert all(torch.equal(stored[key], value) for key, value in bf16.state_dict().items())

    rounded, origin = load_denoiser(source, Combo(pixart.name, pixart_support.INT8_ROWS), CPU)
    assert origin["transform"].startswith(f"bf16 -> {pixart_support.INT8_ROWS}")
    weight, reference = (m.transformer_blocks[0].ff.net[2].weight.detach().float() for m in (rounded, bf16))
    tolerance = 0.01 * float(reference.abs().max())  # int8 levels: within a step of 1/127 of the row's largest
    assert not torch.equal(weight, reference) and torch.allclose(weight, reference, atol=tolerance)


def test_its_synthetic_state_dict_is_assigned_without_a_copy(pixart):
    from fluxgate.precisions import PRECISIONS
    from fluxgate.weights.synthetic import load, random_state_dict

    config = pixart.builder.tiny_transformer_config
    state_dict = random_state_dict(pixart, PRECISIONS["bf16"], CPU, 0, config)
    transformer = load(pixart, PRECISIONS["bf16"], state_dict, CPU, config)
    assert transformer.proj_out.weight.data_ptr() == state_dict["proj_out.weight"].data_ptr()


def test_a_file_in_another_key_layout_is_one_line_naming_its_keys(pixart, tmp_path):
    from fluxgate.precisions import PRECISIONS

    checkpoint = ensure(pixart, PRECISIONS["bf16"], 0, tmp_path)
    renamed = {f"model.diffusion_model.{key}": value for key, value in load_file(str(checkpoint.path)).items()}
    save_file(renamed, str(tmp_path / "comfy.safetensors"))
    with pytest.raises(FixtureError) as error:
        load_transformer(PRECISIONS["bf16"], pixart.builder, tmp_path / "comfy.safetensors", checkpoint.config_dir,
                         CPU)
    message = str(error.value)
    assert "\n" not in message and "without diffusers' single-file converters, so the checkpoint must hold " \
        "diffusers' key names" in message and "unexpected" in message and "model.diffusion_model." in message


def test_a_builders_own_load_transformer_is_what_loads_its_denoiser(pixart, tmp_path):
    from fluxgate.precisions import PRECISIONS

    calls = []

    class OwnLoader(pixart_support.PixArtSigma):
        def load_transformer(self, checkpoint, config, *, device, dtype, quantization_config=None, subfolder=None):
            calls.append(type(quantization_config).__name__)  # a team's loader gets the format's config to use
            bf16 = ensure(pixart, PRECISIONS["bf16"], 0, tmp_path)
            return load_state_dict_into_class(self.transformer_class, bf16.path, config, device=device, dtype=dtype)

    checkpoint = ensure(pixart, PRECISIONS["fp8-scaled"], 0, tmp_path)
    loaded = load_transformer(PRECISIONS["fp8-scaled"], OwnLoader(), checkpoint.path, checkpoint.config_dir, CPU)
    assert isinstance(loaded, pixart_support.PixArtTransformer2DModel) and calls == ["BFLQuantizationConfig"]
    assert loader_name(OwnLoader()) == "OwnLoader.load_transformer"
    assert loader_name(pixart.builder) == "load_state_dict"
