"""`python -m fluxgate.ab --own-envs` (what `nox -s perf-ab -- --base REF --own-envs` runs after making the base's
worktree): each side in its own virtualenv with its own tree's pins, on CPU with the tiny profile. An A/A is SAME,
each side's worker ran in its own venv, and a second run reuses both venvs; the venv stamp's reuse rule on its own.

The end-to-end test makes two real venvs (`pip install torch==2.13.0 -e <tree>`, uncompiled: about 40 s each on a
quiet 2-core machine, made at once): the slowest test of the file. Deselect it with `-k "not own_envs"`. It runs
beside the other tests (not with the timing tests, alone): its verdict may be UNKNOWN there, never SLOW or FAST."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from timing_support import prioritized

from fluxgate import ab_sides

pytestmark = pytest.mark.subprocess  # starts pytest or python in subprocesses: seconds each

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--profile", "tiny", "--models", "flux1-dev", "--precisions", "bf16", "--cpu-threads", "1"]
TORCH = "torch==2.13.0"  # noxfile.py's default pin: a local CPU wheel on CI


def tree_copy(to: Path) -> Path:
    """What a side's venv and worker need of this checkout: src, fixtures, the injectors, pyproject.toml, README.md."""
    for name in ("src", "fixtures"):
        shutil.copytree(ROOT / name, to / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "tests" / "injectors", to / "tests" / "injectors",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, to / name)
    return to


def run_ab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fluxgate.ab", *args]
    # PIP_COMPILE=0: pip leaves the venvs' packages uncompiled (pip's --no-compile, as tests/test_example_package.py
    # installs), halving the make (~80 s -> ~37 s a venv on a quiet 2-core machine); the sides' interpreters
    # compile what they import as they import it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "PIP_COMPILE": "0"}
    env.pop("FLUXGATE_TORCH", None)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env,
                          preexec_fn=prioritized)


def test_own_envs_a_a_is_same_each_side_in_its_venv_and_a_second_run_reuses_them(tmp_path):
    trees = {side: tree_copy(tmp_path / side) for side in ("base", "candidate")}
    envs, cache = tmp_path / "envs", tmp_path / "cache"
    common = ["--base-tree", str(trees["base"]), "--candidate-tree", str(trees["candidate"]), "--own-envs",
              "--envs-dir", str(envs), "--torch", TORCH, "--fixture-cache", str(cache), "--limits", "off", *TINY]
    started = time.monotonic()
    first = run_ab(*common, "--ab-max-blocks", "12", "--budget-s", "15", "--history-dir", str(tmp_path / "h1"),
                   "--summary-out", str(tmp_path / "ab.md"), cwd=tmp_path)
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    for side in ("base", "candidate"):
        assert f"{side} side: made {envs / f'venv-{side}'}" in first.stderr, first.stderr[-3000:]
    (row,) = [line.split() for line in first.stdout.splitlines() if line.startswith("flux1-dev[bf16] ")]
    # SAME on a quiet machine; on a shared one whose neighbours move the ~10 ms tiny steps by 10 % and more, the rule
    # says UNKNOWN (never SLOW or FAST on an A/A). The A/A verdict itself is pinned by tests/test_ab.py; this test
    # pins the venvs.
    assert row[1] in ("SAME", "UNKNOWN"), first.stdout
    assert row[-2] == "1.0000" and row[-1] == "—"  # the same image from both venvs; limits off
    runs = {json.loads(p.read_text())["environment"]["ab_side"]: json.loads(p.read_text())
            for p in (tmp_path / "h1").glob("*.json")}
    for side, run in runs.items():  # each worker ran in its own venv, importing its own tree's fluxgate
        assert run["environment"]["ab_python"] == str((envs / f"venv-{side}" / "bin" / "python").absolute())
    assert runs["base"]["environment"]["ab_tree"] == runs["candidate"]["environment"]["ab_tree"]  # an A/A
    assert "A/B gate: passed" in (tmp_path / "ab.md").read_text()

    started = time.monotonic()
    second = run_ab(*common, "--ab-max-blocks", "4", "--budget-s", "15", "--history-dir", str(tmp_path / "h2"),
                    cwd=tmp_path)
    second_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    for side in ("base", "candidate"):
        assert f"{side} side: reusing {envs / f'venv-{side}'}" in second.stderr, second.stderr[-3000:]
    assert "making" not in second.stderr
    assert second_s < first_s, (first_s, second_s)


# --- the stamp: when a venv is reused, when it is made again -------------------------------------------------------

class FakePip:
    """subprocess.run for side_env: records the commands; `venv` makes bin/python, the import probe answers `probe`."""

    def __init__(self, probe: int = 0):
        self.commands, self.probe = [], probe

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        if command[1:3] == ["-m", "venv"]:
            python = Path(command[-1]) / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.touch()
        code = self.probe if command[1] == "-c" else 0
        return subprocess.CompletedProcess(command, code, "", "")


def test_a_venv_is_reused_only_while_its_stamp_matches_and_it_imports(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "pyproject.toml").write_text("[project]\nname = 'fluxgate'\n")
    venv, logs = tmp_path / "venv-base", []
    fake = FakePip()
    monkeypatch.setattr(ab_sides.subprocess, "run", fake)

    def made(torch: str = TORCH) -> bool:
        fake.commands.clear()
        ab_sides.side_env(venv, tree, torch, "base", log=logs.append)
        return any(c[1:3] == ["-m", "venv"] for c in fake.commands)

    assert made()  # first time: the venv, then torch and the tree in one pip call
    assert fake.commands[-1][-3:] == [TORCH, "-e", str(tree.resolve())]
    assert not made() and [c[1] for c in fake.commands] == ["-c"]  # same pins: reused, only the import probe ran
    assert logs[-1].startswith("base side: reusing")
    (tree / "pyproject.toml").write_text("[project]\nname = 'fluxgate'\ndependencies = ['numpy']\n")
    assert made() and "was made for another pyproject_sha256" in " ".join(logs)  # the tree's pins changed
    assert not made()
    assert made("torch==2.11.0") and "was made for another torch" in " ".join(logs)
    fake.probe = 1  # the stamp matches but the venv is broken (a package removed by hand)
    assert made("torch==2.11.0") and "cannot import torch and fluxgate" in " ".join(logs)
    fake.probe = 0
    (venv / ab_sides.ENV_STAMP).unlink()
    assert made("torch==2.11.0")  # no stamp (an interrupted make): never reused


def test_a_failing_pip_is_one_line_naming_the_side_and_the_step_and_leaves_no_stamp(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "pyproject.toml").write_text("")

    def run(command, **kwargs):
        if command[1:3] == ["-m", "pip"]:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for torch==9")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(ab_sides.subprocess, "run", run)
    with pytest.raises(ab_sides.SideError, match=r"^candidate side: `.*pip install -q torch==9 -e .*` failed \(1\): ERROR: No "):
        ab_sides.side_env(tmp_path / "venv", tree, "torch==9", "candidate", log=lambda text: None)
    assert not (tmp_path / "venv" / ab_sides.ENV_STAMP).exists()
