"""`fluxgate ab --base REF` in a team's repository (issue 26 item 4): the sides differ by that repository's tree (its
package under src/, its `fluxgate.hooks` entry points read in each side's own process), fluxgate is the same on both
sides. Runs a tiny git repository's two commits on CPU (tiny profile, one combo, a few blocks); the layout rules on
their own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxgate.ab_sides import Tree

ROOT = Path(__file__).resolve().parents[1]
FLUXGATE = ROOT / "src" / "fluxgate"

PYPROJECT = """[project]
name = "team-pipes"
version = "0.1.0"

[project.entry-points."fluxgate.hooks"]
{points}
"""
# The team's hook: records which side's code ran, in the run's environment and in a file the test reads.
HOOKS = """import os

SIDE = {side!r}


def pytest_fluxgate_environment(environment, device):
    environment["team_side"] = SIDE


def pytest_fluxgate_prepare_pipeline(pipe, combo, device):
    with open(os.environ["TEAM_PREPARED"], "a") as log:
        log.write(f"{{SIDE}} {{combo.id}} {{type(pipe).__name__}}\\n")
"""
# Only the candidate registers a second hook module: a base that read the candidate's entry points would fail to
# import it.
EXTRA = """def pytest_fluxgate_environment(environment, device):
    environment["team_extra"] = "only the candidate registers me"
"""


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=team", "-c", "user.email=team@example.com", *args],
                   check=True, capture_output=True)


def team_commit(repo: Path, side: str, points: dict[str, str], files: dict[str, str]) -> None:
    package = repo / "src" / "team_pipes"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "hooks.py").write_text(HOOKS.format(side=side))
    for name, text in files.items():
        (package / name).write_text(text)
    (repo / "pyproject.toml").write_text(PYPROJECT.format(
        points="\n".join(f'{name} = "{target}"' for name, target in points.items())))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"{side}'s hooks")


@pytest.mark.subprocess
def test_ab_in_a_team_repository_runs_each_sides_own_code_and_the_same_fluxgate(tmp_path):
    repo = tmp_path / "team"
    repo.mkdir()
    git(repo, "init", "-q")
    team_commit(repo, "base", {"team": "team_pipes.hooks"}, {})
    team_commit(repo, "candidate", {"team": "team_pipes.hooks", "extra": "team_pipes.extra"}, {"extra.py": EXTRA})
    prepared = tmp_path / "prepared.txt"
    history = tmp_path / "history"
    command = [sys.executable, "-m", "fluxgate.cli", "ab", "--base", "HEAD~1", "--models", "z-image-turbo",
               "--precisions", "bf16", "--device", "cpu", "--profile", "tiny", "--steps", "3", "--cpu-threads", "1",
               "--ab-max-blocks", "3", "--budget-s", "30", "--history-dir", str(history),
               "--fixture-cache", str(tmp_path / "cache"), "--limits", "off"]  # the team keeps no baselines
    # fluxgate comes from this checkout's src (the candidate's installed fluxgate); the team package is installed
    # nowhere: each side's worker finds it in its own tree.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "TEAM_PREPARED": str(prepared)}
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode in (0, 1), done.stdout + done.stderr[-3000:]  # 1: a CPU neighbour can make SLOW
    assert "ERROR" not in done.stdout, done.stdout
    assert any(line.startswith("z-image-turbo[bf16] ") for line in done.stdout.splitlines()), done.stdout

    runs = {}
    for path in history.glob("*.json"):
        run = json.loads(path.read_text())
        runs[run["environment"]["ab_side"]] = run
    assert set(runs) == {"base", "candidate"}
    base, candidate = runs["base"]["environment"], runs["candidate"]["environment"]
    assert base["team_side"] == "base" and candidate["team_side"] == "candidate"  # each side's own hook code
    assert "team_extra" not in base and candidate["team_extra"]  # each side's own entry points
    assert base["ab_fluxgate"] == candidate["ab_fluxgate"] == str(FLUXGATE)  # one fluxgate, the candidate's
    assert base["ab_tree"] != candidate["ab_tree"]
    assert base["git_commit"] != candidate["git_commit"]
    worktree = repo / ".fluxgate" / "ab" / "base"
    assert (worktree / "src" / "team_pipes" / "hooks.py").read_text() == HOOKS.format(side="base")
    lines = prepared.read_text().splitlines()  # pytest_fluxgate_prepare_pipeline: once per side's load of the combo
    assert sorted(lines) == ["base z-image-turbo[bf16] ZImagePipeline",
                             "candidate z-image-turbo[bf16] ZImagePipeline"], lines
    assert subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""  # the base's worktree leaves the candidate clean


def test_a_tree_imports_from_src_or_its_root_and_fluxgate_from_its_own_repository_only(tmp_path):
    installed = tmp_path / "site-packages" / "fluxgate"
    flat = tmp_path / "flat"
    (flat / "team").mkdir(parents=True)
    assert Tree(flat).import_root == flat and Tree(flat).fluxgate_dir(installed) == installed
    tree = Tree(ROOT)
    assert tree.import_root == ROOT / "src" and tree.own_fluxgate and tree.fluxgate_dir(installed) == FLUXGATE


def test_a_sides_entry_points_come_from_its_own_pyproject(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.format(points='team = "team_pipes.hooks"'))
    paths = Tree(tmp_path).worker_paths(tmp_path / "site", "base")
    assert paths == [str(tmp_path / "site"), str(tmp_path / "src")]
    from importlib.metadata import distributions

    (dist,) = [d for d in distributions(path=[paths[0]])]
    assert dist.metadata["Name"] == "team-pipes"
    assert [(p.group, p.name, p.value) for p in dist.entry_points] == [("fluxgate.hooks", "team", "team_pipes.hooks")]
    bare = tmp_path / "bare"
    bare.mkdir()
    assert Tree(bare).worker_paths(tmp_path / "site2", "base") == [str(bare)]  # no project: installed entry points
