"""The fluxgate pytest plugin: one item per model x precision combo, selected by options and marks."""

from pathlib import Path

import pytest

from fluxgate.models import MODELS
from fluxgate.precisions import PRECISIONS


@pytest.fixture
def matrix(pytester):
    """A project whose one matrix test needs no `judge`, so collecting or running it builds nothing."""
    pytester.makeconftest('pytest_plugins = ["fluxgate.plugin"]')
    pytester.makepyfile(test_x="""
        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo):
            pass
    """)
    return pytester


def collected(pytester, *args) -> list[str]:
    result = pytester.runpytest("--collect-only", "-q", *args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    return [line for line in result.outlines if line.startswith("test_x.py::")]


def test_one_item_per_combo_named_like_model_bracket_precision(matrix):
    items = collected(matrix)
    assert len(items) == len(MODELS) * len(PRECISIONS) == 16
    assert "test_x.py::flux2-dev[nvfp4]" in items
    assert set(items) == {f"test_x.py::{m}[{p}]" for m in MODELS for p in PRECISIONS}


def test_precision_mark_selects_that_precision_of_every_model(matrix):
    assert sorted(collected(matrix, "-m", "nvfp4")) == sorted(f"test_x.py::{m}[nvfp4]" for m in MODELS)


def test_model_and_not_precision_marks_combine(matrix):
    assert collected(matrix, "-m", "flux2_dev and not bf16") == [
        "test_x.py::flux2-dev[fp8-scaled]", "test_x.py::flux2-dev[gguf-q8_0]", "test_x.py::flux2-dev[nvfp4]"]


def test_models_and_precisions_options_select_their_product(matrix):
    assert collected(matrix, "--models", "flux1-dev,z-image-turbo", "--precisions", "bf16") == [
        "test_x.py::flux1-dev[bf16]", "test_x.py::z-image-turbo[bf16]"]


def test_runtimes_option_adds_compiled_items_with_their_own_ids_and_mark(matrix):
    assert collected(matrix, "--models", "flux1-dev", "--precisions", "bf16,fp8-scaled", "--runtimes", "eager,compile") == [
        "test_x.py::flux1-dev[bf16]", "test_x.py::flux1-dev[bf16-compile]", "test_x.py::flux1-dev[fp8-scaled]",
        "test_x.py::flux1-dev[fp8-scaled-compile]"]
    assert collected(matrix, "--runtimes", "all", "-m", "compile and fp8_scaled and z_image_turbo") == [
        "test_x.py::z-image-turbo[fp8-scaled-compile]"]
    assert len(collected(matrix, "--runtimes", "all", "-m", "eager")) == 16


def test_unknown_runtime_is_a_usage_error(matrix):
    result = matrix.runpytest("--collect-only", "--runtimes", "jit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--runtimes: unknown name(s) jit; choose from eager, compile*"])


