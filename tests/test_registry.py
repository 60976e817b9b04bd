"""The open registries and hooks: models, precisions and rules from entry points, the built-ins loaded the same way,
hooks a team's conftest or package implements, and a plugin that costs nothing until a fluxgate item runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fluxgate.errors import RegistryError
from fluxgate.judging.window import fingerprint_differences
from fluxgate.registry import BUILTIN_ORIGIN, Registry

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = {"torch", "diffusers", "gguf", "transformers", "numpy", "scipy", "matplotlib", "PIL", "safetensors"}
TEAM_SPECS = '''
from fluxgate.models import ImageSettings, ModelSpec
from fluxgate.models.builtin import MODELS
from dataclasses import replace

_zimage = next(spec for spec in MODELS if spec.name == "z-image-turbo")
TEAM_MODEL = replace(_zimage, name="team-zimage", precisions=("bf16",), description="a team's model")
'''


def _distribution(site: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """A distribution importlib.metadata finds on `site` (a dist-info folder, as pip writes it) with `modules`."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in entry_points.items()))
    for module, text in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(text))


def _run(args: list[str], site: Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_builtins_are_registered_like_any_entry_point_and_say_who_registered_them():
    from fluxgate.judging.rules import RULES
    from fluxgate.models import MODELS
    from fluxgate.precisions import PRECISIONS

    assert list(MODELS) == ["flux1-dev", "flux1-kontext-dev", "flux2-dev", "z-image-turbo"]
    assert list(PRECISIONS) == ["bf16", "fp8-scaled", "gguf-q8_0", "nvfp4"]
    assert "rank-test" in RULES
    assert {MODELS.origin(name) for name in MODELS} == {PRECISIONS.origin(name) for name in PRECISIONS} == \
        {BUILTIN_ORIGIN}


def test_a_precision_spec_states_the_block_size_its_format_quantizes_in():
    from diffusers.quantizers.bfl.utils import NVFP4_BLOCK

    from fluxgate.precisions import PRECISIONS
    from fluxgate.precisions.gguf_q8_0 import Q8_0_BLOCK

    assert PRECISIONS["nvfp4"].block_size == NVFP4_BLOCK and PRECISIONS["gguf-q8_0"].block_size == Q8_0_BLOCK


def test_a_name_registered_twice_is_one_error_naming_both(monkeypatch):
    from fluxgate import registry
    from fluxgate.models import ModelSpec

    monkeypatch.setitem(registry.BUILTINS, "test.models", ("fluxgate.models.builtin:MODELS",
                                                           "fluxgate.models.builtin:MODELS"))
    with pytest.raises(RegistryError, match="'flux1-dev' is registered twice: by fluxgate and by fluxgate"):
        list(Registry("test.models", ModelSpec, "model"))


def test_an_entry_point_that_is_no_spec_is_one_error_naming_it(monkeypatch):
    from fluxgate import registry
    from fluxgate.models import ModelSpec

    monkeypatch.setitem(registry.BUILTINS, "test.models", ("fluxgate.precisions.builtin:PRECISIONS",))
    with pytest.raises(RegistryError, match=r"fluxgate.precisions.builtin:PRECISIONS \(fluxgate\): PrecisionSpec "
                                            r"is not a fluxgate.models.ModelSpec"):
        list(Registry("test.models", ModelSpec, "model"))


def test_loading_the_plugin_imports_nothing_heavy_and_sets_no_environment_variable():
    probe = ("import json, os, sys; before = dict(os.environ); import fluxgate.plugin, fluxgate.options; "
             "print(json.dumps([sorted({m.split('.')[0] for m in sys.modules}), "
             "sorted(k for k in os.environ if os.environ.get(k) != before.get(k))]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    modules, changed = json.loads(done.stdout)
    assert not HEAVY & set(modules), sorted(HEAVY & set(modules))
    assert changed == []


@pytest.mark.subprocess
def test_a_team_package_adds_a_model_whose_items_marks_and_listing_follow(tmp_path):
    site = tmp_path / "site"
    _distribution(site, "team-ext", {"fluxgate.models": {"zimage": "team_specs:TEAM_MODEL"}},
                  {"team_specs": TEAM_SPECS})
    (tmp_path / "test_perf.py").write_text("from fluxgate.plugin import matrix_test\n\n\n@matrix_test\n"
                                           "def test_combo(combo, judge):\n    judge(combo)\n")
    listed = _run(["-m", "fluxgate.cli", "list"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "team-zimage" in listed.stdout and "precisions bf16  [team-ext (entry point zimage)]" in listed.stdout
    collected = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--device", "cpu",
                      "-m", "team_zimage", "test_perf.py"], site, tmp_path)
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert "test_perf.py::team-zimage[bf16]" in collected.stdout
    assert "team-zimage[fp8-scaled]" not in collected.stdout  # the model runs in bf16 only


@pytest.mark.subprocess
def test_a_broken_entry_point_stops_the_run_with_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    _distribution(site, "team-broken", {"fluxgate.precisions": {"fp4": "team_missing:SPEC"}}, {})
    (tmp_path / "test_perf.py").write_text("from fluxgate.plugin import matrix_test\n\n\n@matrix_test\n"
                                           "def test_combo(combo, judge):\n    judge(combo)\n")
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cpu", "test_perf.py"], site, tmp_path)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert "team_missing:SPEC: cannot import team_missing" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    listed = _run(["-m", "fluxgate.cli", "list"], site, tmp_path)
    assert listed.returncode == 4 and "team_missing" in listed.stderr


@pytest.mark.subprocess
def test_a_team_without_baselines_gets_one_line_naming_the_command_that_writes_them(tmp_path):
    (tmp_path / "test_perf.py").write_text("from fluxgate.plugin import matrix_test\n\n\n@matrix_test\n"
                                           "def test_combo(combo, judge):\n    judge(combo)\n")
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cpu", "--models", "z-image-turbo",
                 "test_perf.py"], tmp_path / "none", tmp_path)
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no baselines for GPU class 'cpu'" in done.stdout + done.stderr and "--write-baselines" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_hooks_change_the_pipeline_and_add_environment_and_comparability_fields(pytester):
    pytester.makeconftest("""
        from pathlib import Path

        def pytest_fluxgate_prepare_pipeline(pipe, combo, device):
            with open(Path(__file__).parent / "prepared.txt", "a") as calls:
                calls.write(f"{combo.id} {type(pipe).__name__} {device}\\n")

        def pytest_fluxgate_environment(environment, device):
            environment["attention"] = "team-sdpa"

        def pytest_fluxgate_comparable_fields():
            return ["attention"]
    """)
    pytester.makepyfile(test_perf="""
        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo, judge):
            judge(combo)
    """)
    root = Path(__file__).resolve().parents[1]
    result = pytester.runpytest("-p", "no:cacheprovider", "--device", "cpu", "--models", "z-image-turbo",
                                "--precisions", "bf16", "--baselines-dir", str(root / "baselines"),
                                "--history-dir", str(pytester.path / "history"), "--history-gate", "off")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "prepared.txt").read_text() == "z-image-turbo[bf16] ZImagePipeline cpu\n"
    run = json.loads(next((pytester.path / "history").glob("*.json")).read_text())
    environment = run["environment"]
    assert environment["attention"] == "team-sdpa" and environment["comparable_fields"] == ["attention"]


def test_a_declared_comparable_field_makes_runs_that_differ_in_it_not_comparable():
    window = {"torch": "2.11", "attention": "sdpa", "comparable_fields": ["attention"]}
    candidate = {"torch": "2.11", "attention": "sage", "comparable_fields": ["attention"]}
    assert fingerprint_differences(window, candidate) == ["attention sdpa -> sage"]
    assert fingerprint_differences(window, {**candidate, "attention": "sdpa"}) == []
    assert fingerprint_differences(window, candidate, ignore_fields=["attention"]) == []


def test_a_hook_may_not_replace_fluxgates_own_environment_fields():
    from types import SimpleNamespace

    from fluxgate.hooks import extended_environment

    hook = SimpleNamespace(pytest_fluxgate_environment=lambda environment, device: environment.update(torch="mine"),
                           pytest_fluxgate_comparable_fields=lambda: [])
    with pytest.raises(RegistryError, match="sets fluxgate's own field"):
        extended_environment(hook, {"torch": "2.11"}, "cpu")
