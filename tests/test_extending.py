"""Extending fluxgate from outside its repository: a conftest.py's hooks reach the run, and a broken entry point of a
team's package stops pytest with one line naming it (exit 4), never a traceback. The example package's own run in a
fresh venv is tests/test_example_package.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fluxgate

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