def test_unknown_model_is_a_usage_error_naming_the_option_and_valid_names(matrix):
    result = matrix.runpytest("--collect-only", "--models", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--models*nope*{', '.join(MODELS)}*"])


def test_markers_are_registered_so_strict_markers_accepts_them(matrix):
    assert len(collected(matrix, "--strict-markers", "-m", "gpu and flux1_dev")) == len(PRECISIONS)


def test_selected_combo_items_run_and_receive_their_combo(matrix):
    matrix.makepyfile(test_y="""
        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo, request):
            assert request.node.name == combo.id
    """)
    matrix.runpytest("test_y.py", "--precisions", "bf16,nvfp4").assert_outcomes(passed=2 * len(MODELS))


def test_help_lists_every_fluxgate_option(matrix):
    help_text = matrix.runpytest("--help").stdout.str()
    for option in ("--models", "--precisions", "--profile", "--device", "--gpu-class", "--baselines-dir",
                   "--history-dir", "--fixture-cache", "--prompts", "--steps", "--warmup-steps",
                   "--write-baselines", "--runtimes", "--compile-mode", "--vram-budget-gib", "--decision-file"):
        assert option in help_text, option
    assert "fluxgate: model x precision perf gate" in help_text


def test_pytest_benchmark_saved_runs_carry_the_fluxgate_fingerprint(matrix, monkeypatch):
    import json

    # Under `-n`, this test's own xdist worker variable would tell the inner run's pytest-benchmark that it is a
    # worker, which saves no JSON.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)

    matrix.makepyfile(test_bench="""
        def test_sum(benchmark):
            benchmark(sum, range(100))
    """)
    result = matrix.runpytest("test_bench.py", "--benchmark-json=bench.json", "--device", "cpu")
    result.assert_outcomes(passed=1)
    machine_info = json.loads((matrix.path / "bench.json").read_text())["machine_info"]
    assert machine_info["fluxgate"]["device_type"] == "cpu" and "torch" in machine_info["fluxgate"]


def test_min_speed_effect_is_a_percentage_or_auto_which_follows_the_device(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import torch

    from fluxgate.judging import compare
    from fluxgate.gate import Gate
    from fluxgate.options import fraction as _fraction
    from fluxgate.storing.local import LocalFolderStore

    assert _fraction("--min-speed-effect", "auto") is None
    assert _fraction("--min-speed-effect", "2") == pytest.approx(0.02)
    assert _fraction("--min-speed-effect", "50%") == pytest.approx(0.5)
    for bad in ("0", "-3", "nan", "inf", "two", ""):
        with pytest.raises(ValueError, match="--min-speed-effect"):
            _fraction("--min-speed-effect", bad)

    # Gate.verdicts: None ('auto') takes the device type's minimum effect, a number is used as given
    seen = {}
    monkeypatch.setattr(compare, "compare_run", lambda records, run_id, **kw: seen.update(kw) or [])

    def effect(device: str, given: float | None) -> float:
        gate = Gate.__new__(Gate)
        gate.runner = SimpleNamespace(device=torch.device(device))
        gate.history = LocalFolderStore(tmp_path).open_run("r", {})
        assert gate.verdicts(confirm=False, min_speed_effect=given) == []
        return seen["policy"].min_speed_effect

    assert effect("cpu", None) == 0.5
    assert effect("cuda", None) == 0.02
    assert effect("cpu", 0.07) == 0.07


def test_cuda_alloc_conf_sets_the_allocator_unless_the_environment_already_does(matrix, monkeypatch):
    import os

    from fluxgate.measuring import memory

    monkeypatch.setenv(memory.ALLOC_CONF_ENV, "")  # so the test's end restores this process's own setting
    monkeypatch.delenv(memory.ALLOC_CONF_ENV)
    assert memory.allocator_settings() == "default"
    assert memory.configure_allocator("default") == "default"  # torch's own: nothing set
    assert memory.ALLOC_CONF_ENV not in os.environ
    assert memory.configure_allocator(memory.DEFAULT_ALLOC_CONF) == "default"  # the option's default sets nothing
    assert memory.ALLOC_CONF_ENV not in os.environ
    assert memory.configure_allocator("expandable_segments:True") == "expandable_segments:True"
    monkeypatch.setenv(memory.ALLOC_CONF_ENV, "garbage_collection_threshold:0.8")
    with pytest.warns(UserWarning, match="--cuda-alloc-conf expandable_segments:True not applied"):
        assert memory.configure_allocator("expandable_segments:True") == "garbage_collection_threshold:0.8"

    # applied when the first combo runs (test_cupti_teardown_and_offline_defaults_are_set_when_the_first_combo_runs)
    assert "--cuda-alloc-conf" in matrix.runpytest("--help").stdout.str()


def test_a_session_without_fluxgate_items_sees_no_environment_variable_changed(matrix, monkeypatch):
    from fluxgate import environ
    from fluxgate.measuring import kernels

    for name in (kernels.CUPTI_TEARDOWN_ENV, environ.ALLOC_CONF_ENV, *environ.DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    matrix.makepyfile(test_own="""
        import os

        def test_own():
            assert not {"TEARDOWN_CUPTI", "HF_HUB_OFFLINE", "DIFFUSERS_GGUF_CUDA_KERNELS"} & set(os.environ)
    """)
    matrix.runpytest("test_own.py", "--cuda-alloc-conf", "expandable_segments:True").assert_outcomes(passed=1)


def test_cupti_teardown_and_offline_defaults_are_set_when_the_first_combo_runs(matrix, monkeypatch):
    from fluxgate import environ
    from fluxgate.measuring import kernels

    for name in (kernels.CUPTI_TEARDOWN_ENV, environ.ALLOC_CONF_ENV, *environ.DEFAULTS):
        monkeypatch.setenv(name, "")  # so the test's end restores this process's own setting
        monkeypatch.delenv(name)
    monkeypatch.setenv("DIFFUSERS_GGUF_CUDA_KERNELS", "true")  # the user's own setting wins
    matrix.makepyfile(test_teardown="""
        import os

        from fluxgate.plugin import matrix_test

        @matrix_test
        def test_combo(combo, gate):
            assert os.environ["TEARDOWN_CUPTI"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
            assert os.environ["DIFFUSERS_GGUF_CUDA_KERNELS"] == "true"
            assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    """)
    baselines = Path(__file__).resolve().parents[1] / "baselines"
    matrix.runpytest("test_teardown.py", "--device", "cpu", "--models", "z-image-turbo", "--precisions", "bf16",
                     "--baselines-dir", str(baselines), "--history-dir", str(matrix.path / "history"),
                     "--cuda-alloc-conf", "max_split_size_mb:512").assert_outcomes(passed=1)


def test_an_installed_fluxgate_gives_its_plugin_to_any_repository(tmp_path):
    # The pytest11 entry point: a team's own repository gets the options and marks without copying conftest.py.
    import subprocess
    import sys

    (tmp_path / "test_own.py").write_text("import pytest\n\n@pytest.mark.nvfp4\ndef test_own():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers",
                           "--allow-empty", str(tmp_path / "test_own.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
